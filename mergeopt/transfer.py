"""``python -m mergeopt.transfer``: an alias of ``mergeopt transfer`` (the code lives in :mod:`mergeopt.evaluation.transfer`)."""

if __name__ == "__main__":
    from mergeopt.errors import run_cli
    from mergeopt.evaluation.transfer import main

    raise SystemExit(run_cli(main))
