"""``mergeopt export MIXTURE.json --to FORMAT``: a fitted mixture as a trainer's config.

A fit ends with weights; training on them happens elsewhere. This command writes them in the
terms of each framework (see ``--to``), converting token shares to per-sample probabilities with
each domain's mean tokens per sample when ``--datasets`` are given (records, or the token files
a trainer reads: MDS, Megatron indexed datasets, OLMo ``.npy``; with the special tokens the
format's trainer adds to each sample, :func:`~mergeopt.export.trained_tokens.as_trained`), and turning a budget into
absolute counts, refusing one that would repeat a dataset more than ``--max-epochs`` times, or a
source more than the fit's own repetition cap (``weights.max_epochs`` in mixture.json). Every
input is checked, and every format rendered, before anything is written; a problem is one line on
stderr and exit code 2 (``--to all`` without ``--datasets`` too: it names the formats that need
them). Output goes to stdout, to ``--out FILE``, to the format's file in ``--out DIR/`` (an existing
directory, or a path ending in a slash), or with ``--to all`` one file per format into
``--out DIR``; each file's header repeats the command that writes it again. Examples:

    mergeopt export runs/tiny/mixture.json --to llamafactory
    mergeopt export runs/tiny/mixture.json --to hf-datasets --datasets arith=a.jsonl \\
        reverse=r.jsonl brackets=b.jsonl markov=m.jsonl --budget-tokens 2000000 --out mix.py
    mergeopt export runs/tiny --to all --datasets ... --out exports/
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

from mergeopt.cli import run_command
from mergeopt.errors import UserError, did_you_mean
from mergeopt.export.formats import FORMATS, Context, Format
from mergeopt.export.formats.base import Specials, names_a_directory, output_path
from mergeopt.export.mixture_input import (
    missing_datasets,
    parse_datasets,
    read_mixture,
    read_run_recipe,
    recipe_datasets,
    resolve_world_path,
)
from mergeopt.export.shares import budget_epochs, check_recorded_cap, check_repetition, make_plan
from mergeopt.export.token_files import TokenFiles
from mergeopt.export.token_stats import LazyTokenizer, load_tokenizer, measure_all
from mergeopt.export.trained_tokens import as_trained
from mergeopt.inputs import writable_dir, writable_file
from mergeopt.runtime.files import write_text_atomic
from mergeopt.runtime.rundir import owned, staged


def choose_formats(name: str) -> list[Format]:
    if name == "all":
        return list(FORMATS.values())
    if name not in FORMATS:
        raise UserError(
            f"unknown --to format {name!r}{did_you_mean(name, [*FORMATS, 'all'])}; known: {', '.join(FORMATS)}, all"
        )
    return [FORMATS[name]]


def _tokenizer(args, recipe, recipe_error, mixture):
    """The tokenizer the datasets are counted with: ``--tokenizer``, else the run's base; with the
    run's ``data.chat_template`` where its recipe names one (conversations count as the fit read them)."""
    from mergeopt.objectives.chat import with_template

    template = recipe.data.chat_template if recipe is not None else None
    if args.tokenizer:
        from mergeopt.loading.checkpoints import looks_like_hub_name

        # a path that is not there: transformers then read it as a hub repository id and said
        # "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" (an owner/name that
        # is not there may still be in the Hugging Face cache: transformers looks it up)
        if not Path(args.tokenizer).exists() and not looks_like_hub_name(args.tokenizer):
            raise UserError(f"--tokenizer {args.tokenizer} does not exist")
        return with_template(load_tokenizer(args.tokenizer), template)
    if recipe_error is not None:
        raise recipe_error
    if recipe is None:
        raise UserError(
            f"counting tokens needs a tokenizer: pass --tokenizer PATH (no recipe.yaml beside {mixture.path})"
        )
    base = resolve_world_path(recipe.model.base, mixture, recipe)
    return with_template(
        load_tokenizer(base, recipe.model.gguf_file, recipe.model.trust_remote_code), template
    )


def _other_fits_recipe(recipe, mixture) -> list[str]:
    """A warning when the recipe.yaml beside mixture.json names other experts than the mixture: a
    mixture.json copied beside another run's recipe, whose tokenizer, chat template and train.data
    the export would then read as this fit's."""
    if recipe is None or not recipe.expert_names or set(recipe.expert_names) == set(mixture.names):
        return []
    return [
        f"{mixture.path.parent / 'recipe.yaml'} names experts {', '.join(recipe.expert_names)}, and "
        f"{mixture.path.name} weighs {', '.join(mixture.names)}: the recipe (its tokenizer, chat "
        "template and train.data) may be another fit's"
    ]


def build(args) -> tuple[dict[Format, str], list[str]]:
    """Check the inputs and render every chosen format: (texts, lines for stderr). Writes nothing."""
    formats = choose_formats(args.to)
    TokenFiles(args.token_dtype, args.eos_id)  # a bad --token-dtype is refused before anything is read
    if args.to == "all" and not args.out:
        raise UserError("--to all writes one file per format: pass --out DIR")
    if args.max_epochs < 1:
        raise UserError(f"--max-epochs must be at least 1, got {args.max_epochs:g}")
    mixture = read_mixture(args.mixture)
    weights_are = mixture.weights_are(args.weights_are)
    try:
        recipe, recipe_error = read_run_recipe(mixture), None
    except UserError as err:  # only fatal where the recipe is needed (tokenizer, mergekit, train.data)
        recipe, recipe_error = None, err
    given = (
        parse_datasets(args.datasets, mixture, recipe) if args.datasets else recipe_datasets(recipe, mixture)
    )
    if args.out is not None:  # before anything is counted
        check_not_an_input(
            args, formats, [mixture.path, mixture.path.parent / "recipe.yaml", *given.values()]
        )
    missing = missing_datasets(given, mixture)
    needs_paths = [f.name for f in formats if f.needs_paths]
    if missing and needs_paths:
        if not args.datasets:  # the run's recipe.yaml names them, but not on this disk (moved since)
            _refuse_absent_recipe_data(recipe, mixture, args.to, needs_paths)
        raise UserError(_missing_for_paths(args.to, needs_paths, missing[0]))
    if missing and given:
        raise UserError(
            f"--datasets gives no dataset for expert {missing[0]!r}: give one for every expert with a "
            "positive weight (or none: equal sample lengths are then assumed)"
        )
    datasets = {n: given[n].resolve() for n in mixture.positive if n in given}
    budget = args.budget_tokens is not None or args.budget_samples is not None
    converts = [f for f in formats if f.unit is not None and f.unit != weights_are]
    measure = bool(datasets) and (budget or bool(converts) or any(f.needs_sizes for f in formats))
    tokenizer = LazyTokenizer(lambda: _tokenizer(args, recipe, recipe_error, mixture))
    if measure:  # the tokenizer is loaded only if some dataset is text (stored ids need none)
        token_files = TokenFiles(args.token_dtype, args.eos_id)
        stats = measure_all(datasets, tokenizer, token_files)
    else:
        stats = None
    specials = functools.cache(lambda: Specials.of(tokenizer()))
    plan = make_plan(mixture.weights, weights_are, stats, args.budget_tokens, args.budget_samples)
    seed = mixture.seed if args.seed is None else args.seed
    ctx = Context(
        mixture,
        plan,
        datasets,
        recipe,
        seed,
        weights_are,
        recipe_error=recipe_error,
        epochs=budget_epochs(plan, datasets, mixture.constraints),
        options=shaping_options(args),
        out=args.out,
        many=args.to == "all",
        max_epochs=args.max_epochs,
        tokenizer=tokenizer,
    )
    # each format's numbers, of the tokens its trainer trains on (as_trained); the repetition and
    # the fit's cap are checked for each: a sample budget, or a trainer that trains on fewer tokens
    # than counted (LLaMA-Factory's pretraining over a BOS/EOS tokenizer), repeats a source more
    # in one format's file than in mergeopt's counts
    trained = {f: as_trained(ctx, f, specials) for f in formats}
    many = len(formats) > 1
    candidates = [(None, ctx)] if many else []
    candidates += [(f, c) for f, c in trained.items() if c is not ctx or not many]
    for f, one in candidates:
        try:
            check_recorded_cap(one.plan, mixture.constraints, datasets)
            check_repetition(one.epochs, args.max_epochs)
        except UserError as err:
            if f is None or not many:
                raise
            raise UserError(
                f"{err} (in --to {f.name}'s counts, made from the tokens its trainer trains on; --to all "
                "writes every format or none, so nothing was written)"
            ) from None
    checked = _most_repeating([one for _, one in candidates])
    messages = [f"warning: {line}" for line in check_repetition(checked.epochs, args.max_epochs)]
    messages += [f"warning: {line}" for line in _other_fits_recipe(recipe, mixture)]
    if stats is None and converts:
        other = "sample" if weights_are == "tokens" else "token"
        messages.insert(
            0,
            f"note: no datasets measured, so the fitted {weights_are[:-1]} shares are used as "
            f"{other} shares (equal sample lengths assumed); pass --datasets to measure them",
        )
    if args.budget_tokens is not None and plan.counts is None and any(f.unit == "samples" for f in formats):
        messages.append("note: without datasets a token budget gives no sample counts")
    texts = {}
    for f in formats:
        try:
            texts[f] = f.render(trained[f])
        except UserError as err:
            if args.to != "all" or not str(err).startswith(f"--to {f.name}"):
                raise
            # one format's refusal, where the user asked for every format: say that it stops them
            # all, and what still works (a problem with the data itself stops every format alike)
            raise UserError(
                f"{err} (--to all writes every format or none, so nothing was written: "
                f"export the other formats one at a time with --to)"
            ) from None
    messages += [f"note: {line}" for line in ctx.notes]
    return texts, messages


def _most_repeating(contexts: list[Context]) -> Context:
    """The one of ``contexts`` whose budget repeats a source most (the first where none says)."""
    return max(contexts, key=lambda c: max(c.epochs.per_source.values()) if c.epochs is not None else 0.0)


def _refuse_absent_recipe_data(recipe, mixture, to: str, needs_paths: list[str]) -> None:
    """The run's recipe.yaml names ``train.data``, but a dataset of a weighted expert is not on
    this disk (the run and its data copied to another cluster, the old paths gone): name it, where
    the general refusal would say that --datasets, never passed, gives none."""
    from mergeopt.export.mixture_input import resolve_world_path

    data = recipe.train.data if recipe is not None and recipe.train is not None else {}
    for name in mixture.positive:
        raw = data.get(name)
        if raw is None:
            return
        try:
            path = Path(resolve_world_path(raw, mixture, recipe))
        except UserError:
            return  # a world not built: its own refusal is for --datasets paths
        if not path.exists():
            formats = needs_paths[0] if to != "all" else "all (" + ", ".join(needs_paths) + ")"
            raise UserError(
                f"--to {formats} names each domain's data, and the run's "
                f"{mixture.path.parent / 'recipe.yaml'} names train.data.{name} {raw}, which is not on "
                f"this disk (moved since the fit?): pass --datasets {name}=PATH (every expert with a "
                "positive weight)"
            )


def _missing_for_paths(to: str, needs_paths: list[str], expert: str) -> str:
    """Why a format that names data files cannot be written without ``expert``'s dataset; for
    ``--to all``, which formats those are (the user asked for every format, not for one of them)."""
    fix = f"pass --datasets {expert}=PATH (every expert with a positive weight)"
    if to != "all":
        return f"--to {needs_paths[0]} names each domain's data, but --datasets gives none for expert {expert!r}: {fix}"
    others = [name for name in FORMATS if name not in needs_paths]
    return (
        f"--to all includes formats that name each domain's data ({', '.join(needs_paths)}), but "
        f"--datasets gives none for expert {expert!r}: {fix}, or --to one of {', '.join(others)} (they need none)"
    )


def shaping_options(args: argparse.Namespace) -> list[str]:
    """The options, as typed, that shaped the numbers of an export: each file's header repeats them
    in the command that writes it again. ``--out`` and ``--max-epochs`` (which only refuses) are not."""
    words = ["--datasets", *args.datasets] if args.datasets else []
    valued = {
        "--budget-tokens": args.budget_tokens,
        "--budget-samples": args.budget_samples,
        "--weights-are": args.weights_are,
        "--tokenizer": args.tokenizer,
        "--token-dtype": args.token_dtype,
        "--eos-id": args.eos_id,
        "--seed": args.seed,
    }
    for option, value in valued.items():
        if value is not None:
            words += [option, str(value)]
    return words


def write(texts: dict[Format, str], out: str | None, many: bool) -> list[Path]:
    if out is None:
        for text in texts.values():
            sys.stdout.write(text)
        return []
    target = Path(out)
    if many:  # one file per format, published together (mergeopt.runtime.rundir); others in DIR kept
        if target.exists() and not target.is_dir():
            raise UserError(f"--out {target} exists and is not a directory")
        names = [f.filename for f in texts]
        with owned(target, "export", "--out") as target, staged(target, names) as staging:
            for f, text in texts.items():
                write_text_atomic(staging.path / f.filename, text)
        return [target / name for name in names]
    ((fmt, text),) = texts.items()
    return [write_text_atomic(output_path(fmt, out, many), text)]


def check_not_an_input(args: argparse.Namespace, formats, sources: list[Path]) -> None:
    """Refuse an ``--out`` file that export reads (``sources``: the mixture.json, the recipe.yaml
    beside it, each dataset): writing it would replace the fit's mixture.json, its recipe.yaml or a
    training set with a config, and the run could not be exported again."""
    many = args.to == "all"
    for target in (output_path(f, args.out, many) for f in formats):
        for source in (p for p in sources if p.is_file()):
            if target.is_file() and target.samefile(source):
                raise UserError(f"--out {target} is an input of this export ({source}): choose another file")


def run(args: argparse.Namespace) -> int:
    """``mergeopt export``: the parsed command line (:mod:`mergeopt.cli`)."""
    if args.out is not None:  # before the tokens are counted
        if args.to == "all" or names_a_directory(args.out):
            writable_dir(args.out, "--out")
        else:
            writable_file(args.out, "--out")
    texts, messages = build(args)
    written = write(texts, args.out, args.to == "all")  # an error here comes alone, before any note
    for line in messages:
        print(f"mergeopt: {line}", file=sys.stderr)
    if written:
        print(f"Wrote {', '.join(str(p) for p in written)}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``mergeopt export`` from Python, with its command-line arguments."""
    return run_command("export", argv)
