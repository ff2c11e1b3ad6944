"""``python -m mergeopt.export``: an alias of ``mergeopt export``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("export")
