"""diagnose.json's numbers for people: diagnose.md, three figures, and the Diagnostics section of report.md.

Written by ``mergeopt diagnose`` into a run directory (the recipe's output_dir unless --out says
otherwise); report.md gains the section whenever diagnose.json is there, so a fit after a
diagnose (or a diagnose after a fit) shows both on one page. Built from the DiagnoseFile alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mergeopt.reporting.report import markdown_table
from mergeopt.run_files import DiagnoseFile
from mergeopt.runtime.files import save_figure_atomic, write_json_atomic, write_text_atomic

MARKDOWN = "diagnose.md"
NORMS = "diagnose_norms.png"
COSINES = "diagnose_cosines.png"
EDGES = "diagnose_edges.png"
FILES = (DiagnoseFile.FILE, MARKDOWN, NORMS, COSINES, EDGES)
TARGET = "target"


def expert_table(record: DiagnoseFile) -> pd.DataFrame:
    """Per expert: ‖τ‖/‖θ0‖, target loss alone, its gain over θ0 and its share of the target gain."""
    tv, losses = record.task_vectors, record.losses
    rows = {
        name: {
            "‖τ‖/‖θ0‖": tv.relative_norm[name],
            "target loss": losses.experts[name][TARGET],
            "gain over θ0": losses.improvement[name][TARGET],
            "share of gain": losses.share[name][TARGET],
        }
        for name in record.experts
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def edge_table(record: DiagnoseFile) -> pd.DataFrame:
    rows = {
        f"{e.experts[0]}–{e.experts[1]}": {
            "barrier": e.barrier,
            "of the loss": e.relative_barrier,
            "convex": "yes" if e.convex else "no",
            "midpoint loss": e.target[len(e.target) // 2],
        }
        for e in record.edges
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def _flag_lines(record: DiagnoseFile) -> list[str]:
    if not record.flags:
        return [
            "No flags: nothing measured here is known to degrade the proxy (thresholds are heuristics).",
            "",
        ]
    return [*(f"- **{f.kind}**: {f.message}" for f in record.flags), ""]


def _elected_note(record: DiagnoseFile) -> str:
    """Why a TIES merge shows no sign conflict: its vectors are measured after the sign election.

    Why: diagnose reads the vectors the proxy merges, and under ties or dare_ties those keep only the
    elected sign, so a rate of 0 says nothing of the experts; the linear merge's vectors do.
    """
    if record.method["name"] not in ("ties", "dare_ties"):
        return ""
    return (
        f" The {record.method['name']} vectors are measured after TIES's sign election, so nothing conflicts by "
        "construction; diagnose with merge.method=linear for the experts' own conflicts."
    )


def markdown(record: DiagnoseFile) -> str:
    """diagnose.md: flags first, then the tables and figures."""
    tv = record.task_vectors
    names = record.experts
    cosines = pd.DataFrame(tv.cosine, index=names, columns=names)
    share = pd.DataFrame(record.losses.share).T[[TARGET, *record.dev_sets]]
    conflicts = tv.sign_conflicts
    rate = "undefined (nothing contested)" if conflicts.rate is None else f"{conflicts.rate:.3f}"
    lines = [
        f"# mergeopt diagnose: {len(names)} experts, merge {record.method['name']}",
        "",
        "## Flags",
        "",
        *_flag_lines(record),
        "## Experts",
        "",
        f"Base target loss (θ0): {record.losses.base[TARGET]:.4f}. Norms are of the {tv.vectors} over "
        f"{tv.entries:,} merged entries (‖θ0‖ = {tv.base_norm:.4g}), as the {record.stack_dtype} stack holds them.",
        "",
        markdown_table(expert_table(record)),
        "",
        f"![relative task-vector norm per layer]({NORMS})",
        "",
        "## Task vectors",
        "",
        f"TIES sign conflicts at density {conflicts.density:g}: {conflicts.conflicting:,} of "
        f"{conflicts.contested:,} contested entries, rate {rate}.{_elected_note(record)}",
        "",
        "Cosines between task vectors:",
        "",
        markdown_table(cosines, 3),
        "",
        f"![cosines between task vectors]({COSINES})",
        "",
        "## Edges",
        "",
        f"Target dev loss at {record.points} points from one expert to the other; barrier is the height "
        "above the straight line, 'of the loss' the height over the experts' mean loss.",
        "",
        markdown_table(edge_table(record)),
        "",
        f"![loss along each edge]({EDGES})",
        "",
        "## Share of the dev-loss improvement",
        "",
        "Of the gains over θ0 the experts make alone on each dev set, the share each one makes.",
        "",
        markdown_table(share, 3),
        "",
    ]
    return "\n".join(lines)


def report_section(record: DiagnoseFile, directory: Path) -> list[str]:
    """report.md's Diagnostics section: the flags and the experts' table, the figures there are."""
    lines = ["## Diagnostics", "", *_flag_lines(record), markdown_table(expert_table(record)), ""]
    for figure, caption in ((NORMS, "relative task-vector norm per layer"), (EDGES, "loss along each edge")):
        if (directory / figure).is_file():
            lines += [f"![{caption}]({figure})", ""]
    return [*lines, f"Everything `mergeopt diagnose` measured: [{MARKDOWN}]({MARKDOWN}).", ""]


def short_layer(layer: str) -> str:
    """``model.layers.3`` -> ``layers.3``, ``model.embed_tokens`` -> ``embed_tokens``."""
    parts = layer.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def plot_norms(record: DiagnoseFile, ax):
    layers = np.arange(len(record.layers))
    for name in record.experts:
        values = [np.nan if v is None else v for v in record.task_vectors.relative_norm_per_layer[name]]
        ax.plot(layers, values, marker="o", markersize=3, label=name)
    labels = [short_layer(layer) for layer in record.layers]
    ax.set_xticks(layers, labels, rotation=90, fontsize=7)
    ax.set_ylabel("‖τ‖ / ‖θ0‖ within the layer")
    ax.set_title("task-vector norm per layer, relative to the base")
    ax.legend(fontsize=8)
    return ax


def plot_cosines(record: DiagnoseFile, ax):
    names = record.experts
    matrix = np.array([[np.nan if v is None else v for v in row] for row in record.task_vectors.cosine])
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if matrix[i, j] == matrix[i, j]:
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.figure.colorbar(image, ax=ax, label="cos(τ_i, τ_j)")
    ax.set_title("cosines between task vectors")
    return ax


def plot_edges(record: DiagnoseFile, ax):
    for edge in record.edges:
        ax.plot(edge.t, edge.target, marker="o", markersize=3, label=f"{edge.experts[0]} → {edge.experts[1]}")
    ax.axhline(record.losses.base[TARGET], color="grey", linestyle=":", label="θ0")
    ax.set_xlabel("t: w = (1 − t) e_i + t e_j")
    ax.set_ylabel("target dev loss")
    ax.set_title("loss along each edge between two experts")
    ax.legend(fontsize=7)
    return ax


def write_diagnostics(record: DiagnoseFile, directory: str | Path) -> tuple[str, ...]:
    """diagnose.json, diagnose.md and the figures into ``directory``; returns their names (the
    caller rewrites report.md, :func:`mergeopt.reporting.run_report.write_report`, which reads them)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw, size in (
        (NORMS, plot_norms, (max(6.0, 0.25 * len(record.layers)), 4.0)),
        (COSINES, plot_cosines, (5.5, 4.5)),
        (EDGES, plot_edges, (6.5, 4.5)),
    ):
        fig, ax = plt.subplots(figsize=size)
        try:
            draw(record, ax)
            fig.tight_layout()
            save_figure_atomic(fig, out / name)
        finally:
            plt.close(fig)
    write_text_atomic(out / MARKDOWN, markdown(record))
    write_json_atomic(out / DiagnoseFile.FILE, record.to_json())
    return FILES
