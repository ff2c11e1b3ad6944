"""``python -m mergeopt.rank``: an alias of ``mergeopt rank``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("rank")
