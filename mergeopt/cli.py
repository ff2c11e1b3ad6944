# PYTHON_ARGCOMPLETE_OK
"""``mergeopt``: one command with verbs, the way users of tune, lm-eval and llamafactory-cli expect.

The verbs, their one-line help and examples are listed here and their parsers built here, from
the options each declares in :mod:`mergeopt.cli_options` (one place, so the options the verbs
share are spelt and explained once); ``mergeopt --help`` answers without importing torch, and the
reference in the docs is generated from this parser tree. The work itself lives in each verb's
module (``HANDLERS``), imported only when that verb runs. Errors and interrupts are handled in one place (:func:`mergeopt.errors.run_cli`):
a user's mistake is one line and exit code 2, an interrupt exits with 128 + the signal.

``python -m mergeopt.fit RECIPE`` and the other ``python -m`` forms are aliases of these verbs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import mergeopt
from mergeopt import inputs
from mergeopt.cli_options import ADDERS, common
from mergeopt.errors import UserError, did_you_mean, run_cli
from mergeopt.runtime import launcher

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
# verbs that never join a torchrun group: under torchrun every rank would do the whole work and
# write the same outputs (`torchrun ... -m mergeopt merge` merged N times, the first rank published
# the checkpoint and the others failed on the directory it had just filled, exit 1)
ONE_PROCESS = ("train", "merge", "export", "transfer", "diagnose")
OUT_KEYS = {
    "fit": "output_dir",
    "plan": "output_dir",
    "train": "train.output_dir",
}  # the recipe key --out sets
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
    (argparse's own prints the usage, 4 to 9 lines, under another prefix), with the closest verb,
    option or choice to a mistyped one, as the unknown-key line does. Help is unchanged."""

    def error(self, message: str):
        raise UserError(f"{message}{self._suggestion(message)} (see {self.prog} --help)")

    def _suggestion(self, message: str) -> str:
        """`` (did you mean '--dry-run'?)`` for an unknown option or an invalid choice, else ''."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            typed, known = choice[1], [c.strip().strip("'") for c in choice[2].split(",")]
        else:
            unknown = re.match(r"unrecognized arguments: (.*)$", message)
            options = [w for w in (unknown[1].split() if unknown else []) if w.startswith("--")]
            if not options:
                return ""
            typed, known = (
                options[0].split("=", 1)[0],
                [o for o in self._option_string_actions if o.startswith("--")],
            )
        return did_you_mean(typed, known)


def command_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one verb (``prog`` names it as the user typed it, e.g. ``python -m mergeopt.fit``)."""
    parser = Parser(
        prog=prog or f"mergeopt {name}",
        description=HELP[name][0].upper() + HELP[name][1:] + ".",
        epilog=f"Example: {EXAMPLES[name]}",
    )
    ADDERS[name](parser)
    common(parser)
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
        common(sub)
    return root


def parse(name: str, argv: Sequence[str], prog: str | None = None) -> argparse.Namespace:
    """Parse one verb's arguments; options may come after the recipe's overrides."""
    args = command_parser(name, prog).parse_intermixed_args(list(argv))
    args.command = name
    key = OUT_KEYS.get(name)
    if key is not None and args.out is not None:  # --out is a recipe key, stated once
        if any(o.startswith(f"{key}=") for o in args.overrides):
            raise UserError(f"--out and a {key}= override both name where {name} writes: give one")
        args.overrides = [*args.overrides, f"{key}={_yaml_string(args.out)}"]
    return args


def _yaml_string(text: str) -> str:
    """``text`` quoted as a YAML string: --out names a path, which the overrides' YAML read as a
    number (``--out 2024``), a boolean (``--out yes``), null (``~``) or a comment (``#1``)."""
    return "'" + text.replace("'", "''") + "'"


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
    size = inputs.torchrun_variable("WORLD_SIZE")
    if name in ONE_PROCESS and size > 1:
        raise UserError(
            f"mergeopt {name} runs in one process, not as one of WORLD_SIZE={size} (torchrun's): "
            "start it without torchrun"
        )
    launcher.end_with_the_launcher()  # a torchrun rank gets SIGTERM when its agent dies
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
