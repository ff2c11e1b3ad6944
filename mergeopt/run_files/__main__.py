"""``python -m mergeopt.run_files DIR``: write the JSON Schemas the docs publish (docs/reference/schemas)."""

import json
import sys
from pathlib import Path

from mergeopt.run_files.reading import json_schemas

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out.mkdir(parents=True, exist_ok=True)
for name, schema in json_schemas().items():
    (out / name.replace(".json", ".schema.json")).write_text(json.dumps(schema, indent=2) + "\n")
