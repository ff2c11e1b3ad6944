"""``python -m mergeopt.calibrate``: an alias of ``mergeopt calibrate``."""

from mergeopt.cli import alias

if __name__ == "__main__":
    alias("calibrate")
