"""``python -m mergeopt VERB ...``: the same as the ``mergeopt`` console script."""

from mergeopt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
