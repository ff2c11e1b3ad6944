"""Train small worlds for real: ``python -m mergeopt.train RECIPE [key=value ...] [--quiet] [--debug]``.

The merged proxy is only worth what its ranking of mixtures is worth, and that can only be measured
against models really trained on each mixture. From one base this trains (a) one expert per domain
(into the directories the recipe names under ``model.experts``) and (b) one ground-truth run per
mixture of ``train.mixtures``, every run with the same token budget, hyperparameters and seed, so
the mixture is the only thing that differs. Mixture runs draw the domain of every example from w
(a seeded sampler, like ``datasets.interleave_datasets`` with probabilities w). Each finished run
leaves ``run.json`` (written last) and is never retrained; a run whose recipe changed is an error.
A run also records a digest of what it read (the base and every training set,
:mod:`mergeopt.runtime.fingerprint`); when one has changed since, a rerun is refused in one line
naming the file, for a finished run and for the step checkpoint of one in progress alike. Retraining
instead would silently replace hours of runs (and experts a fit may have read) for what is often an
accidental edit, and would leave a grid of runs trained on two versions of the data; the refusal
lets the user restore the file or delete the runs to retrain them on purpose.
The grid table ``train.output_dir/grid.csv`` has one row per mixture: ``run``, one ``w_<expert>``
column per expert, one ``loss_<dev set>`` column per dev set, one ``score_<label>`` column per
non-loss objective term (exact match, choice accuracy, custom), and ``tokens``. Losses and scores
are measured on every record of the dev sets, read as fit reads them, and recomputed from the saved
checkpoints on every call: a term added to the recipe later fills its column without retraining, and
the score columns of terms a later recipe does not name are carried over, not dropped.
"""

from __future__ import annotations

import argparse
import math
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergeopt.cli import run_command
from mergeopt.config import Recipe, TrainSection, load_recipe
from mergeopt.errors import Interrupted, UserError, warn
from mergeopt.inputs import distinct_dirs, lora_targets, writable_dir
from mergeopt.loading.checkpoints import read_json_object
from mergeopt.loading.devices import resolve_device
from mergeopt.loading.positions import check_max_length
from mergeopt.objectives.chat import with_template
from mergeopt.objectives.data import Batch, Example
from mergeopt.objectives.loss import per_set_loss_sums
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.term_scores import (
    load_custom,
    load_dev_sets,
)
from mergeopt.runtime import determinism, faults
from mergeopt.runtime.files import write_json_atomic
from mergeopt.runtime.interrupts import check_interrupt, interruptible, pending_interrupt
from mergeopt.runtime.rundir import check_apart_from_inputs, check_output_dir, owned_all, recover, staged
from mergeopt.search.mixtures import mixture_set
from mergeopt.worlds import resolve_recipe
from mergeopt.worlds.grid_measures import grid_measures
from mergeopt.worlds.grid_table import grid_rows, write_grid
from mergeopt.worlds.run_records import (
    RUN_MARKER,
    finished,
    input_digests,
    load_step_checkpoint,
    run_identity,
    save_step_checkpoint,
    step_checkpoint_dir,
    step_checkpoint_state,
)
from mergeopt.worlds.training_data import (
    draw_probabilities,
    load_examples,
    mixture_examples,
    next_batch,
    token_batches,
)

EVALUATION_HINT = (
    "every run is trained and kept; grid.csv is written once they are all evaluated. "
    "Rerun the same command to evaluate them (no run is trained again)."
)
TRAINING_HINT = (
    "finished runs are kept and the run in progress is checkpointed. Rerun the same command to continue."
)
# stopped before any run trains (a world build, the tokenizer, the data, the checks): no run is in
# progress, and whatever an earlier command saved stays
SETUP_HINT = (
    "no run was training yet; what earlier commands trained is kept. Rerun the same command to continue."
)


def check_lora_targets(recipe: Recipe) -> None:
    """Every train.lora.target_modules entry names a module of the base (built on the meta device)."""
    from mergeopt.loading.base_model import meta_model

    model, _ = meta_model(recipe.model.base, recipe.model.trust_remote_code)
    names = [name for name, _ in model.named_modules()]
    lora_targets(recipe.train.lora.target_modules, names, "train.lora.target_modules")


def train_one(
    recipe: Recipe,
    weights: dict[str, float],
    domains: dict[str, list[Example]],
    out: Path,
    tokenizer,
    device: torch.device,
    progress: bool = True,
    inputs: dict[str, str] | None = None,
) -> dict:
    """Fine-tune the base on mixture ``weights`` for the recipe's budget and save it to ``out``.

    ``inputs``: the digests of what it reads (:func:`input_digests`), when the caller has taken them.
    """
    cfg: TrainSection = recipe.train
    torch.manual_seed(recipe.seed)
    model = _trainable_base(recipe, device)
    names, stream = _example_stream(recipe, weights, domains)
    batches = token_batches(stream, cfg.batch_tokens, tokenizer.pad_token_id or 0, len(names))
    domain_tokens = [0] * len(names)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    tokens, losses, start = 0, [], 0
    identity = run_identity(recipe, weights, input_digests(recipe) if inputs is None else inputs)
    saved = load_step_checkpoint(step_checkpoint_dir(out), identity, model, optimizer)
    if saved is not None:  # resume: the exact state after step saved["step"] - 1
        start, tokens, losses = saved["step"], saved["tokens"], saved["losses"]
        for _ in range(start):  # the example stream is seeded: skip what was used
            domain_tokens = [a + b for a, b in zip(domain_tokens, next(batches)[1])]
    bar = tqdm(range(start, cfg.steps), desc=out.name, unit="step", leave=False, disable=not progress)
    for step in bar:
        batch, held = next(batches)
        batch = batch.to(device)
        domain_tokens = [a + b for a, b in zip(domain_tokens, held)]
        losses.append(_step(model, optimizer, batch, cfg.lr * (1 - step / cfg.steps)))  # linear decay to 0
        tokens += int(batch.attention_mask.sum())
        if not math.isfinite(losses[-1]):
            raise UserError(f"training {out.name} diverged (loss {losses[-1]}); lower train.lr")
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        done = step + 1
        faults.reached(f"train.{out.name}", done)  # tests only (MERGEOPT_FAULT)
        if done < cfg.steps and (done % cfg.checkpoint_every == 0 or pending_interrupt()):
            state = {**identity, "step": done, "tokens": tokens, "losses": losses}
            save_step_checkpoint(step_checkpoint_dir(out), state, model, optimizer)
        check_interrupt(f"{out.name} step {done}")
    model.eval()
    _check_trained(model, next(batches)[0].to(device), out.name)
    trained = dict(zip(names, domain_tokens))
    with staged(out, ("*", ".*")) as staging:  # published whole, run.json inside (mergeopt.runtime.rundir)
        info = _save_run(recipe, model, tokenizer, identity, tokens, trained, losses, staging.path)
    shutil.rmtree(step_checkpoint_dir(out), ignore_errors=True)  # finished: run.json is the record
    return info


def _example_stream(recipe: Recipe, weights: dict[str, float], domains: dict[str, list[Example]]):
    """(domain names, the seeded stream of (domain index, example)) a run of mixture ``weights``
    draws: the same for the run and for :func:`check_every_domain_drawn`'s count before it."""
    names = list(domains)
    sets = [domains[n] for n in names]
    probabilities = draw_probabilities([weights[n] for n in names], sets, recipe.weights.unit)
    return names, mixture_examples(sets, probabilities, recipe.seed)


def check_every_domain_drawn(
    recipe: Recipe, weights: dict[str, float], domains: dict[str, list[Example]], out: Path
) -> None:
    """Refuse a mixture whose run would hold no example of a domain it gives weight to.

    The draws are seeded and need no model, so the batches :func:`train_one` will train on are
    counted before any run trains: with a budget too small for a weight (steps x batch_tokens
    against a 0.05 share) the run trained on the other domains alone, and grid.csv still gave it
    its nominal mixture as the truth, exit 0.
    """
    cfg: TrainSection = recipe.train
    names, stream = _example_stream(recipe, weights, domains)
    held = [0] * len(names)
    for _ in range(cfg.steps):
        held = [a + b for a, b in zip(held, next_batch(stream, cfg.batch_tokens, len(names))[1])]
    starved = [n for n, t in zip(names, held) if weights[n] > 0 and t == 0]
    if starved:
        raise UserError(
            f"{out} (mixture {weights}) would train on no example of {starved[0]} in train.steps x "
            f"train.batch_tokens ({cfg.steps} x {cfg.batch_tokens} tokens): raise the budget, or give "
            f"{starved[0]} weight 0"
        )


def _trainable_base(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The base in float32 on ``device``, in training mode: whole, or wrapped in the recipe's LoRA (peft)."""
    from transformers import AutoModelForCausalLM

    cfg: TrainSection = recipe.train
    model = AutoModelForCausalLM.from_pretrained(recipe.model.base, dtype=torch.float32).to(device)
    if cfg.method == "lora":
        from mergeopt.runtime.quiet_imports import quiet_backends

        with quiet_backends():  # PEFT imports torchao where it is installed
            from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            use_rslora=cfg.lora.use_rslora,
            task_type="CAUSAL_LM",
        )
        # peft reads transformers' deprecated is_gradient_checkpointing: nothing a user can act on
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = get_peft_model(model, lora)
    model.train()
    return model


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, lr: float) -> float:
    """One AdamW step at learning rate ``lr`` on the batch's mean token loss; that loss."""
    sums, counts = per_set_loss_sums(model, {}, batch, 1)
    loss = sums.sum() / counts.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _check_trained(model: torch.nn.Module, batch: Batch, name: str) -> None:
    """The trained model scores a finite loss on a training batch. The loop checks each step's loss,
    which is taken before that step's update: a last update that overflowed the weights
    (train.lr=1e308) was saved as a finished run, and its NaN dev losses written into grid.csv."""
    sums, counts = per_set_loss_sums(model, {}, batch, 1)
    loss = float(sums.sum() / counts.sum())
    if not math.isfinite(loss):
        raise UserError(f"training {name} diverged (loss {loss} after its last step); lower train.lr")


def _save_run(recipe, model, tokenizer, identity: dict, tokens, domain_tokens, losses, staging: Path) -> dict:
    """The trained model (dense; LoRA's adapter too), its tokenizer and run.json, into ``staging``."""
    cfg = recipe.train
    if cfg.method == "lora":
        model.save_pretrained(staging / "adapter")
        model = model.merge_and_unload()  # the dense merged expert, loadable by fit
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    info = {
        "weights": identity["weights"],
        "unit": identity["unit"],
        "steps": cfg.steps,
        "tokens": tokens,
        "domain_tokens": domain_tokens,  # the tokens each domain's examples held: the shares trained
        "method": cfg.method,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "fingerprint": identity["fingerprint"],
        "trained_with": identity["trained_with"],
        "inputs": identity["inputs"],
    }
    write_json_atomic(staging / RUN_MARKER, info)
    return info


def written_dirs(recipe: Recipe) -> dict[str, str]:
    """The directories a train writes, by the recipe key naming each: train.output_dir (grid.csv
    and the mixture runs) and every expert's run directory, wherever it lies (world paths aside)."""
    experts = {f"model.experts.{n}": p for n, p in recipe.model.experts.items() if "://" not in p}
    return {"train.output_dir": recipe.train.output_dir, **experts}


def train(recipe: Recipe, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train every missing run, evaluate every grid run on the dev sets (losses, metric terms), write grid.csv.

    Every directory it writes is held for it (:func:`written_dirs`, :func:`mergeopt.runtime.rundir.owned_all`):
    a second train into the same output_dir or onto the same expert is refused, naming this one's pid.
    """
    if recipe.train is None:
        raise UserError("the recipe has no train section: nothing to train")
    for line in recipe.train.unused_options():
        warn(line)
    check_run_dirs(recipe)
    with owned_all(written_dirs(recipe), "train"):
        return _train(recipe, progress, log)


def check_run_dirs(recipe: Recipe) -> None:
    """No run's directory is another's or lies inside another's (an expert's at a mixture run's path).

    Each run is published whole over its directory: an expert at ``train.output_dir/mixtures/001``
    was replaced by mixture 1's run, and grid.csv gave that run's losses as the expert's, exit 0.
    Whether a run is already there is checked before any training, so this one checks the plan.
    """
    names = recipe.expert_names
    mixtures = mixture_set(recipe.train.mixtures, names, recipe.seed)
    runs, _ = _planned_runs(recipe, mixtures, Path(recipe.train.output_dir))
    labels = [f"model.experts.{n}" for n in names]
    labels += [f"the run of train.mixtures {path.name}" for _, path in runs[len(names) :]]
    dirs = [
        (label, path.expanduser().resolve())
        for label, (_, path) in zip(labels, runs)
        if "://" not in str(path)
    ]
    for i, (first, a) in enumerate(dirs):
        for second, b in dirs[i + 1 :]:
            if a == b or a in b.parents or b in a.parents:
                where = "is" if a == b else "lies inside" if b in a.parents else "holds"
                raise UserError(
                    f"{first} ({a}) {where} {second} ({b}): each run needs a directory of its own, "
                    "as training one would replace the other"
                )


def _train(recipe: Recipe, progress: bool, log: Callable[[str], None]) -> Path:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    determinism.apply(recipe.deterministic)  # before anything runs on the GPU
    resolved, _ = resolve_recipe(recipe, log)
    cfg = resolved.train
    if cfg.method == "lora":  # before any run trains, not as peft's exception in the first one
        check_lora_targets(resolved)
    device = resolve_device(resolved.device)
    config_file = Path(resolved.model.base) / "config.json"
    if config_file.is_file():  # a base without one is reported by its tokenizer's loading, next
        config = read_json_object(config_file, "config.json")
        check_max_length(config, resolved, resolved.model.base, ("train.max_length", "data.max_length"))
    tokenizer = with_template(AutoTokenizer.from_pretrained(resolved.model.base), resolved.data.chat_template)
    names = resolved.expert_names
    domains = {n: load_examples(cfg.data[n], tokenizer, cfg.max_length) for n in names}
    terms = Objective.from_recipe(resolved).metric_terms
    # the records rank's proxy is scored on
    sets = load_dev_sets(resolved.data, resolved.seed, tokenizer, terms)
    measures = grid_measures(resolved, sets, terms)  # what grid.csv's columns measure: these records
    custom = load_custom(terms)  # a bad import path fails before any training
    mixtures = mixture_set(cfg.mixtures, names, resolved.seed)
    inputs = input_digests(resolved)

    out_dir = Path(cfg.output_dir)
    runs, grid_runs = _planned_runs(resolved, mixtures, out_dir)

    for _, path in runs:  # what a kill while publishing a run left beside it (the caller holds it)
        recover(path)
    todo = [(w, p) for w, p in runs if not finished(p, run_identity(resolved, w, inputs))]
    resumed = []  # (run, step it continues from): a stopped run says so, as a stopped fit does
    for w, path in todo:  # a run is published over its path whole: never over a user's directory
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(
                f"{path} exists and is not a finished mergeopt train run (it has no {RUN_MARKER}); "
                "move it away or name another directory: training would replace it"
            )
        saved = step_checkpoint_state(step_checkpoint_dir(path), run_identity(resolved, w, inputs))
        if saved is not None:  # checked before any work
            resumed.append(f"{path.name} from step {saved['step']}")
        check_every_domain_drawn(resolved, w, domains, path)
    continuing = f", continuing {', '.join(resumed)}" if resumed else ""
    log(
        f"{len(runs)} runs ({len(names)} experts, {len(runs) - len(names)} mixtures): "
        f"{len(runs) - len(todo)} finished, {len(todo)} to train{continuing} ({cfg.method}, {cfg.steps} "
        f"steps x {cfg.batch_tokens} tokens; mixtures drawn as {resolved.weights.unit[:-1]} shares)"
    )
    # no directory is made before something is saved into it: a run stopped early leaves none
    try:
        for w, path in tqdm(todo, desc="training runs", unit="run", disable=not progress):
            train_one(resolved, w, domains, path, tokenizer, device, progress, inputs)
    except Interrupted as stop:
        stop.hint = TRAINING_HINT
        raise

    try:
        rows = grid_rows(resolved, grid_runs, sets, terms, custom, tokenizer, device, progress)
    except Interrupted as stop:  # every run is trained by now: none is in progress
        stop.hint = EVALUATION_HINT
        raise
    grid = write_grid(out_dir / "grid.csv", rows, names, sets, terms, measures)
    log(f"wrote {grid} ({len(rows)} mixtures)")
    return grid


def _planned_runs(
    recipe: Recipe, mixtures: Sequence[dict[str, float]], out_dir: Path
) -> tuple[list[tuple[dict[str, float], Path]], list[tuple[dict[str, float], Path]]]:
    """The runs to have trained, (mixture, directory) each: the experts (the one-hot mixtures, at
    their recipe paths), then the grid's other mixtures under ``out_dir/mixtures``; and the grid's
    runs in its order, a vertex of the grid being its expert's run."""
    names = recipe.expert_names
    runs = [({n: float(n == name) for n in names}, Path(recipe.model.experts[name])) for name in names]
    grid_runs = []
    for i, w in enumerate(mixtures):
        vertex = [n for n in names if w[n] == 1.0]
        path = Path(recipe.model.experts[vertex[0]]) if vertex else out_dir / "mixtures" / f"{i:03d}"
        if not vertex:
            runs.append((w, path))
        grid_runs.append((w, path))
    return runs, grid_runs


def run(args: argparse.Namespace) -> int:
    """``mergeopt train``: the parsed command line (:mod:`mergeopt.cli`)."""
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.train is None:
        raise UserError("the recipe has no train section: nothing to train")
    outputs = written_dirs(recipe)
    for what, path in outputs.items():  # each trained expert is published whole into its own
        writable_dir(path, what)
    distinct_dirs({what: check_output_dir(path, what) for what, path in outputs.items()})
    for what, path in outputs.items():  # the experts are written, not read: the rest must stay apart
        check_apart_from_inputs(path, recipe.input_paths(experts=False), what, "train")
    try:
        with interruptible():
            train(recipe, progress=not args.quiet, log=(lambda _m: None) if args.quiet else print)
    except Interrupted as stop:
        if stop.hint not in (TRAINING_HINT, EVALUATION_HINT):  # stopped before any run trained
            stop.hint = SETUP_HINT
        raise
    return 0


def main(argv: Sequence[str]) -> int:
    """``mergeopt train`` from Python, with its command-line arguments."""
    return run_command("train", argv)
