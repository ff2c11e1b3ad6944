"""What a LoRA adapter is once read: per base parameter, factors kept low-rank or a dense update.

A LoRA expert is θ0 + s·B·A on each adapted module (A: r × in, B: out × r), with s = α / r, or
α / √r with rsLoRA. Keeping the factors (:class:`LoraFactors`) is what makes LoRA experts cheap to
hold: K experts of rank r cost K·r·(in + out) numbers per module instead of K·in·out.

What an adapter changes other than by s·B·A on a linear layer is a :class:`DenseUpdate` of one
base parameter, the expert's value of it as a function of θ0, exactly as PEFT's
``merge_and_unload`` forms it:

- DoRA (``use_dora``): W' = m / ‖W + s·B·A‖ · (W + s·B·A), the norm over each output row of a
  linear layer (over each column of an embedding), m the saved ``lora_magnitude_vector``;
- DoRA on an embedding, whose LoRA is E' = E + s·(B·A)ᵀ (``lora_embedding_A`` / ``_B``);
- ``modules_to_save`` and trained biases (``bias: all | lora_only``): the adapter's own copies;
- ``lora_bias``: b' = b + s·b_B;
- ``fan_in_fan_out`` (GPT-2's Conv1D, whose weight is in × out): W' = W + s·(B·A)ᵀ;
- ``trainable_token_indices``: the embedding rows of those tokens replaced by the saved ones;
- ``target_parameters`` (a LoRA of a parameter, not a module: a mixture-of-experts' fused expert
  weights, a router's weight): s·B·A in the parameter's own layout
  (:mod:`mergeopt.loading.lora_parameters`).

How an adapter directory is read into these: :mod:`mergeopt.loading.lora`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ΔW = scaling · b @ a (batched over a fused parameter's experts: a is
    (experts, r, in), b (experts, out, r); :mod:`mergeopt.loading.lora_parameters`)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[-2]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW (out × in, or experts × out × in), for checks and for the dense path only."""
        return self.scaling * (self.b.to(dtype) @ self.a.to(dtype))


@dataclass(frozen=True)
class DenseUpdate:
    """How an adapter sets one base parameter other than by a low-rank sum: the expert's value is
    ``start`` (the adapter's own copy, or θ0), plus ``delta`` (s·B·A made dense, or a LoRA bias
    s·b), then with DoRA rescaled to the norms ``magnitude`` along ``norm_dim`` (1: each output row
    of a linear weight; 0: each column of an embedding)."""

    start: torch.Tensor | None = None
    delta: LoraFactors | torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    norm_dim: int = 1
    # trainable tokens: (their ids, their rows), written over ``start``'s rows
    rows: tuple[torch.Tensor, torch.Tensor] | None = None
    # a LoRA of the parameter itself (target_parameters): ``delta`` is s·b@a in its own layout
    parameter: bool = False

    def value(self, theta0: torch.Tensor) -> torch.Tensor:
        """The expert's tensor, in θ0's dtype (formed in float32 at least)."""
        dtype = torch.promote_types(theta0.dtype, torch.float32)
        weight = (theta0 if self.start is None else self.start.to(theta0.device)).to(dtype)
        if self.rows is not None:
            ids, values = self.rows
            weight = weight.index_copy(0, ids.to(weight.device), values.to(device=weight.device, dtype=dtype))
        if isinstance(self.delta, LoraFactors):
            weight = weight + self.delta.delta(dtype).to(weight.device)
        elif self.delta is not None:
            weight = weight + self.delta.to(device=weight.device, dtype=dtype)
        if self.magnitude is not None:
            norm = torch.linalg.vector_norm(weight, dim=self.norm_dim, keepdim=True)
            shape = (-1, 1) if self.norm_dim == 1 else (1, -1)
            weight = self.magnitude.to(device=weight.device, dtype=dtype).view(shape) / norm * weight
        return weight.to(theta0.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """What the update is made of, to compare two adapters."""
        parts = [self.start, self.magnitude, torch.tensor(float(self.norm_dim)), *(self.rows or ())]
        if isinstance(self.delta, LoraFactors):
            parts += [self.delta.a, self.delta.b, torch.tensor(self.delta.scaling)]
        else:
            parts.append(self.delta)
        return [t for t in parts if t is not None]


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    factors: dict[
        str, LoraFactors
    ]  # base parameter name ('model.layers.0.self_attn.q_proj.weight') -> factors kept low-rank
    # base parameter name -> its update when not a low-rank sum (DoRA, modules_to_save, trained
    # biases, the layer's own saved weight): stacked densely where it is not θ0
    dense: dict[str, DenseUpdate] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def expert_value(self, name: str, theta0: torch.Tensor) -> torch.Tensor:
        """The expert's whole value of base parameter ``name`` (θ0 where the adapter leaves it)."""
        value = theta0.clone() if name not in self.dense else self.dense[name].value(theta0)
        factors = self.factors.get(name)
        if factors is not None:  # out of place: a dense update's value may be the adapter's own copy
            value = value + factors.delta(value.dtype).to(value.device)
        return value
