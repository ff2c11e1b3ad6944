"""``python -m mergeopt.plan``: an alias of ``mergeopt plan``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("plan")
