"""``python -m mergeopt.run_files DIR``: write the JSON Schemas the docs publish (docs/reference/schemas)."""

import json
import sys
from pathlib import Path

from mergeopt.run_files.reading import json_schemas

if len(sys.argv) != 2:
    # without DIR the schemas were written into the working directory: at the repository's root,
    # five stray copies of docs/reference/schemas that went stale unseen
    print(
        "usage: python -m mergeopt.run_files DIR (the docs publish docs/reference/schemas)", file=sys.stderr
    )
    sys.exit(2)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for name, schema in json_schemas().items():
    (out / name.replace(".json", ".schema.json")).write_text(json.dumps(schema, indent=2) + "\n")
