"""A griffe extension (mkdocs.yml, mkdocstrings options: extensions) for the API reference.

mergeopt's docstrings use reStructuredText roles (``:func:`open_run```, ``:class:`Evaluator```),
which Markdown shows as raw text. This writes each role as inline code instead, so the API page
reads as the source does.
"""

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc):`~?([^`]+)`")


class RolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
