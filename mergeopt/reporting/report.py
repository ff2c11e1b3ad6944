"""What a person looks at after a run: the loss-curve figure, the closing terminal summary, Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergeopt.runtime.files import save_figure_atomic


def plot_loss_curve(
    trace: Sequence[Mapping], expert_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Two panels sharing the step axis: the losses, and the mixture weights as they move."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in trace]
    fig, (ax_loss, ax_w) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 2])
    train = [(r["step"], r["loss"]) for r in trace if not math.isnan(r["loss"])]
    held = [(r["step"], r["heldout_loss"]) for r in trace if not math.isnan(r["heldout_loss"])]
    if train:
        ax_loss.plot(*zip(*train), lw=1, alpha=0.6, label="dev loss (training batches)")
    if held:
        ax_loss.plot(*zip(*held), "o-", ms=3, label="held-out dev loss")
        best = min(held, key=lambda p: p[1])
        ax_loss.axvline(best[0], color="grey", ls=":", lw=1)
        ax_loss.annotate(
            f"best {best[1]:.4f} @ step {best[0]}",
            best,
            textcoords="offset points",
            xytext=(5, 8),
            fontsize=8,
        )
    ax_loss.set_ylabel("mean token cross-entropy")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    if title:
        ax_loss.set_title(title)
    for name in expert_names:
        ax_w.plot(steps, [r[f"w_{name}"] for r in trace], label=name)
    return _finish_weights_panel(fig, ax_w, expert_names, "optimizer step", "mixture weight w", path)


def _finish_weights_panel(fig, ax_w, expert_names, xlabel: str, ylabel: str, path) -> Path:
    """Label the weights panel and save the figure atomically."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax_w.set_ylim(0, 1)
    ax_w.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and evaluations are counted
    ax_w.set_xlabel(xlabel)
    ax_w.set_ylabel(ylabel)
    ax_w.legend(fontsize=8, ncol=min(4, len(expert_names)))
    ax_w.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_search_curve(
    rows: Sequence[Mapping], expert_names: Sequence[str], path: str | Path, value_label: str, title: str = ""
) -> Path:
    """Zero-order search at a glance: every evaluation's value and the best so far, and the best w."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # numbered as evaluations.csv, open_run's plot_losses and the trackers' steps number them
    index = [int(r["index"]) for r in rows] if all("index" in r for r in rows) else list(range(len(rows)))
    values = [r["value"] for r in rows]
    best_rows, best = [], None
    for r in rows:
        if best is None or r["value"] < best["value"]:
            best = r
        best_rows.append(best)
    fig, (ax_v, ax_w) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 2])
    ax_v.plot(index, values, ".", ms=4, alpha=0.5, label="evaluation")
    ax_v.plot(index, [b["value"] for b in best_rows], "-", lw=1.5, label="best so far")
    ax_v.set_ylabel(value_label)
    ax_v.legend(fontsize=8)
    ax_v.grid(alpha=0.3)
    if title:
        ax_v.set_title(title)
    for name in expert_names:
        ax_w.step(index, [b[f"w_{name}"] for b in best_rows], where="post", label=name)
    xlabel = "evaluation (evaluations.csv's index; a full pass over the dev sets)"
    return _finish_weights_panel(fig, ax_w, expert_names, xlabel, "best mixture so far", path)


def _bar(value: float, width: int = 30) -> str:
    return "█" * round(max(0.0, min(1.0, value)) * width)


def four_places(value: float | None) -> str:
    """A loss or score to four places; null in mixture.json (NaN in a table read from it) is a
    closing evaluation that was NaN or Inf."""
    return "not finite" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _score_table(scores: Mapping, width: int) -> list[str]:
    """Objective terms of the fitted, uniform and single-expert mixtures: fit part / held-out part."""
    labels = list(next(iter(scores.values()))["fit"])
    col = max(17, *(len(label) for label in labels))
    lines = [f"  {'objective terms':<{width}}  " + "  ".join(f"{label:>{col}}" for label in labels)]
    any_heldout = any(parts["heldout"] for parts in scores.values())
    lines.append(f"  {'(fit / held-out)' if any_heldout else '(fit)':<{width}}")

    for row, parts in scores.items():
        cells = []
        for label in labels:
            held = parts["heldout"]
            cell = four_places(parts["fit"][label]) + (f" / {four_places(held[label])}" if held else "")
            cells.append(f"{cell:>{col}}")
        lines.append(f"  {row:<{width}}  " + "  ".join(cells))
    return lines


def loss_terms_weighed(mixture: Mapping) -> list[str] | None:
    """The labels of an objective made of losses that is not ``data.target``'s loss alone, else None.

    Why: a run's dev loss weighs the sets as such an objective does (``reported_set_weights``), so
    calling it the target's (``all`` by default) would name sets weighed otherwise.
    """
    terms = (mixture.get("objective") or {}).get("terms") or []
    if not terms or any(t["kind"] != "loss" for t in terms):
        return None
    if len(terms) == 1 and terms[0]["dev"] == mixture["target"]:
        return None
    return _labels(terms)


def _labels(terms: Sequence[Mapping]) -> list[str]:
    """Each term's label, with its weight where it is not 1."""
    return [t["label"] if t.get("weight", 1.0) == 1.0 else f"{t['label']} ×{t['weight']:g}" for t in terms]


def summary(mixture: Mapping, output_dir: str | Path, files: Sequence[str]) -> str:
    """The closing text: the mixture as a table, and its dev loss against the uniform and single experts."""
    weights = mixture["weights"]
    width = max(len("uniform mixture"), *(len(n) + 5 for n in weights))
    search = mixture["search"]
    losses = loss_terms_weighed(mixture)
    aim = f"objective: {', '.join(losses)}" if losses else f"target: {mixture['target']}"
    if mixture["strategy"] == "gradient":
        # the weights are the best evaluated step's, early stop or not: say which
        stop = ", early stop" if search["stopped_early"] else ""
        best = f", best at step {search['best_step']}" if search.get("best_step") is not None else ""
        how = f"{aim}, gradient, {search['steps']} steps{stop}{best}"
    else:
        terms = mixture["objective"]["terms"]
        if any(t["kind"] != "loss" for t in terms):  # what the search scored: every term
            aim = f"objective: {', '.join(_labels(terms))}"
        # the target's loss alone is said as the gradient fit says it (it said 'objective: loss:all')
        how = f"{aim}, {mixture['strategy']} search, {search['evaluations']} evaluations"
    unit = mixture.get("unit")  # absent in files from before it was recorded
    shares = f" in {unit[:-1]} shares" if unit else ""
    lines = ["", f"Recommended mixture{shares} ({how})", ""]
    lines.append(f"  {'expert':<{width}}  {'weight':>7}")
    for name, w in sorted(weights.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<{width}}  {w:7.4f}  {_bar(w)}")
    has_heldout = mixture.get("heldout_loss") is not None
    loss_name = "dev loss (objective)" if losses else "dev loss (target)"
    lines += [
        "",
        f"  {loss_name:<{width}}  {'all dev':>9}" + (f"  {'held-out':>9}" if has_heldout else ""),
    ]

    def row(label: str, dev: float | None, held: float | None, ref: float | None) -> str:
        if dev is None:  # recorded as null: NaN or Inf in the closing evaluation
            return f"  {label:<{width}}  {'not finite':>9}"
        # rounded first, so a gap below the last digit reads +0.0000, not -0.0000
        delta = "" if ref is None else f"   {round(dev - ref, 4) + 0.0:+.4f} vs fitted"
        held_txt = f"  {held:9.4f}" if has_heldout and held is not None else ""
        return f"  {label:<{width}}  {dev:9.4f}{held_txt}{delta}"

    fitted = mixture["dev_loss"]
    lines.append(row("fitted mixture", fitted, mixture.get("heldout_loss"), None))
    lines.append(
        row("uniform mixture", mixture["uniform_dev_loss"], mixture.get("uniform_heldout_loss"), fitted)
    )
    for name, loss in mixture["expert_dev_loss"].items():
        lines.append(row(f"{name} only", loss, mixture.get("expert_heldout_loss", {}).get(name), fitted))
    if "scores" in mixture["objective"] and any(t["kind"] != "loss" for t in mixture["objective"]["terms"]):
        lines += ["", *_score_table(mixture["objective"]["scores"], width)]
    if "rank" in mixture:
        r = mixture["rank"]
        lines += [
            "",
            f"Proxy vs {r['n_mixtures']} trained mixtures ({r['grid']}): Spearman {r['spearman']:.3f}, "
            f"Kendall {r['kendall']:.3f}, regret of the proxy's pick {r['regret']:.3f}, "
            f"regret of the fitted mixture (nearest grid point) {r['fitted_regret']:.3f}",
        ]
    lines += ["", f"Wrote {', '.join(files)} to {output_dir}"]
    return "\n".join(lines)


def markdown_table(frame, digits: int = 4) -> str:
    """A DataFrame as a Markdown table (no tabulate dependency)."""
    header = ["", *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in frame.iterrows():
        cells = [
            "" if v is None or v != v else f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row
        ]
        lines.append("| " + " | ".join([str(label), *cells]) + " |")
    return "\n".join(lines)
