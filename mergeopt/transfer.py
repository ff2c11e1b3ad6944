"""``python -m mergeopt.transfer``: an alias of ``mergeopt transfer``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("transfer")
