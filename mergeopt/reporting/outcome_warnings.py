"""The warnings a finished fit gives on its outcome, as one line each: a NaN or Inf that stopped it,
closing evaluations that were not finite, a zero-order search that ended worse than the uniform
mixture or than an expert alone (which only the closing evaluations scored).

The command prints them after its summary (``mergeopt: warning: ...``) and report.md keeps them
under its mixture table, from mixture.json alone, so both say the same words.
"""

from __future__ import annotations

from collections.abc import Sequence


def non_finite_closing_line(labels: Sequence[str]) -> str:
    """Which closing evaluations (the fitted mixture, the uniform one, an expert alone) were NaN or Inf."""
    said = [
        f"the {label} mixture"
        if label in ("fitted", "uniform")
        else f"expert {label.removesuffix(' only')} alone"
        for label in labels
    ]
    return (
        f"the closing evaluation of {', '.join(said)} is not finite (NaN or Inf); mixture.json records null "
        "there. Check the experts, merge.scale and model.compute_dtype"
    )


MORE_SEARCH = {"grid": "a finer lattice: search.grid.divisions", "dirichlet": "search.dirichlet.samples"}


def _missed(mixture: dict, value: float, than: str, init: str) -> str:
    """A zero-order search whose best mixture (``value``) scores worse than a mixture only the report
    scored (``than``: the uniform mixture, an expert alone), which a lattice that misses it or a small
    budget of draws never evaluated: the user must know, and how to search more."""
    strategy = mixture["strategy"]
    start = (
        f", or set weights.init to {init}, which it then evaluates first"
        if strategy in ("grid", "dirichlet", "surrogate")
        else ""
    )
    return (
        f"the {strategy} search's best mixture scores {value:.6g} on the fit part, worse than {than} which the "
        f"search did not evaluate ({mixture['search']['evaluations']} evaluations): search more "
        f"({MORE_SEARCH.get(strategy, 'search.budget')}){start}"
    )


def worse_than_uniform_line(mixture: dict) -> str:
    worse = mixture["search"]["worse_than_uniform"]
    return _missed(
        mixture, worse["value"], f"the uniform mixture's {worse['uniform_value']:.6g},", "the uniform mixture"
    )


def worse_than_expert_line(mixture: dict) -> str:
    """The best mixture may be one domain alone, and the search did not find it."""
    worse = mixture["search"]["worse_than_expert"]
    expert = worse["expert"]
    return _missed(
        mixture,
        worse["value"],
        f"expert {expert} alone, which scores {worse['expert_value']:.6g} and",
        f"{expert} alone",
    )


def warning_lines(mixture: dict) -> list[str]:
    """Every warning a finished fit gives on its outcome, in the order the command prints them
    (and report.md keeps them): a NaN that stopped it, closing evaluations that were not finite, a
    search that ended worse than the uniform mixture or than an expert alone."""
    search, lines = mixture["search"], []
    if (stop := search.get("non_finite")) is not None:
        lines.append(non_finite_line(mixture, stop))
    if labels := search.get("non_finite_closing"):
        lines.append(non_finite_closing_line(labels))
    if "worse_than_uniform" in search:
        lines.append(worse_than_uniform_line(mixture))
    if "worse_than_expert" in search:
        lines.append(worse_than_expert_line(mixture))
    return lines


def non_finite_line(mixture: dict, stop: dict) -> str:
    """Why a fit stopped early on a NaN or Inf, and which mixture it kept instead."""
    search = mixture["search"]
    if mixture["strategy"] == "gradient":
        return (
            f"the fit stopped at step {stop['step']}: the {stop['quantity']} is {stop['value']}; "
            f"mixture.json holds the best finite mixture (step {search['best_step']}). "
            "Lower optim.lr, or check the experts and model.compute_dtype"
        )
    return (
        f"the search stopped at evaluation {stop['evaluation']}: score {stop['score']!r} is {stop['value']} "
        f"there; mixture.json holds the best of the {search['evaluations']} finite evaluations before it. "
        f"{_where_to_look(mixture, stop['score'])}"
    )


def _where_to_look(mixture: dict, score: str) -> str:
    """What to check for a score that was not finite: a custom metric returned it itself (its weights
    are in mixture.json's search.non_finite); any other score comes from the merged model's numbers."""
    terms = (mixture.get("objective") or {}).get("terms") or []
    term = next((t for t in terms if t.get("label") == score), None)
    if term is not None and term.get("kind") == "custom":
        return (
            f"{term['function']} returned it at the mixture mixture.json records under search.non_finite; "
            "check the function there, then the experts and model.compute_dtype"
        )
    return "Check the experts, merge.scale and model.compute_dtype"
