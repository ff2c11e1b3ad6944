"""mkdocs-gen-files script (mkdocs.yml, plugins: gen-files): adds the generated pages to the site.

The pages themselves are made by ``pages.py`` beside this file; see its docstring.
"""

import sys
from pathlib import Path

import mkdocs_gen_files
from mkdocs.structure.files import InclusionLevel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pages import all_pages  # noqa: E402

editor = mkdocs_gen_files.editor.FilesEditor.current()
for path, content in all_pages().items():
    if isinstance(content, bytes):
        with mkdocs_gen_files.open(path, "wb") as handle:
            handle.write(content)
    else:
        with mkdocs_gen_files.open(path, "w", encoding="utf-8") as handle:
            handle.write(content)
    if path.endswith("SUMMARY.md"):  # literate-nav reads it; it is not a page of the site
        editor.files.get_file_from_path(path).inclusion = InclusionLevel.EXCLUDED
