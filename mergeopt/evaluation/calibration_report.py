"""What ``mergeopt calibrate`` writes: calibration.json's content and the calibrated ranking, formed
from the posterior and the decision (:func:`report`), calibration.md, calibrated_ranking.csv, the
plot, and a mixture.json (with the recipe beside it) for the pick and each proposal, all checked
before the first is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mergeopt.evaluation import calibration
from mergeopt.evaluation.proxy import WEIGHT_PREFIX
from mergeopt.runtime.exact_csv import file_line, line_of

OUTPUT_FILES = ("calibration.json", "calibration.md", "calibrated_ranking.csv", "calibration.png")
SHOWN = 10  # candidates in calibration.md's ranking


def report(
    names: Sequence[str],
    candidates: pd.DataFrame,
    proxy: np.ndarray,
    truth: np.ndarray,
    posterior: calibration.Posterior,
    decision: calibration.Decision,
    meta: dict,
) -> tuple[dict, pd.DataFrame]:
    """calibration.json's content and the ranking table, in the metric's own direction. The first
    ``len(truth)`` candidates are the rows of the grid ``meta["grid"]``, in its order."""
    sign = -1.0 if meta["higher_is_better"] else 1.0
    n_runs = len(truth)
    mean = sign * decision.mean
    ranking = _ranking(names, candidates, proxy, truth, mean, decision)

    def mixture(i: int) -> dict[str, float]:
        row = candidates.iloc[i]
        return {n: float(row[f"{WEIGHT_PREFIX}{n}"]) for n in names}

    low, high = sorted(sign * np.asarray(decision.interval))
    pick = decision.pick
    best_run = int(np.argmax(truth) if meta["higher_is_better"] else np.argmin(truth)) if n_runs else None
    slope, slope_sd = posterior.slope
    content = {
        **meta,
        "runs": n_runs,
        "candidates": len(candidates),
        "model": _gaussian_process(posterior),
        "proxy_slope": {"mean": slope, "sd": slope_sd},
        "pick": {
            "candidate": int(pick),
            "weights": mixture(pick),
            "source": str(candidates["source"].iloc[pick]),
            "predicted": float(mean[pick]),
            "interval": [float(low), float(high)],
            "prob_best": _finite_or_none(decision.prob_best[pick]),
            "proxy": float(proxy[pick]),
            "truth": float(truth[pick]) if pick < n_runs else None,
        },
        "best_run": None
        if best_run is None
        else {
            "row": best_run,
            "line": file_line(meta["grid"], best_run),
            "weights": mixture(best_run),
            "truth": float(truth[best_run]),
        },
        "proposals": [
            {
                "weights": mixture(i),
                "source": str(candidates["source"].iloc[i]),
                "expected_improvement": _finite_or_none(gain),
                "predicted": float(mean[i]),
                "sd": float(decision.sd[i]),
                "proxy": float(proxy[i]),
            }
            for i, gain in zip(decision.proposals, decision.improvement)
        ],
    }
    return content, ranking


def _ranking(
    names: Sequence[str],
    candidates: pd.DataFrame,
    proxy: np.ndarray,
    truth: np.ndarray,
    mean: np.ndarray,
    decision: calibration.Decision,
) -> pd.DataFrame:
    """The candidates from the best calibrated prediction down (``mean``: in the metric's own
    direction), with the proxy, the posterior and the real runs' results (the first ``len(truth)``)."""
    observed = np.full(len(candidates), np.nan)
    observed[: len(truth)] = truth
    order = np.argsort(decision.mean, kind="stable")
    ranking = candidates[[f"{WEIGHT_PREFIX}{n}" for n in names]].copy()
    ranking.insert(0, "source", candidates["source"])
    ranking["allowed"] = candidates["allowed"]
    ranking["proxy"] = proxy
    ranking["calibrated"] = mean
    ranking["sd"] = decision.sd
    ranking["prob_best"] = decision.prob_best
    ranking["truth"] = observed
    ranking = ranking.iloc[order].reset_index(names="candidate")
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    return ranking


def _gaussian_process(posterior: calibration.Posterior) -> dict:
    """The Gaussian process as fitted: its hyperparameters, the proxy's centring and its evidence."""
    return {
        "amplitude": posterior.hyper.amplitude,
        "lengthscale": posterior.hyper.lengthscale,
        "noise": posterior.hyper.noise,
        "slope_prior_sd": posterior.hyper.slope_sd,
        "level_prior_sd": posterior.hyper.level_sd,
        "center": posterior.center,
        "scale": posterior.scale,
        "log_marginal_likelihood": posterior.log_marginal_likelihood(),
    }


NEGLIGIBLE_GAIN = 1e-3  # an expected improvement below this fraction of the proxy's spread is not worth a run


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- the command


def markdown(content: dict, ranking: pd.DataFrame, names: Sequence[str]) -> str:
    arrow = "higher is better" if content["higher_is_better"] else "lower is better"
    pick = content["pick"]
    slope = content["proxy_slope"]
    lines = [
        f"# Calibration: {content['metric']} ({arrow})",
        "",
        f"{content['runs']} real run(s) from `{content['grid']}`; {content['candidates']} candidate mixtures "
        f"scored by the merged proxy{'' if content['use_proxy'] else ' (not used: regression on the runs alone)'}.",
        "",
        f"- **Pick**: {_weights(pick['weights'])}: {content['metric']} {pick['predicted']:.4f} "
        f"[95% {pick['interval'][0]:.4f}, {pick['interval'][1]:.4f}]"
        + (f", P(best) {pick['prob_best']:.2f}" if pick["prob_best"] is not None else "")
        + (f", a run: true {pick['truth']:.4f}" if pick["truth"] is not None else ""),
    ]
    if content["best_run"] is not None:
        best = content["best_run"]
        lines.append(
            f"- Best run so far: {line_of(content['grid'], best['line'])}, {_weights(best['weights'])}: "
            f"{best['truth']:.4f}"
        )
    if content["use_proxy"]:
        lines.append(
            f"- Trust in the proxy (its slope; 1 = its differences are the truth's, 0 = ignored): "
            f"{slope['mean']:.2f} ± {slope['sd']:.2f}"
        )
    lines += ["", "## Train next", ""]
    gains = [p["expected_improvement"] for p in content["proposals"]]
    scale = content["model"]["scale"]  # the proxy's spread over the candidates, in the metric's units
    if gains and None not in gains and max(gains) < NEGLIGIBLE_GAIN * scale:
        lines += [
            f"No candidate is expected to beat the best run by {NEGLIGIBLE_GAIN:.1%} of the proxy's spread "
            f"over the candidates ({scale:.4g}); the largest expected improvement is {max(gains):.3g}. "
            "The best run so far is likely the best mixture; the runs below are the most promising left, "
            "unlikely to beat it.",
            "",
        ]
    for i, p in enumerate(content["proposals"], 1):
        gain = p["expected_improvement"]
        why = "the proxy's pick (no run yet)" if gain is None else f"expected improvement {gain:.4g}"
        lines.append(
            f"{i}. {_weights(p['weights'])}: predicted {p['predicted']:.4f} ± {p['sd']:.4f}, {why}; "
            f"`mergeopt export {content['out']}/next-{i} --to FORMAT`"
        )
    lines += [
        "",
        "Then append each run's row to the grid (its w_ and truth columns) and rerun `mergeopt calibrate`.",
        "",
        f"## Calibrated ranking (top {min(SHOWN, len(ranking))} of {len(ranking)})",
        "",
        "| rank | " + " | ".join(names) + " | proxy | calibrated [95%] | P(best) | true | source |",
        "| ---: |" + " ---: |" * len(names) + " ---: | --- | ---: | ---: | --- |",
    ]
    for _, row in ranking.head(SHOWN).iterrows():
        cells = [f"{row[f'{WEIGHT_PREFIX}{n}']:.3f}" for n in names]
        half = 1.96 * row["sd"]
        prob = "n/a" if np.isnan(row["prob_best"]) else f"{row['prob_best']:.2f}"
        true = "" if np.isnan(row["truth"]) else f"{row['truth']:.4f}"
        lines.append(
            f"| {row['rank']} | " + " | ".join(cells) + f" | {row['proxy']:.4f} | {row['calibrated']:.4f} "
            f"[{row['calibrated'] - half:.4f}, {row['calibrated'] + half:.4f}] | {prob} | {true} | {row['source']} |"
        )
    return "\n".join(lines) + "\n"


def _weights(weights: dict[str, float]) -> str:
    return ", ".join(f"{n} {w:.3f}" for n, w in weights.items())


def plot(ranking: pd.DataFrame, content: dict, path: Path) -> Path:
    """Left: each candidate's calibrated value against its proxy value, the runs' truth beside it.
    Right: the top candidates' calibrated values with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from mergeopt.runtime.files import save_figure_atomic

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    runs = ranking["truth"].notna()
    left.scatter(ranking["proxy"], ranking["calibrated"], s=8, alpha=0.5, label="candidates (calibrated)")
    left.scatter(ranking["proxy"][runs], ranking["truth"][runs], s=24, color="C3", label="runs (true)")
    pick = ranking[ranking["candidate"] == content["pick"]["candidate"]].iloc[0]
    left.scatter([pick["proxy"]], [pick["calibrated"]], marker="*", s=160, color="C2", label="pick")
    left.set_xlabel(f"merged proxy: {content['metric']}")
    left.set_ylabel(f"calibrated / true: {content['metric']}")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    top = ranking.head(SHOWN)
    y = np.arange(len(top))[::-1]
    right.errorbar(top["calibrated"], y, xerr=1.96 * top["sd"], fmt="o", ms=4, capsize=2)
    right.scatter(top["truth"], y, color="C3", s=20, zorder=3)
    right.set_yticks(y)
    right.set_yticklabels([f"#{r} ({s})" for r, s in zip(top["rank"], top["source"])], fontsize=7)
    right.set_xlabel(f"calibrated {content['metric']}, 95% interval (red: a run's truth)")
    right.grid(alpha=0.3)
    fig.suptitle(f"mergeopt calibrate: {content['runs']} run(s)", fontsize=10)
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def mixture_record(
    weights: dict[str, float], role: str, entry: dict, content: dict, base: dict, groups=None
) -> dict:
    """A mixture.json for the pick or a proposal, so ``mergeopt export`` and ``mergeopt merge`` read it;
    with the recipe's ``groups`` (:class:`mergeopt.merging.groups.Groups`) both levels of the weights."""
    from mergeopt.run_files import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "weights": weights,
        **({} if groups is None else {"groups": groups.record([weights[n] for n in groups.names])}),
        **base,
        "strategy": "calibrate",
        "calibration": {
            "role": role,
            "grid": content["grid"],
            "metric": content["metric"],
            "runs": content["runs"],
            **{k: v for k, v in entry.items() if k != "weights"},
        },
    }


def write_outputs(out: Path, content: dict, ranking: pd.DataFrame, names: Sequence[str], recipe, base: dict):
    """Every file checked (the typed models) before the first is written; the JSON goes last.

    ``out`` is a staging directory the caller publishes (:mod:`mergeopt.runtime.rundir`): an
    earlier round's pick/ and next-*/ are replaced whole, never left beside this round's.
    """
    from mergeopt.config import recipe_to_yaml
    from mergeopt.merging.groups import groups_of
    from mergeopt.run_files import SCHEMA_VERSION, CalibrationReport, MixtureFile
    from mergeopt.runtime.files import write_csv_atomic, write_json_atomic, write_text_atomic

    record = CalibrationReport.model_validate({"schema_version": SCHEMA_VERSION, **content}).to_json()
    groups = groups_of(names, recipe.weights.groups)
    pick = content["pick"]
    mixtures = {"pick": mixture_record(pick["weights"], "pick", pick, content, base, groups)}
    for i, proposal in enumerate(content["proposals"], 1):
        mixtures[f"next-{i}"] = mixture_record(proposal["weights"], "next", proposal, content, base, groups)
    mixtures = {name: MixtureFile.model_validate(m).to_json() for name, m in mixtures.items()}
    text = recipe_to_yaml(recipe, absolute_paths=True)
    for name, data in mixtures.items():
        (out / name).mkdir(exist_ok=True)
        write_text_atomic(out / name / "recipe.yaml", text)
        write_json_atomic(out / name / "mixture.json", data)
    write_csv_atomic(out / "calibrated_ranking.csv", ranking.to_dict("records"), list(ranking.columns))
    write_text_atomic(out / "calibration.md", markdown(content, ranking, names))
    plot(ranking, content, out / "calibration.png")
    write_json_atomic(out / "calibration.json", record)
