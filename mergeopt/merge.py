"""``python -m mergeopt.merge``: an alias of ``mergeopt merge`` (the code lives in :mod:`mergeopt.export.merge`)."""

if __name__ == "__main__":
    from mergeopt.errors import run_cli
    from mergeopt.export.merge import main

    raise SystemExit(run_cli(main))
