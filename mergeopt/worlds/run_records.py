"""What a training run records of itself, and how a rerun checks it: run.json (written last, so a
finished run is never retrained), the step checkpoint of a run in progress, and the identity both
carry (the recipe's fingerprint, the mixture, its unit and digests of every input). A rerun whose
recipe, mixture, unit or data changed is refused in one line rather than silently retrained.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.runtime.files import write_json_atomic
from mergeopt.runtime.fingerprint import fingerprints, first_changed

RUN_MARKER = "run.json"
LEGACY_UNIT = "samples"  # how runs drew their mixtures before weights.unit existed


def trained_with(recipe: Recipe) -> dict:
    """What makes two runs comparable, as recipe keys: base, data, budget, optimizer, method, seed.
    run.json keeps it, so a rerun with other settings is refused naming the key that changed."""
    train = recipe.train.model_dump(mode="json")
    train.pop("mixtures")
    train.pop("output_dir")
    train.pop("checkpoint_every")  # how often progress is saved does not change the run
    return {
        "model.base": recipe.model.base,
        "seed": recipe.seed,
        **{f"train.{k}": v for k, v in train.items()},
    }


def recipe_fingerprint(recipe: Recipe) -> str:
    """:func:`trained_with` hashed (the same hash as before run.json kept the settings themselves)."""
    settings = trained_with(recipe)
    train = {k.removeprefix("train."): v for k, v in settings.items() if k.startswith("train.")}
    payload = {"base": settings["model.base"], "seed": settings["seed"], "train": train}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def changed_setting(record: dict, settings: dict) -> str:
    """``train.lr 0.0005 now, 0.001 then``: the first of ``settings`` (:func:`trained_with` now) that
    differs from what ``record`` (a run.json) was trained with; a general phrase for a run.json that
    predates it."""
    saved = record.get("trained_with")
    if not isinstance(saved, dict):
        return "base, data, budget or optimizer changed"
    for key, value in settings.items():
        if key not in saved or saved[key] != value:
            was = json.dumps(saved[key]) if key in saved else "unset"
            return f"{key} {json.dumps(value)} now, {was} then"
    return "base, data, budget or optimizer changed"


def input_digests(recipe: Recipe) -> dict[str, str]:
    """The digests of what every run of ``recipe`` reads: the base, every training set and the chat
    template conversations are rendered with, if the recipe names one.

    Every set counts for every run, not only for the runs that draw from it: the seeded stream
    shuffles each domain (:func:`mergeopt.worlds.training_data.mixture_examples`), so one set's
    size moves every run's examples.
    """
    template = [recipe.data.chat_template] if recipe.data.chat_template is not None else []
    return fingerprints([recipe.model.base, *recipe.train.data.values(), *template])


def run_identity(recipe: Recipe, weights: dict[str, float], inputs: dict[str, str]) -> dict:
    """What a run's step checkpoint and run.json record of it: recipe, mixture, its unit and inputs."""
    return {
        "fingerprint": recipe_fingerprint(recipe),
        "trained_with": trained_with(recipe),
        "weights": weights,
        "unit": recipe.weights.unit,
        "inputs": inputs,
    }


def run_dir(value: str, grid: str | Path) -> Path | None:
    """The directory a grid row's ``path`` names, read from the working directory, else from the
    grid file's own directory (:func:`grid_run_records`); None when it is on neither."""
    given = Path(value)
    return next((p for p in (given, Path(grid).parent / given) if p.is_dir()), None)


def grid_run_records(table, grid: str | Path) -> list[tuple[int, Path, dict]]:
    """``(row, directory, run.json)`` of each grid row whose ``path`` column names a run on this disk.

    ``mergeopt train`` writes the path as it was given (relative to where train ran), so a relative
    path is read from the working directory, else from the grid file's own directory (a grid moved
    with its runs, or written beside them by hand). Runs found nowhere are named in one warning: the
    checks that read run.json (weights.unit, the training recipe) skip them, and a user ranking from
    another directory would otherwise not know. A directory without run.json is a run trained
    elsewhere, which these checks cannot read either: it is skipped without a word.
    """
    from mergeopt.errors import warn
    from mergeopt.runtime.distributed import is_main

    if "path" not in getattr(table, "columns", ()):
        return []
    records, missing = [], []
    for row, value in enumerate(table["path"]):
        if not isinstance(value, str) or not value.strip():
            continue
        found = run_dir(value, grid)
        if found is None:
            missing.append(value)
            continue
        try:
            record = json.loads((found / RUN_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append((row, found, record))
    if missing and is_main():
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        warn(
            f"{grid}: {len(missing)} of {len(table)} runs in its path column are not on this disk "
            f"({shown}), from the working directory nor beside the grid: their weights.unit and "
            "training-recipe checks are skipped"
        )
    return records


def drawn_unit(weights: dict[str, float], record: dict) -> str | None:
    """The unit a run of mixture ``weights`` that ``record`` (run.json or a step checkpoint's state)
    describes drew its examples in; None for a single domain, which is the same run in either unit.
    Records from before the unit was recorded drew sample shares, the only unit there was."""
    if sum(float(w) > 0 for w in weights.values()) <= 1:
        return None
    return record.get("unit", LEGACY_UNIT)


def drawn_differently(record: dict, identity: dict) -> bool:
    """True when ``record``'s mixture was drawn in another unit than ``identity``'s would draw it."""
    drawn = drawn_unit(identity["weights"], record)
    return drawn is not None and drawn != identity["unit"]


def relocated(record: dict, identity: dict) -> dict | None:
    """``record`` (a run.json or step checkpoint) as if written where this recipe's inputs lie now,
    when it differs from ``identity`` only in where they lie: a base, a training set or a chat
    template moved (a cache or a cluster's data disk, copied with its runs). A path a setting names
    is carried to the setting's new value, and its recorded digest with it, so :func:`check_inputs`
    still names a file whose content changed too (a setting pointed at another input of the run,
    or two at one, is another recipe: nothing moved); an input no setting of ``trained_with`` names
    (the chat template) is followed to the one new path holding its very content. None when
    another setting differs, or the record is too old to tell.

    The fingerprint hashes the recipe's paths, so a moved input would refuse every finished run as
    another recipe's and advise deleting hours of training."""
    moved: dict[str, str] = {}
    if record.get("fingerprint") != identity["fingerprint"]:
        saved, now = record.get("trained_with"), identity["trained_with"]
        if not isinstance(saved, dict) or set(saved) != set(now):
            return None
        for key, was in saved.items():
            if isinstance(was, dict) and isinstance(now[key], dict) and set(was) == set(now[key]):
                pairs = [(was[k], now[key][k]) for k in was]  # train.data: a path per domain
            else:
                pairs = [(was, now[key])]
            for old, new in pairs:
                if old == new:
                    continue
                if not (isinstance(old, str) and isinstance(new, str)) or moved.setdefault(old, new) != new:
                    return None  # a setting that is no path, or one path now two
    inputs, current = record.get("inputs") or {}, identity["inputs"]
    if any(old not in inputs or new not in current for old, new in moved.items()):
        return None  # a setting that is no input file changed (or a record from before inputs)
    if len(set(moved.values())) < len(moved) or any(
        new in inputs or old in current for old, new in moved.items()
    ):
        return None  # two inputs now one, one now two, or swapped: other data, nothing moved
    arrived = [path for path in current if path not in inputs and path not in moved.values()]
    for old in [path for path in inputs if path not in current and path not in moved]:
        same = [path for path in arrived if current[path] == inputs[old]]
        if len(same) == 1:
            moved[old] = same[0]
    if not moved:
        return record
    moved_inputs = {moved.get(path, path): value for path, value in inputs.items()}
    return {
        **record,
        "fingerprint": identity["fingerprint"],
        "trained_with": identity["trained_with"],
        "inputs": moved_inputs,
    }


def finished(path: Path, identity: dict) -> bool:
    """True for a finished run of this recipe, mixture and data (wherever its inputs lie now, see
    :func:`relocated`); an error for a run of another one."""
    weights = identity["weights"]
    marker = path / RUN_MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    info = relocated(recorded, identity)
    if info is None:
        changed = changed_setting(recorded, identity["trained_with"])
        raise UserError(
            f"{path} was trained with a different recipe ({changed}); "
            "delete it or choose another train.output_dir / model.experts path"
        )
    trained = info.get("weights", {})
    if set(trained) != set(weights) or any(not abs(trained[n] - weights[n]) <= 1e-9 for n in weights):
        raise UserError(
            f"{path} holds a run of mixture {trained}, not {weights} (train.mixtures changed); "
            "delete it or choose another train.output_dir"
        )
    if drawn_differently(info, identity):
        trained_unit = drawn_unit(weights, info)
        raise UserError(
            f"{path} holds a run of mixture {trained} in {trained_unit[:-1]} shares, and weights.unit "
            f"is {identity['unit']}: set weights.unit: {trained_unit} to rank against it, or delete "
            "it to retrain"
        )
    check_inputs(
        info,
        identity,
        f"{path} was trained on other data",
        "delete every run (model.experts, train.output_dir/mixtures) to retrain them on the new data",
    )
    return True


def check_inputs(record: dict, identity: dict, what: str, remedy: str) -> None:
    """Refuse a run.json or step checkpoint ``record`` whose inputs changed since, naming the first.

    An input read now and not then, or then and not now, is refused too: the chat template set,
    unset or switched to another file (the old one still on disk, unchanged) renders every
    conversation otherwise, and no training setting names it. A record without ``inputs``
    (written before runs recorded them) is not checked.
    """
    saved = record.get("inputs") or {}
    changed = first_changed(saved, identity["inputs"])
    if changed is not None:
        raise UserError(f"{what}: {changed} changed since; restore it, or {remedy}")
    if not saved:
        return
    for path in identity["inputs"]:
        if path not in saved:
            raise UserError(f"{what}: it did not read {path}, which the recipe now names; {remedy}")
    for path in saved:
        if path not in identity["inputs"]:
            raise UserError(
                f"{what}: it read {path}, which the recipe no longer names; name it again, or {remedy}"
            )


def step_checkpoint_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.checkpoint")


def save_step_checkpoint(path: Path, state: dict, model: torch.nn.Module, optimizer) -> None:
    """The trainable weights (safetensors), AdamW's state, the RNG and the counters, swapped in whole.

    Written into a fresh directory and renamed over the previous checkpoint, so a kill leaves one
    complete checkpoint or the other.
    """
    from safetensors.torch import save_file

    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(staging / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, staging / "optimizer.pt")
    write_json_atomic(staging / "state.json", state)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def step_checkpoint_state(path: Path, identity: dict) -> dict | None:
    """The state.json of a step checkpoint of this very run; None if there is none.

    Another recipe's or mixture's partial run is worthless here and is removed. One of this run
    whose inputs changed since is refused, naming the first changed file: continuing it would mix
    steps on the old data with steps on the new.
    """
    if not path.is_dir() and path.with_name(path.name + ".old").is_dir():
        path.with_name(path.name + ".old").rename(path)  # killed between the two renames
    if not (path / "state.json").is_file():
        return None
    recorded = json.loads((path / "state.json").read_text())
    state = relocated(recorded, identity)
    if state is None or state.get("weights") != identity["weights"] or drawn_differently(state, identity):
        shutil.rmtree(path)
        return None
    what = f"{path} belongs to a run that read other data"
    check_inputs(state, identity, what, "delete that directory to start the run over on the new data")
    return state


def load_step_checkpoint(path: Path, identity: dict, model: torch.nn.Module, optimizer) -> dict | None:
    """Restore a step checkpoint of this very run (:func:`step_checkpoint_state`); None if there is none."""
    state = step_checkpoint_state(path, identity)
    if state is None:
        return None
    from safetensors.torch import load_file

    trainable = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device))
    extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"])
    return state
