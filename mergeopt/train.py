"""``python -m mergeopt.train``: an alias of ``mergeopt train``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("train")
