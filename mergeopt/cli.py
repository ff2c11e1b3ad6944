# PYTHON_ARGCOMPLETE_OK
"""``mergeopt``: one command with verbs, the way users of tune, lm-eval and llamafactory-cli expect.

Every verb's options are declared here, in one place, so the options the verbs share (a recipe
with ``key=value`` overrides, ``--out``, ``--quiet``, ``--debug``) are spelt and explained once,
``mergeopt --help`` answers without importing torch, and the reference in the docs is generated
from this parser tree. The work itself lives in each verb's module (``HANDLERS``), imported only
when that verb runs. Errors and interrupts are handled in one place (:func:`mergeopt.errors.run_cli`):
a user's mistake is one line and exit code 2, an interrupt exits with 128 + the signal.

``python -m mergeopt.fit RECIPE`` and the other ``python -m`` forms are aliases of these verbs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import mergeopt
from mergeopt import inputs
from mergeopt.errors import UserError, run_cli

# verb -> "module:function" that takes the parsed namespace and returns the exit code
HANDLERS = {
    "fit": "mergeopt.fit:run",
    "plan": "mergeopt.memory.dry_run:run",
    "train": "mergeopt.worlds.train:run",
    "rank": "mergeopt.evaluation.rank:run",
    "calibrate": "mergeopt.evaluation.calibrate:run",
    "merge": "mergeopt.export.merge:run",
    "export": "mergeopt.export.command:run",
    "transfer": "mergeopt.evaluation.transfer:run",
    "diagnose": "mergeopt.evaluation.diagnose:run",
}
HELP = {
    "fit": "fit the mixture weights of a recipe's experts and write the run directory",
    "plan": "the per-rank memory plan of a fit, from config files and headers only (no weights read)",
    "train": "train a world's experts and ground-truth mixture runs for real (small worlds)",
    "rank": "how the proxy ranks mixtures against real runs (a recipe and its grid, or two tables)",
    "calibrate": "correct the proxy with the real runs so far: calibrated pick and the mixture to train next",
    "merge": "write the merge of a recipe's experts at one mixture as a Hugging Face checkpoint",
    "export": "write a fitted mixture as a training framework's data-mixture config",
    "transfer": "how a ranking of mixtures at one scale carries to another",
    "diagnose": "the experts' task vectors, the loss between them, and flags where the proxy may degrade",
}
OUT_KEYS = {"fit": "output_dir", "train": "train.output_dir"}  # the recipe key --out sets
MERGE_DTYPES = (
    "float32",
    "bfloat16",
    "float16",
)  # mergeopt.export.merge.OUT_DTYPES (a test keeps them equal)
EXAMPLES = {
    "fit": "mergeopt fit recipes/tiny.yaml optim.lr=0.1 --out /tmp/run",
    "plan": "mergeopt plan recipes/70b.yaml --world-size 8",
    "train": "mergeopt train recipes/tiny_grid.yaml",
    "rank": "mergeopt rank --proxy mix_1m.csv+loss_1m.csv --truth mix_60m.csv+loss_60m.csv",
    "calibrate": "mergeopt calibrate recipes/tiny_grid.yaml --grid runs.csv",
    "merge": "mergeopt merge recipes/tiny.yaml --mixture runs/tiny/mixture.json --out merged",
    "export": "mergeopt export runs/tiny/mixture.json --to llamafactory",
    "transfer": "mergeopt transfer small.csv large.csv --metrics loss",
    "diagnose": "mergeopt diagnose recipes/tiny.yaml --points 7 --out runs/tiny",
}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the tool's others: one line ``mergeopt: error: ...``, exit code 2
    (argparse's own prints the usage, 4 to 9 lines, under another prefix). Help is unchanged."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _common(parser: argparse.ArgumentParser) -> None:
    """Options every verb takes."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")


def _recipe(parser: argparse.ArgumentParser, optional: bool = False, what: str = "recipe YAML") -> None:
    """A recipe and its ``key=value`` overrides (options may come after the overrides)."""
    parser.add_argument("recipe", nargs="?" if optional else None, help=f"{what} (see recipes/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, e.g. optim.steps=50"
    )


def _out(parser: argparse.ArgumentParser, what: str, **kwargs) -> None:
    parser.add_argument("--out", metavar="DIR", help=what, **kwargs)


def _world_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--world-size",
        type=_positive_int,
        metavar="N",
        help="plan per rank for a torchrun job of N processes (default: WORLD_SIZE, else 1)",
    )


def _device_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device-memory",
        type=_positive_float,
        metavar="GIB",
        help="plan for a device of this many GiB, all free (e.g. 79 for an 80 GB GPU), "
        "not for this machine's (default: the device the recipe resolves to, as it is now)",
    )


def _tables(parser: argparse.ArgumentParser, both: str) -> None:
    """The options of the table-reading verbs (rank's table mode, transfer)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--mixture-prefix", help="weight columns start with this (default: w_, then train_)")
    group.add_argument("--mixture-columns", help="comma-separated weight columns")
    parser.add_argument(
        "--metrics", help=f"comma-separated metric columns (default: numeric columns in {both})"
    )
    parser.add_argument(
        "--higher-is-better", default="", help="comma-separated metrics where higher is better"
    )
    parser.add_argument("--k", type=int, default=3, help="top-k size (default 3)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= inputs.MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (a whole number from 0 to 2^63 - 1)")
    return value


def _positive_float(text: str) -> float:
    """A finite number above 0 (``float`` alone takes nan and inf, which pass every ``>`` test)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above 0")
    return value


def _fit(p: argparse.ArgumentParser) -> None:
    _recipe(p)
    _out(p, "the run directory (the same as output_dir=DIR)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in output_dir (an error if there is none)",
    )
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in output_dir and start over")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan instead (= mergeopt plan)")
    _world_size(p)
    _device_memory(p)
    _plan_json(p)


def _plan(p: argparse.ArgumentParser) -> None:
    _recipe(p)
    _world_size(p)
    _device_memory(p)
    _plan_json(p)


def _plan_json(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print the plan as one JSON document (rows in bytes, peak, fits, suggestions) instead of the table",
    )


def _train(p: argparse.ArgumentParser) -> None:
    _recipe(p)
    _out(p, "where the experts and runs are written (the same as train.output_dir=DIR)")


def _rank(p: argparse.ArgumentParser) -> None:
    _recipe(p, optional=True, what="grid mode: a fit recipe whose merged proxy is ranked on --grid")
    p.add_argument(
        "--grid", help="grid mode: grid.csv from `mergeopt train` (default: the recipe's rank.grid)"
    )
    p.add_argument("--mixture", help="grid mode: a mixture.json whose regret to report (default: the run's)")
    p.add_argument("--proxy", help="table mode: proxy scores, TABLE.csv or MIXTURES.csv+METRICS.csv")
    p.add_argument("--truth", help="table mode: true scores, TABLE.csv or MIXTURES.csv+METRICS.csv")
    _tables(p, "both")
    p.add_argument("--seed", type=_seed, default=0, help="table mode: bootstrap seed (default 0)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="grid mode: ignore the proxy evaluations an interrupted run saved in OUT/rank_checkpoint",
    )
    # unset, not the table defaults, so that rank can refuse a table option in grid mode (where the
    # recipe's rank.k, rank.bootstrap and seed apply) instead of ignoring it
    p.set_defaults(k=None, bootstrap=None, higher_is_better=None, seed=None)
    _out(p, "output directory (default: the recipe's output_dir in grid mode, else rank_out/)")


def _calibrate(p: argparse.ArgumentParser) -> None:
    _recipe(p, what="the fit recipe whose merged proxy is calibrated")
    p.add_argument(
        "--grid", help="grid.csv of the real runs so far (default: calibrate.grid, else rank.grid)"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="ignore the proxy evaluations kept in OUT/calibrate_checkpoint and evaluate again",
    )
    _out(p, "output directory (default: the recipe's output_dir/calibration)")


def _merge(p: argparse.ArgumentParser) -> None:
    _recipe(p, what="the recipe the mixture was fitted with")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="name=weight for every expert, comma-separated, e.g. a=0.3,b=0.7")
    source.add_argument("--mixture", help="a mixture.json written by `mergeopt fit`")
    _out(p, "checkpoint directory to write (must be new or empty)", required=True)
    p.add_argument(
        "--dtype",
        choices=MERGE_DTYPES,
        help="dtype of the written weights (default: the base's, else float32)",
    )
    p.add_argument("--normalize", action="store_true", help="rescale the weights to sum to 1")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument(
        "--as-adapter",
        action="store_true",
        help="write the merge as one PEFT LoRA adapter over the base (every expert a LoRA adapter, "
        "linear merge): rank Σ r_i per module, modules changed densely saved whole (modules_to_save)",
    )


def _export(p: argparse.ArgumentParser) -> None:
    from mergeopt.export.formats import FORMATS
    from mergeopt.export.shares import DEFAULT_MAX_EPOCHS

    formats = "Formats: " + ", ".join(f"{f.name} ({f.meaning})" for f in FORMATS.values())
    p.epilog = f"{p.epilog} {formats}" if p.epilog else formats
    p.add_argument("mixture", help="a fit's mixture.json (or its run directory)")
    p.add_argument("--to", required=True, help=f"format: {', '.join(FORMATS)}, or all (with --out DIR)")
    p.add_argument(
        "--datasets",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH",
        help="each expert's training data (JSONL, JSON, CSV, parquet, arrow, save_to_disk dir, MDS dir, "
        "Megatron PREFIX of .bin/.idx, OLMo .npy token file or 'DIR/*.npy'); default: the recipe's train.data",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-tokens", type=_positive_int, metavar="N", help="training tokens in all")
    budget.add_argument("--budget-samples", type=_positive_int, metavar="N", help="training samples in all")
    p.add_argument(
        "--weights-are",
        choices=("tokens", "samples"),
        help="what the fitted weights are shares of (default: the unit mixture.json records, the "
        "recipe's weights.unit; tokens for a file that records none)",
    )
    p.add_argument("--tokenizer", help="tokenizer to count with (default: the run's base)")
    p.add_argument(
        "--token-dtype",
        metavar="DTYPE",
        help="dtype of stored token ids: OLMo .npy files (default: the smallest unsigned that holds the "
        "tokenizer's vocabulary) and MDS bytes columns (default: int64, llm-foundry's)",
    )
    p.add_argument(
        "--eos-id",
        type=int,
        metavar="ID",
        help="EOS id ending each document of OLMo .npy files (default: the tokenizer's)",
    )
    p.add_argument(
        "--max-epochs",
        type=_positive_float,
        default=DEFAULT_MAX_EPOCHS,
        help=f"refuse a budget that repeats a dataset more often (default {DEFAULT_MAX_EPOCHS:g})",
    )
    p.add_argument("--seed", type=_seed, help="shuffling seed written into configs (default: the fit's)")
    _out(p, "output file, or directory (one file per format with --to all); default: stdout")


def _transfer(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "tables",
        nargs="+",
        metavar="TABLE",
        help="SMALL LARGE (or LARGE alone with --surrogate-fit): TABLE.csv or MIXTURES.csv+METRICS.csv",
    )
    p.add_argument(
        "--surrogate-fit",
        metavar="TRAIN",
        help="fit one LightGBM per metric on this small-scale table and rank LARGE (and SMALL) with it",
    )
    _tables(p, "all")
    p.add_argument("--seed", type=_seed, default=0, help="bootstrap and LightGBM seed (default 0)")
    p.add_argument("--rounds", type=int, help="surrogate: LightGBM boosting rounds (default 300)")
    p.add_argument(
        "--learning-rate", type=_positive_float, help="surrogate: LightGBM learning rate (default 0.05)"
    )
    p.add_argument("--num-leaves", type=int, help="surrogate: LightGBM leaves per tree (default 8)")
    p.add_argument(
        "--min-child-samples", type=int, help="surrogate: LightGBM min samples per leaf (default 3)"
    )
    _out(p, "output directory (default: transfer_out/)", default="transfer_out")


def _diagnose(p: argparse.ArgumentParser) -> None:
    _recipe(p)
    _out(p, "where diagnose.json, diagnose.md and the plots go (default: the recipe's output_dir)")
    p.add_argument(
        "--points",
        type=_positive_int,
        default=5,
        metavar="N",
        help="points on each edge between two experts, both experts included (default 5, at least 3)",
    )


ADDERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "fit": _fit,
    "plan": _plan,
    "train": _train,
    "rank": _rank,
    "calibrate": _calibrate,
    "merge": _merge,
    "export": _export,
    "transfer": _transfer,
    "diagnose": _diagnose,
}


def command_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one verb (``prog`` names it as the user typed it, e.g. ``python -m mergeopt.fit``)."""
    parser = Parser(
        prog=prog or f"mergeopt {name}",
        description=HELP[name][0].upper() + HELP[name][1:] + ".",
        epilog=f"Example: {EXAMPLES[name]}",
    )
    ADDERS[name](parser)
    _common(parser)
    return parser


class _VerbListFormatter(argparse.HelpFormatter):
    """The root help with each verb's line beside its name: argparse sizes the name column from the
    root's own options (8 characters here), so a longer verb (``calibrate``) would wrap."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog)
        # the column argparse would choose if the verbs counted: indent 4 + the longest name
        self._action_max_length = max(self._action_max_length, 4 + max(map(len, HANDLERS)))


def build_parser() -> argparse.ArgumentParser:
    """The whole tree: ``mergeopt VERB ...`` (for ``--help``, completion and the generated reference)."""
    root = Parser(
        prog="mergeopt",
        description="Choose a fine-tuning data mixture by optimizing the weights of a merge of per-domain experts.",
        epilog="Run `mergeopt VERB --help` for a verb's options. Docs: docs/ (mkdocs serve).",
        formatter_class=_VerbListFormatter,
    )
    root.add_argument("--version", action="version", version=f"mergeopt {mergeopt.__version__}")
    verbs = root.add_subparsers(dest="command", metavar="VERB", required=True)
    for name, adder in ADDERS.items():
        sub = verbs.add_parser(
            name, help=HELP[name], description=HELP[name][0].upper() + HELP[name][1:] + "."
        )
        sub.epilog = f"Example: {EXAMPLES[name]}"
        adder(sub)
        _common(sub)
    return root


def parse(name: str, argv: Sequence[str], prog: str | None = None) -> argparse.Namespace:
    """Parse one verb's arguments; options may come after the recipe's overrides."""
    args = command_parser(name, prog).parse_intermixed_args(list(argv))
    args.command = name
    key = OUT_KEYS.get(name)
    if key is not None and args.out is not None:  # --out is a recipe key, stated once
        if any(o.startswith(f"{key}=") for o in args.overrides):
            raise UserError(f"--out and a {key}= override both name where {name} writes: give one")
        args.overrides = [*args.overrides, f"{key}={args.out}"]
    return args


# Loggers of libraries imported on the way that warn about nothing mergeopt uses: torchao (which
# peft imports when it is installed, as the export frameworks need) reports each of its compiled
# kernels built for another Python, and torch's pytree its deprecations of torchao's enums; four
# lines of noise in the README's first command. Errors still show.
FOREIGN_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_foreign_loggers() -> None:
    """Raise the libraries' loggers in FOREIGN_LOGGERS to ERROR (the command line only, not on import)."""
    for name in FOREIGN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def run_command(name: str, argv: Sequence[str], prog: str | None = None) -> int:
    """Parse and run one verb; a :class:`UserError` propagates (``main`` turns it into one line).

    The arguments are parsed before the verb's module is imported, so ``--help`` and a mistyped
    option answer at once, without the seconds torch takes to import.
    """
    args = parse(name, argv, prog)
    quiet_foreign_loggers()
    inputs.environment()  # torchrun's variables and MERGEOPT_FAULT, before any work
    module, _, function = HANDLERS[name].partition(":")
    with _no_bars(getattr(args, "quiet", False)):
        code = int(getattr(importlib.import_module(module), function)(args) or 0)
    # a verb that joined a torchrun group ends it now, not at the interpreter's exit. Not after an
    # error: ranks may still wait in a collective, which nccl's teardown would wait on too
    if "mergeopt.runtime.distributed" in sys.modules:
        sys.modules["mergeopt.runtime.distributed"].leave()
    return code


@contextmanager
def _no_bars(quiet: bool) -> Iterator[None]:
    """Under ``--quiet``, no library's tqdm bar either: some (transformers converting a GGUF file)
    ignore Hugging Face's own switch. tqdm reads ``TQDM_*`` variables as its defaults when it is
    first imported, which in a command-line process comes after this (only the standard library is
    imported before a verb's module); an explicit ``disable=`` still wins. Restored after the command."""
    if not quiet:
        yield
        return
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def main(argv: Sequence[str] | None = None) -> int:
    """``mergeopt VERB ...``: the console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    root = build_parser()
    try:
        import argcomplete  # optional: `pip install argcomplete`, then see the docs' CLI page

        argcomplete.autocomplete(root)
    except ImportError:
        pass
    if not argv or argv[0] not in HANDLERS:  # --help, --version, nothing, or an unknown verb
        return run_cli(lambda rest: root.parse_args(rest) and 2, argv)  # help exits 0, the rest is one line
    return run_cli(lambda rest: run_command(argv[0], rest), argv[1:])


def alias(name: str) -> None:
    """``python -m mergeopt.NAME ...``: the same as ``mergeopt NAME ...``."""
    sys.exit(run_cli(lambda rest: run_command(name, rest, prog=f"python -m mergeopt.{name}"), sys.argv[1:]))
