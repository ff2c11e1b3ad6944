"""Open a run directory and draw what it found: the public API behind notebooks/analysis.ipynb and report.md.

A run directory is the contract between a fit and everything after it: mixture.json (the answer,
written last, so its presence with ``status: complete`` means the run finished), recipe.yaml,
trace.csv (gradient) or evaluations.csv (zero-order search), and, with a rank check,
rank_report.json and rank_pairs.csv; after ``mergeopt diagnose``, diagnose.json. Notebooks and reports should read runs through
:func:`open_run` rather than parse those files themselves, so a change of layout breaks here,
in one tested place, and not in every user's notebook.

Figures: :func:`plot_losses` (the loss curve, or the search's values), :func:`plot_simplex` (the
weights' path on the simplex: a ternary plot for K = 3, the regular-polygon projection for
K > 3, a segment for K = 2), :func:`plot_proxy_vs_truth` (the merged proxy against the trained
grid); tables: :func:`mixture_table`, :func:`group_table`, :func:`rank_table`. Every plot takes an optional matplotlib
``ax`` and returns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mergeopt.errors import UserError
from mergeopt.evaluation.rank_report import format_number
from mergeopt.inputs import existing_dir
from mergeopt.run_files import DiagnoseFile, MixtureFile, RankReport, read_finished_mixture, read_run_file
from mergeopt.runtime.exact_csv import read_csv
from mergeopt.runtime.resume import CHECKPOINT_DIR
from mergeopt.runtime.rundir import in_use_by

RANK_PAIRS = "rank_pairs.csv"


@dataclass
class Run:
    """Everything a run directory holds; absent parts are None."""

    path: Path
    mixture: dict | None
    recipe: dict | None
    trace: pd.DataFrame | None  # gradient strategy: one row per step
    evaluations: pd.DataFrame | None  # zero-order strategies: one row per real evaluation
    rank: dict | None  # rank_report.json
    rank_pairs: pd.DataFrame | None  # rank_pairs.csv: per grid mixture, proxy and true scores
    diagnose: dict | None = None  # diagnose.json (mergeopt diagnose)

    @property
    def expert_names(self) -> list[str]:
        """The experts, or without a fit the rank check's mixture columns (a table's own names)."""
        if self.mixture is not None:
            return list(self.mixture["weights"])
        if self.rank is not None and self.rank.get("mixture_columns"):
            return list(self.rank["mixture_columns"])  # table mode: the weight columns joined on
        frame = self.rank_pairs if self.rank_pairs is not None else pd.DataFrame()
        return [c[2:] for c in frame.columns if c.startswith("w_")]

    def pair_columns(self) -> list[str]:
        """rank_pairs.csv's weight columns, in :attr:`expert_names`' order: a grid's ``w_<expert>``, a
        table's own names (``mergeopt rank --proxy --truth`` keeps the tables' columns)."""
        if self.mixture is None and self.rank is not None and self.rank.get("mixture_columns"):
            return list(self.rank["mixture_columns"])
        return [f"w_{n}" for n in self.expert_names]

    @property
    def weights(self) -> pd.Series:
        """The recommended mixture, one weight per expert."""
        if self.mixture is None:
            if self.rank is not None:
                raise UserError(f"{self.path}: a rank check's directory, no mixture.json (no fitted mixture)")
            raise UserError(f"{self.path}: no mixture.json (the fit has not finished)")
        return pd.Series(self.mixture["weights"], name="weight")

    @property
    def strategy(self) -> str | None:
        return None if self.mixture is None else self.mixture.get("strategy")

    def weight_path(self) -> np.ndarray:
        """The mixtures the fit visited, in order (steps, or evaluations), as rows."""
        frame = self.trace if self.trace is not None else self.evaluations
        if frame is None:
            return np.empty((0, len(self.expert_names)))
        return frame[[f"w_{n}" for n in self.expert_names]].to_numpy(dtype=np.float64)


def _read_csv(path: Path, columns: list[str] = ()) -> pd.DataFrame | None:
    """The table at ``path`` (None when absent), which must have ``columns``: a trace of other
    experts, or one cut short in its header, is one line here, not a KeyError in a plot."""
    if not path.is_file():
        return None
    try:
        frame = read_csv(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it as CSV ({err})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: no column {', '.join(missing)} (it has {', '.join(map(str, frame.columns))}); "
            "not this run's file, or one cut short"
        )
    return frame


def _read_recipe(path: Path) -> dict | None:
    """recipe.yaml as a tree (None when absent); a damaged one is one line, not a YAML traceback."""
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (not the recipe a fit writes)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(tree).__name__}")
    return tree


def load_run(path: str | Path, mixture: dict | None = None) -> Run:
    """Whatever the directory holds, finished or not (``mixture`` overrides mixture.json)."""
    root = existing_dir(path, "run directory")
    if mixture is None and (root / "mixture.json").is_file():
        mixture = read_run_file(MixtureFile, root).to_json()
    recipe = _read_recipe(root / "recipe.yaml")
    rank = read_run_file(RankReport, root).to_json() if (root / "rank_report.json").is_file() else None
    diagnose = read_run_file(DiagnoseFile, root).to_json() if (root / DiagnoseFile.FILE).is_file() else None
    w = [f"w_{n}" for n in mixture["weights"]] if mixture is not None else []  # what weight_path reads
    return Run(
        root,
        mixture,
        recipe,
        _read_csv(root / "trace.csv", ["step", "loss", "heldout_loss", *w]),
        _read_csv(root / "evaluations.csv", ["index", "value", *w]),
        rank,
        _read_csv(root / RANK_PAIRS),
        diagnose,
    )


def open_run(path: str | Path) -> Run:
    """A finished run: a fit's directory whose mixture.json has status ``complete``, or a rank
    check's own (``mergeopt rank --out DIR`` without a fit), whose rank_report.json is published
    only once the check is done."""
    root = existing_dir(path, "run directory")
    if not (root / "mixture.json").exists():
        if (root / "rank_report.json").is_file():
            return load_run(root)
        if (holder := in_use_by(root)) is not None:
            raise UserError(f"{root}: {holder} is writing it now: open the run once it has finished")
        if (root / CHECKPOINT_DIR).is_dir():
            raise UserError(
                f"{root}: the fit has not finished (its state is in {root / CHECKPOINT_DIR}, no "
                "mixture.json yet): rerun the fit's command to finish it, then open the run"
            )
    return load_run(root, read_finished_mixture(root).to_json())


def of_other_experts(run: Run) -> dict[str, list[str]]:
    """{file: its experts} for a fit's directory whose diagnose.json or grid rank check is of other
    experts than mixture.json's: a fit of another recipe replaces the run but keeps the other
    commands' files, which then describe experts this fit does not merge. Empty without a fit, and
    for a table-mode rank check (its mixtures are a table's own, over its own columns)."""
    if run.mixture is None:
        return {}
    fit, found = set(run.mixture["weights"]), {}
    if run.diagnose is not None and set(run.diagnose["experts"]) != fit:
        found[DiagnoseFile.FILE] = list(run.diagnose["experts"])
    if run.rank is not None and run.rank.get("grid") and run.rank_pairs is not None:  # grid mode
        ranked = [c[2:] for c in run.rank_pairs.columns if c.startswith("w_")]
        if set(ranked) != fit:
            found[RankReport.FILE] = ranked
    return found


# ----------------------------------------------------------------------------- tables


_CLOSING = (
    "dev_loss",
    "heldout_loss",
    "uniform_dev_loss",
    "uniform_heldout_loss",
    "expert_dev_loss",
    "expert_heldout_loss",
)


def mixture_table(run: Run) -> pd.DataFrame:
    """The fitted mixture beside the uniform one and each expert: weights and dev / held-out losses."""
    m = run.mixture
    if m is None:
        raise UserError(f"{run.path}: no mixture.json")
    if "dev_loss" not in m:  # calibrate's pick/ and next-<i>/: a mixture and a prediction, no losses
        raise UserError(
            f"{run.path}: this mixture.json (strategy {m.get('strategy')}) records a prediction, not "
            f"a fit's losses: its numbers are in {run.path.parent / 'calibrated_ranking.csv'} and "
            "calibration.json, the fit's table in the fit's run directory"
        )
    names = run.expert_names
    # a loss may be null (not finite, or no held-out part); the keys, and an entry per expert, are there
    missing = [key for key in _CLOSING if key not in m or (key.startswith("expert_") and m[key] is None)]
    missing += [f"{key}.{n}" for key in _CLOSING[-2:] if m.get(key) for n in names if n not in m[key]]
    if missing:
        raise UserError(
            f"{run.path / 'mixture.json'}: no {', '.join(missing)} (written by another mergeopt, or by "
            "hand?): the table needs the fitted, uniform and single-expert losses a fit records"
        )
    k = len(names)
    rows = {
        "fitted": [*(m["weights"][n] for n in names), m["dev_loss"], m["heldout_loss"]],
        "uniform": [*([1.0 / k] * k), m["uniform_dev_loss"], m["uniform_heldout_loss"]],
    }
    for i, n in enumerate(names):
        one_hot = [float(i == j) for j in range(k)]
        rows[f"{n} only"] = [*one_hot, m["expert_dev_loss"][n], m["expert_heldout_loss"][n]]
    columns = [*(f"w_{n}" for n in names), "dev_loss", "heldout_loss"]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns).astype(float)


def group_table(run: Run) -> pd.DataFrame | None:
    """A hierarchical mixture's two levels, one row per expert (group, group share, share within the
    group, weight = share × share within); None for a flat mixture."""
    m = run.mixture
    if m is None or not m.get("groups"):
        return None
    rows = {
        name: [label, group["share"], within, m["weights"][name]]
        for label, group in m["groups"].items()
        for name, within in group["within"].items()
    }
    return pd.DataFrame.from_dict(
        rows, orient="index", columns=["group", "group_share", "within_group", "weight"]
    )


def _rank_row(s: dict) -> dict:
    low, high = s.get("spearman_ci") or (None, None)
    return {
        "spearman": s["spearman"],
        "spearman_low": low,
        "spearman_high": high,
        "kendall": s["kendall"],
        "pairwise_accuracy": s["pairwise_accuracy"],
        "top1_hit": s["top1_hit"],
        "regret": s["regret"],
    }


def rank_table(run: Run, baselines: bool = False) -> pd.DataFrame:
    """One row per ranked metric: Spearman and Kendall with intervals, pairwise accuracy, top-1, regret.

    ``baselines``: one row per metric and predictor (index ``metric``, ``predictor``), the merged
    proxy first, then each baseline a grid's rank check computed (interpolating the experts' own
    scores, LightGBM and the mixing law fitted leave-one-out on the grid's runs): what the proxy
    is worth beside them. A baseline's intervals are the target's only; one the check skipped
    (a grid too small for it) is absent, its reason in ``run.rank["baselines_skipped"]``."""
    if run.rank is None:
        raise UserError(
            f"{run.path}: no rank_report.json (set rank.grid in the recipe, or run `mergeopt rank`)"
        )
    if not baselines:
        rows = {name: _rank_row(s) for name, s in run.rank["metrics"].items()}
        return pd.DataFrame.from_dict(rows, orient="index")
    from mergeopt.evaluation.baselines import LABELS

    predictors = {"proxy": run.rank["metrics"], **(run.rank.get("baselines") or {})}
    rows = {
        (metric, LABELS[name]): _rank_row(statistics[metric])
        for metric in run.rank["metrics"]
        for name, statistics in predictors.items()
        if metric in statistics
    }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["metric", "predictor"])
    return frame


# ----------------------------------------------------------------------------- figures


def _axes(ax, size=(6, 4)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)[1]


def _whole_numbers(axis) -> None:
    """Ticks at whole numbers only: steps and evaluations are counted (a short search gave 2.5)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_losses(run: Run, ax=None):
    """Gradient: the dev loss per step and the held-out loss at each evaluation. Zero-order: each
    evaluation's objective value and the best so far."""
    ax = _axes(ax)
    if run.trace is not None:
        t = run.trace
        ax.plot(t["step"], t["loss"], lw=1, alpha=0.6, label="dev loss (training batches)")
        held = t.dropna(subset=["heldout_loss"])
        ax.plot(held["step"], held["heldout_loss"], "o-", ms=3, label="held-out dev loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean token cross-entropy")
        _whole_numbers(ax.xaxis)
    elif run.evaluations is not None:
        e = run.evaluations
        ax.plot(e["index"], e["value"], ".", alpha=0.6, label="evaluation")
        ax.plot(e["index"], e["value"].cummin(), "-", label="best so far")
        ax.set_xlabel("evaluation")
        ax.set_ylabel("objective value (lower is better)")
        _whole_numbers(ax.xaxis)
    else:
        raise UserError(f"{run.path}: neither trace.csv nor evaluations.csv")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def simplex_vertices(k: int) -> np.ndarray:
    """2-D positions of the K corners: a segment (K = 2), an equilateral triangle (K = 3), a regular K-gon."""
    if k == 2:
        return np.array([[0.0, 0.0], [1.0, 0.0]])
    if k == 3:
        return np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    angles = math.pi / 2 + 2 * math.pi * np.arange(k) / k
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def simplex_coordinates(weights: np.ndarray) -> np.ndarray:
    """Mixtures (rows on the simplex) to 2-D points: Σ_i w_i v_i with v_i the corners.

    For K = 3 this is the ternary plot (exact); for K > 3 a projection in which each corner is a
    single expert and the centre is the uniform mixture (different mixtures can share a point).
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return weights @ simplex_vertices(weights.shape[1])


def plot_simplex(run: Run, ax=None):
    """The path of the weights on the simplex, every step the search took (past the recommended one
    where early stopping waited for its patience), and the recommended mixture as a star."""
    names = run.expert_names
    if not names:
        raise UserError(
            f"{run.path}: no mixture to place on the simplex (no mixture.json, trace or rank pairs)"
        )
    ax = _axes(ax, (5, 5))
    corners = simplex_vertices(len(names))
    outline = np.vstack([corners, corners[:1]]) if len(names) > 2 else corners
    ax.plot(outline[:, 0], outline[:, 1], color="grey", lw=1)
    centre = corners.mean(axis=0)
    for corner, name in zip(corners, names):  # each label just outside its corner, away from it
        away = corner - centre
        away = away / max(float(np.linalg.norm(away)), 1e-12)
        ax.annotate(
            name,
            corner,
            textcoords="offset points",
            xytext=4 * away,
            ha="left" if away[0] > 0.3 else "right" if away[0] < -0.3 else "center",
            va="bottom" if away[1] > 0.3 else "top" if away[1] < -0.3 else "center",
            fontsize=9,
            annotation_clip=False,
        )
    ax.margins(0.12)  # room inside the axes for the labels, clear of a colorbar beside them
    columns = run.pair_columns()
    # the trained grid, for orientation; not a table's mixtures of other domains beside a fit
    if (
        run.rank_pairs is not None
        and set(columns) <= set(run.rank_pairs.columns)
        and RankReport.FILE not in of_other_experts(run)
    ):
        grid = simplex_coordinates(run.rank_pairs[columns].to_numpy())
        ax.scatter(grid[:, 0], grid[:, 1], s=12, color="lightgrey", label="grid mixtures", zorder=1)
    points = simplex_coordinates(run.weight_path()) if len(run.weight_path()) else np.empty((0, 2))
    if run.trace is not None and len(points):
        ax.plot(points[:, 0], points[:, 1], "-", lw=1.5, color="tab:blue", label="weights during the fit")
        ax.scatter(*points[0], marker="s", color="tab:blue", zorder=3, label="start")
    elif len(points):
        values = run.evaluations["value"].to_numpy()
        shown = ax.scatter(points[:, 0], points[:, 1], c=values, cmap="viridis_r", s=14, zorder=2)
        ax.figure.colorbar(shown, ax=ax, label="objective value", shrink=0.7, pad=0.08)
    if run.mixture is not None:
        final = simplex_coordinates(run.weights[names].to_numpy())[0]
        ax.scatter(*final, marker="*", s=180, color="tab:red", zorder=4, label="recommended")
    ax.set_aspect("equal")
    ax.axis("off")
    title = "weights on the simplex" + ("" if len(names) == 3 else f" (projection of {len(names)} experts)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    return ax


def plot_proxy_vs_truth(run: Run, metric: str | None = None, ax=None):
    """The merged proxy's score against the trained run's, one point per grid mixture.

    ``metric`` defaults to the report's headline one: ``target`` for a grid, ``mean`` for two
    tables (which have no target)."""
    if run.rank_pairs is None or run.rank is None:
        raise UserError(f"{run.path}: no rank check ({RANK_PAIRS} and rank_report.json)")
    metric = metric or run.rank.get("overall") or "mean"
    if f"proxy_{metric}" not in run.rank_pairs.columns:
        known = sorted(c[6:] for c in run.rank_pairs.columns if c.startswith("proxy_"))
        raise UserError(f"metric {metric!r} was not ranked; known: {', '.join(known)}")
    ax = _axes(ax, (5, 4))
    x, y = run.rank_pairs[f"proxy_{metric}"], run.rank_pairs[f"truth_{metric}"]
    ax.scatter(x, y, s=18)
    s = run.rank["metrics"].get(metric)
    if s is None:
        raise UserError(f"{run.path}: rank_report.json has no statistics of {metric!r} (rank_pairs.csv has)")
    # a metric constant over the mixtures ranks nothing: its correlations are null (n/a)
    spearman, kendall = format_number(s["spearman"]), format_number(s["kendall"])
    ax.set_title(f"{metric}: Spearman {spearman}, Kendall {kendall}", fontsize=10)
    ax.set_xlabel("merged proxy")
    ax.set_ylabel("trained on the mixture")
    ax.grid(alpha=0.3)
    return ax
