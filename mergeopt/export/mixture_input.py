"""What an export starts from: a finished fit's mixture.json, its recipe.yaml, and ``--datasets``.

Every exporter trusts these inputs, so they are checked once, here, before anything is measured or
written: the weights are finite, non-negative and sum to 1 (within 1e-6), and meet the constraints
the fit recorded (bounds, pins, repetition caps); the fit finished; each
``--datasets name=path`` names an expert of the mixture and an existing file. World paths in the
recipe (``tiny://base``) are resolved through the ``worlds`` record mixture.json keeps, so an export
never builds a world. Each problem is a :class:`~mergeopt.errors.UserError` naming the culprit.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError
from mergeopt.run_files import MixtureConstraints, MixtureGroup, read_finished_mixture


@dataclass(frozen=True)
class Mixture:
    """A checked mixture.json: weights in the fitted expert order, and the merge that was scored."""

    path: Path
    weights: dict[str, float]
    method: dict[str, Any]
    seed: int
    strategy: str | None
    worlds: dict[str, str] = field(default_factory=dict)
    constraints: MixtureConstraints | None = None  # the fit's; the weights meet them (checked on reading)
    groups: dict[str, MixtureGroup] | None = None  # a hierarchical mixture's two levels (checked on reading)
    unit: str | None = None  # weights.unit as the fit recorded it; None in files from before it was

    def weights_are(self, flag: str | None) -> str:
        """The unit to read the weights in: the one the fit recorded, which ``--weights-are`` may
        repeat but not contradict; ``--weights-are``, then tokens, for a file that records none."""
        if flag is not None and self.unit is not None and flag != self.unit:
            raise UserError(
                f"{self.path} records its weights as {self.unit[:-1]} shares (weights.unit: {self.unit}), "
                f"so --weights-are {flag} would misread them: drop --weights-are"
            )
        return self.unit or flag or "tokens"

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    @property
    def positive(self) -> list[str]:
        """Experts with a weight above 0: the domains a data format lists."""
        return [n for n, w in self.weights.items() if w > 0]


def read_mixture(path: str | Path) -> Mixture:
    """Read and check a mixture.json (a run directory means its mixture.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "mixture.json"
    try:
        data = read_finished_mixture(path)
    except UserError:
        if path.is_file() and path.suffix.lower() != ".json":  # a recipe.yaml, a CSV: not a mixture at all
            raise UserError(_not_a_mixture(path)) from None
        raise
    return Mixture(
        path=path,
        weights=dict(data.weights),
        method=data.method or {"name": "linear", "scale": 1.0},  # runs from before merge methods
        seed=data.seed if data.seed is not None else 0,
        strategy=data.strategy,
        worlds=dict(data.worlds or {}),
        constraints=data.constraints,
        groups=data.groups,
        unit=data.unit,
    )


def _not_a_mixture(path: Path) -> str:
    """What export reads, for a file that is no mixture.json (the run's recipe.yaml, given by
    mistake, would otherwise be reported as JSON that does not parse), with the one beside it."""
    beside = path.parent / "mixture.json"
    hint = f": give {path.parent} or {beside}" if beside.is_file() else ""
    return (
        f"{path} is not a mixture.json; mergeopt export takes a fit's run directory or its mixture.json{hint}"
    )


def describe_groups(groups: dict[str, MixtureGroup]) -> str:
    """Both levels of a hierarchical mixture in one line, as every export's header states them:
    ``code 0.6 (python 0.5, js 0.5); math 0.4 (gsm 0.75, algebra 0.25)``."""
    parts = []
    for label, group in groups.items():
        within = ", ".join(f"{n} {'-' if c is None else f'{c:.6g}'}" for n, c in group.within.items())
        parts.append(f"{label} {group.share:.6g} ({within})")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the run's recipe


def read_run_recipe(mixture: Mixture):
    """The recipe.yaml beside mixture.json (a :class:`~mergeopt.config.Recipe`), or None if absent."""
    from mergeopt.config import load_recipe

    path = mixture.path.parent / "recipe.yaml"
    if not path.is_file():
        return None
    return load_recipe(path)


def resolve_world_path(path: str, mixture: Mixture, recipe=None) -> str:
    """``tiny://base`` -> its place in the world the fit used (mixture.json's ``worlds``).

    Falls back to the cache the recipe names when the mixture has no record, but never builds a
    world: an export must not start a minute-long build as a side effect.
    """
    from mergeopt import worlds

    scheme = worlds.scheme_of(path)
    if scheme is None:
        return path
    rest = path.partition("://")[2]
    if scheme in mixture.worlds:
        return str(Path(mixture.worlds[scheme]) / rest)
    cache_dir = recipe.world.cache_dir if recipe is not None else None
    seed = recipe.world.seed if recipe is not None else 0
    root = worlds.world_dir(scheme, cache_dir, seed)
    if not (root / worlds.MARKER).is_file():
        raise UserError(
            f"{path}: the {scheme} world is not built at {root} (run the fit first, or give real paths)"
        )
    return str(root / rest)


# ----------------------------------------------------------------------------- --datasets


def parse_datasets(items: Sequence[str], mixture: Mixture, recipe=None) -> dict[str, Path]:
    """``["arith=a.jsonl", ...]`` -> {expert: path}; every name an expert, every path present.

    A path also counts as present when it is a Megatron prefix (``PATH.bin`` and ``PATH.idx``) or a
    glob that matches a file. A world path (``smollm2://train/code.jsonl``), as the recipe's
    ``train.data`` names it, is read from the world the fit used.
    """
    datasets: dict[str, Path] = {}
    for item in items:
        name, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not name or not raw:
            raise UserError(f"--datasets: {item!r} is not of the form name=path")
        if name not in mixture.weights:
            raise UserError(
                f"--datasets names {name!r}, which is not an expert of the mixture "
                f"({', '.join(mixture.names)})"
            )
        if name in datasets:
            raise UserError(f"--datasets names {name!r} twice")
        from mergeopt import worlds

        if worlds.scheme_of(raw) is not None:
            raw = resolve_world_path(raw, mixture, recipe)
        path = Path(raw).expanduser()
        if not (path.exists() or is_megatron_prefix(path) or _glob_matches(path)):
            if "*" in raw:  # OLMo token files: a glob over a directory of .npy files
                raise UserError(f"--datasets {name}: {path}: the glob matches no file")
            half = [s for s in (".bin", ".idx") if Path(f"{path}{s}").is_file()]
            if half:  # a Megatron prefix with one of its two files
                other = ".idx" if half[0] == ".bin" else ".bin"
                raise UserError(
                    f"{path}{half[0]}: a Megatron indexed dataset needs {path}{other}, which is missing"
                )
            raise UserError(f"--datasets {name}: {path} does not exist")
        datasets[name] = path
    return datasets


def _glob_matches(path: Path) -> bool:
    """A glob of OLMo token files (``'DIR/*.npy'``) that matches a file: OLMo-core expands it too."""
    return "*" in str(path) and any(Path(f).is_file() for f in glob.iglob(str(path)))


def is_megatron_prefix(path: Path) -> bool:
    return Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file()


def megatron_prefix(path: Path) -> str:
    """The prefix of a Megatron indexed dataset: a ``.bin`` or ``.idx`` path cut to it, else itself."""
    text = str(path)
    return text[: -len(path.suffix)] if path.suffix in (".bin", ".idx") else text


MDS_INDEX = "index.json"  # what makes a directory an MDS dataset (streaming's get_index_basename)


def mds_splits(path: Path) -> list[str]:
    """The subfolders of ``path`` that are MDS datasets: the splits llm-foundry's convert scripts
    write (``ROOT/train``, ``ROOT/val``), or the partitions of a parallel ``MDSWriter``."""
    if not path.is_dir():
        return []
    return sorted(child.name for child in path.iterdir() if (child / MDS_INDEX).is_file())


def is_mds(path: Path) -> bool:
    """An MDS directory (it holds index.json), or a root of MDS splits."""
    return path.is_dir() and ((path / MDS_INDEX).is_file() or bool(mds_splits(path)))


def mds_split(path: Path) -> str | None:
    """The ``split`` a streaming ``Stream(local=path, split=...)`` needs to read the MDS data at
    ``path``, as llm-foundry's streams name it: None where ``path`` holds index.json itself (a
    merged index included) or is no MDS data, else its only split subfolder. A root with several
    splits is refused: which one training reads is the user's choice, made by naming it."""
    if not path.is_dir() or (path / MDS_INDEX).is_file():
        return None
    splits = mds_splits(path)
    if len(splits) > 1:
        shown = ", ".join(splits[:6]) + (f" and {len(splits) - 6} more" if len(splits) > 6 else "")
        example = path / ("train" if "train" in splits else splits[0])
        raise UserError(
            f"{path} has no {MDS_INDEX} but {len(splits)} MDS splits ({shown}): give the one training "
            f"reads (such as {example}), or merge them into one index with streaming's merge_index"
        )
    return splits[0] if splits else None


def recipe_datasets(recipe, mixture: Mixture) -> dict[str, Path]:
    """The run's own training data (recipe ``train.data``) when the recipe has it, all of it present.

    All or nothing: a partly missing default is no default (``--datasets`` can always be given).
    """
    if recipe is None or recipe.train is None:
        return {}
    out = {}
    for name, raw in recipe.train.data.items():
        if name not in mixture.weights:
            continue
        try:
            path = Path(resolve_world_path(raw, mixture, recipe))
        except UserError:
            return {}
        if not path.exists():
            return {}
        out[name] = path
    return out


def missing_datasets(datasets: Mapping[str, Path], mixture: Mixture) -> list[str]:
    """Experts with a positive weight and no dataset."""
    return [n for n in mixture.positive if n not in datasets]
