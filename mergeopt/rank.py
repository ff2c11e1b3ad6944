"""``python -m mergeopt.rank``: an alias of ``mergeopt rank`` (the code lives in :mod:`mergeopt.evaluation.rank`)."""

if __name__ == "__main__":
    from mergeopt.errors import run_cli
    from mergeopt.evaluation.rank import main

    raise SystemExit(run_cli(main))
