"""``python -m mergeopt.train``: an alias of ``mergeopt train`` (the code lives in :mod:`mergeopt.worlds.train`)."""

if __name__ == "__main__":
    from mergeopt.errors import run_cli
    from mergeopt.worlds.train import main

    raise SystemExit(run_cli(main))
