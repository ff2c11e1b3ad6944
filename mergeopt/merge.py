"""``python -m mergeopt.merge``: an alias of ``mergeopt merge``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("merge")
