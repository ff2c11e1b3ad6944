"""Export a fitted mixture to training frameworks: ``mergeopt export MIXTURE.json --to FORMAT``.

A fit answers "which mixture"; the answer is only useful once a trainer can read it, and each
trainer reads mixtures differently (per-sample probabilities, token-share weights, per-dataset
fractions, absolute counts). This package keeps those differences in one place:
:mod:`~mergeopt.export.mixture_input` checks mixture.json and ``--datasets``,
:mod:`~mergeopt.export.token_stats` measures mean tokens per sample,
:mod:`~mergeopt.export.shares` converts shares and budgets, and :mod:`~mergeopt.export.formats`
holds one small renderer per framework in a registry keyed by ``--to``'s name.
"""

from __future__ import annotations

from mergeopt.export.formats import FORMATS, Context, Format
from mergeopt.export.mixture_input import Mixture, read_mixture
from mergeopt.export.shares import Plan, make_plan

__all__ = ["FORMATS", "Context", "Format", "Mixture", "Plan", "make_plan", "read_mixture"]
