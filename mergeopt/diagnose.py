"""``python -m mergeopt.diagnose``: an alias of ``mergeopt diagnose``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("diagnose")
