"""Each verb's options, declared once: what ``mergeopt VERB --help`` lists, the docs' command
reference shows, and :mod:`mergeopt.cli` builds its parsers from (``ADDERS``).

The options the verbs share (a recipe with ``key=value`` overrides, ``--out``, ``--world-size``,
``--quiet``/``--debug``) are spelt and explained by one helper each, and the value types refuse
a bad number in argparse's own message (a whole number, a seed, a finite size). Importing this
module imports neither torch nor a verb's module: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable

from mergeopt import inputs

MERGE_DTYPES = (
    "float32",
    "bfloat16",
    "float16",
)  # mergeopt.export.merge.OUT_DTYPES (a test keeps them equal)


def common(parser: argparse.ArgumentParser) -> None:
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


def _output_dir(parser: argparse.ArgumentParser) -> None:
    """fit's ``--out``, which plan takes too (it is ``fit --dry-run``): the recipe's output_dir,
    added to the overrides by :func:`mergeopt.cli.parse` (``OUT_KEYS``). A plan writes nothing there,
    but warns of an output_dir the fit could not write, so both must read the same directory."""
    _out(parser, "the run directory (the same as output_dir=DIR)")


def _world_size(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--world-size",
        type=_positive_int,
        metavar="N",
        help="plan per rank for a torchrun job of N processes (default: WORLD_SIZE, else 1)",
    )


def _device_memory(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--device-memory",
        type=_positive_float,
        metavar="GIB",
        help="plan for a device of this many GiB, all free (e.g. 79 for an 80 GB GPU), "
        "not for this machine's (default: the device the recipe resolves to, as it is now)",
    )


def _tables(parser: argparse.ArgumentParser, both: str, mode: str = "") -> None:
    """The options of the table-reading verbs (rank's table mode, transfer).

    ``mode`` prefixes each help line ("table mode: " for rank, which refuses these options with a
    recipe), so the help says which mode an option belongs to, as the error does.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--mixture-prefix",
        type=_prefix,
        help=f"{mode}weight columns start with this (default: w_, then train_)",
    )
    group.add_argument("--mixture-columns", type=_columns, help=f"{mode}comma-separated weight columns")
    parser.add_argument(
        "--metrics",
        type=_columns,
        help=f"{mode}comma-separated metric columns (default: numeric columns in {both})",
    )
    parser.add_argument(
        "--higher-is-better", default="", help=f"{mode}comma-separated metrics where higher is better"
    )
    parser.add_argument("--k", type=int, default=3, help=f"{mode}top-k size (default 3)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help=f"{mode}bootstrap resamples (default 1000)"
    )


def _columns(text: str) -> str:
    """Comma-separated column names, at least one, none twice. An empty value (an unset shell
    variable) was read as no option at all, every column by default; a repeated weight column
    counted its weight twice and was blamed as "weights sum to 2"."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no column")
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise argparse.ArgumentTypeError(f"{text!r} names {repeated!r} twice")
    return text


def _prefix(text: str) -> str:
    """A weight columns' prefix: empty, it was read as the default (w_, then train_)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give the prefix the weight columns start with")
    return text


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
    _output_dir(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in output_dir (an error if there is none)",
    )
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in output_dir and start over")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan instead (= mergeopt plan)")
    plan = p.add_argument_group(
        "with --dry-run", "the memory plan's options; a fit refuses them without --dry-run"
    )
    _world_size(plan)
    _device_memory(plan)
    _plan_json(plan)


def _plan(p: argparse.ArgumentParser) -> None:
    _recipe(p)
    _output_dir(p)
    _world_size(p)
    _device_memory(p)
    _plan_json(p)


def _plan_json(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
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
    _tables(p, "both", mode="table mode: ")
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

    width = max(len(name) for name in FORMATS) + 2
    formats = "\n".join(
        textwrap.fill(
            f.meaning, 79, initial_indent=f"  {f.name:<{width}}", subsequent_indent=" " * (width + 2)
        )
        for f in FORMATS.values()
    )
    # one format a line, under the example: argparse would run the list and the example together
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "\n\n".join(filter(None, [p.epilog, f"Formats (--to):\n{formats}"]))
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
        help="points on each edge between two experts, both experts included (default 5, from 3 to 1000)",
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
