"""A custom objective term for the resume tests: a real, deterministic score of the mixture.

Its value depends on the merged weights (the mean of the first parameter), so a resumed search
that replayed it wrongly would log other numbers than an uninterrupted one.
"""

from __future__ import annotations

import torch


def weight_mean(model: torch.nn.Module, tokenizer, records) -> float:
    return float(next(model.parameters()).detach().double().mean())
