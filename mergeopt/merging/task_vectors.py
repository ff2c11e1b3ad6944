"""Task vectors τ_i = θ_i − θ0 read back from a stack that holds θ0 as its last expert: norms, cosines,
sign conflicts, per layer.

The stack keeps no θ0 (on the simplex it drops out, see :mod:`mergeopt.merging.stack`), so
``mergeopt diagnose`` stacks the base as one more expert, last (``build_expert_stack(...,
base_expert=BASE_EXPERT)``). Then for every stacked parameter, with rows δ_k = θ_k − θ_1 (δ_1 = 0)
and the base's row δ_b = θ0 − θ_1, the task vectors and the base are

    τ_k = δ_k − δ_b,   θ0 = anchor + δ_b

(with another merge method the rows are λ(τ'_k − τ'_1), so the same subtraction gives λτ'_k: the
*prepared* vectors that method merges, and λ is divided out). The numbers therefore describe the
vectors as the proxy stores them: an int8 or bfloat16 stack's rounding is in them. LoRA experts
kept low-rank add s_i B_i A_i to their τ_i; that product is formed one module at a time and freed
(the sign conflicts need every entry, so the exact factor identities for norms would save little).

One parameter is processed at a time, K dense copies of it, and the sums run in float64 over
column chunks, so the cost is what stacking one parameter costs, never a copy of the model.
Everything is accumulated per *layer*: the parameters of one transformer block share a layer
(the name up to its first numeric part, ``model.layers.3``); any other parameter is its own layer
(``model.embed_tokens``, ``lm_head``). Parameters the recipe excludes are not merged and not
counted; parameters no expert changes count in ‖θ0‖ with τ = 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from mergeopt.merging.int8_rows import dequantize_rows
from mergeopt.merging.methods.ties import trim
from mergeopt.merging.stack import TaskVectorStack

BASE_EXPERT = "__theta0__"  # the base, stacked as the last expert (a name no recipe may use)
CHUNK = 1 << 20  # entries per float64 chunk: counts and sums stay exact and the temporaries small
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; ``lm_head.weight`` -> ``lm_head``."""
    match = _BLOCK.match(name)
    return match.group(1) if match else name.rpartition(".")[0] or name


def sign_counts(task_vectors: torch.Tensor, density: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The TIES sign conflicts of one parameter's (K, n) task vectors.

    Each τ_i is first trimmed to its ``int(density · n)`` largest magnitudes, exactly as TIES trims
    (:func:`mergeopt.merging.methods.ties.trim`); an entry is *active* in expert i when its trimmed
    value is non-zero. An entry is *contested* when at least two experts are active in it, and
    *conflicting* when among them some are positive and some negative (it is where TIES's sign
    election throws a value away). Returns (contested, conflicting, both, opposite) where
    ``both[i, j]`` counts entries active in i and in j and ``opposite[i, j]`` those of them with
    opposite signs (``both[i, i]`` is i's active count).
    """
    trimmed = trim(task_vectors, density)
    k = trimmed.shape[0]
    contested = conflicting = 0
    both = np.zeros((k, k), dtype=np.int64)
    opposite = np.zeros((k, k), dtype=np.int64)
    for start in range(0, trimmed.shape[1], CHUNK):
        chunk = trimmed[:, start : start + CHUNK]
        positive, negative = chunk > 0, chunk < 0
        contested += int(((positive | negative).sum(dim=0) >= 2).sum())
        conflicting += int((positive.any(dim=0) & negative.any(dim=0)).sum())
        p, q = positive.double(), negative.double()
        a = p + q
        both += (a @ a.T).round().long().cpu().numpy()
        opposite += (p @ q.T + q @ p.T).round().long().cpu().numpy()
    return contested, conflicting, both, opposite


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, math.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass
class TaskVectorStats:
    """Sums over the merged parameters, per layer; the derived numbers are properties (NaN: undefined)."""

    experts: list[str]
    density: float
    layers: list[str] = field(default_factory=list)
    gram: list[np.ndarray] = field(default_factory=list)  # per layer (K, K): ⟨τ_i, τ_j⟩
    base_sq: list[float] = field(default_factory=list)  # per layer: ‖θ0‖²
    contested: list[int] = field(default_factory=list)  # per layer
    conflicting: list[int] = field(default_factory=list)  # per layer
    both: np.ndarray | None = None  # (K, K) entries active in i and j, the whole model
    opposite: np.ndarray | None = None  # (K, K) of them with opposite signs
    entries: int = 0  # merged parameter entries counted

    def __post_init__(self) -> None:
        k = len(self.experts)
        self.both = np.zeros((k, k), dtype=np.int64) if self.both is None else self.both
        self.opposite = np.zeros((k, k), dtype=np.int64) if self.opposite is None else self.opposite

    def _layer(self, name: str) -> int:
        layer = layer_of(name)
        if layer not in self.layers:
            k = len(self.experts)
            self.layers.append(layer)
            self.gram.append(np.zeros((k, k)))
            self.base_sq.append(0.0)
            self.contested.append(0)
            self.conflicting.append(0)
        return self.layers.index(layer)

    def add(self, name: str, theta0: torch.Tensor, task_vectors: torch.Tensor | None) -> None:
        """Count one parameter: θ0 flattened (n,), its (K, n) task vectors (None: all zero)."""
        i = self._layer(name)
        self.entries += theta0.numel()
        for start in range(0, theta0.numel(), CHUNK):
            self.base_sq[i] += float(theta0[start : start + CHUNK].double().square().sum())
        if task_vectors is None:
            return
        for start in range(0, task_vectors.shape[1], CHUNK):
            t = task_vectors[:, start : start + CHUNK].double()
            self.gram[i] += (t @ t.T).cpu().numpy()
        contested, conflicting, both, opposite = sign_counts(task_vectors, self.density)
        self.contested[i] += contested
        self.conflicting[i] += conflicting
        self.both += both
        self.opposite += opposite

    # -- derived -------------------------------------------------------------------------------
    @property
    def total_gram(self) -> np.ndarray:
        return np.sum(self.gram, axis=0) if self.gram else np.zeros((len(self.experts),) * 2)

    @property
    def norms(self) -> np.ndarray:
        """‖τ_i‖ over the whole model."""
        return np.sqrt(np.clip(np.diag(self.total_gram), 0, None))

    @property
    def base_norm(self) -> float:
        return math.sqrt(sum(self.base_sq))

    @property
    def relative_norms(self) -> np.ndarray:
        """‖τ_i‖ / ‖θ0‖ over the whole model."""
        return _ratio(self.norms, np.full(len(self.experts), self.base_norm))

    @property
    def relative_norms_per_layer(self) -> np.ndarray:
        """(L, K): ‖τ_i restricted to the layer‖ / ‖θ0 restricted to the layer‖."""
        norms = np.sqrt(np.clip([np.diag(g) for g in self.gram], 0, None)).reshape(len(self.layers), -1)
        return _ratio(norms, np.sqrt(np.asarray(self.base_sq))[:, None])

    @staticmethod
    def _cosines(gram: np.ndarray) -> np.ndarray:
        norms = np.sqrt(np.clip(np.diag(gram), 0, None))
        return np.clip(_ratio(gram, np.outer(norms, norms)), -1.0, 1.0)

    @property
    def cosines(self) -> np.ndarray:
        """(K, K) cos(τ_i, τ_j) over the whole model."""
        return self._cosines(self.total_gram)

    @property
    def cosines_per_layer(self) -> np.ndarray:
        """(L, K, K) the same within each layer."""
        return np.array([self._cosines(g) for g in self.gram]).reshape(
            len(self.layers), *(2 * [len(self.experts)])
        )

    @property
    def conflict_rate(self) -> float:
        """Conflicting entries / contested entries (see :func:`sign_counts`), the whole model."""
        return float(_ratio(sum(self.conflicting), sum(self.contested)))

    @property
    def conflict_rate_per_layer(self) -> np.ndarray:
        return _ratio(self.conflicting, self.contested)

    @property
    def pairwise_conflict_rate(self) -> np.ndarray:
        """(K, K): among entries active in both i and j, the share with opposite signs (diagonal NaN)."""
        rate = _ratio(self.opposite, self.both)
        np.fill_diagonal(rate, math.nan)
        return rate


def _stacked(stack: TaskVectorStack, name: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ0 (n,), τ (K, n)) of one stacked parameter, in float32 (see the module docstring)."""
    rows = stack.deltas[name]
    scales = stack.scales.get(name)
    rows = dequantize_rows(rows, scales) if scales is not None else rows.float()
    rows = rows.reshape(rows.shape[0], -1)
    base_row = rows[-1]
    theta0 = stack.anchor[name].float().reshape(-1) + base_row
    tau = torch.cat([-base_row[None], rows[:-1] - base_row]).div_(scale)
    return theta0, tau


def _model_order(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> its place in the model (a merged parameter under its own name)."""
    names = (
        n.replace(".parametrizations.", ".").removesuffix(".original") for n, _ in model.named_parameters()
    )
    return {n: i for i, n in enumerate(names)}


def task_vector_stats(
    stack: TaskVectorStack, density: float, base_expert: str = BASE_EXPERT
) -> TaskVectorStats:
    """Norms, cosines and sign conflicts of the recipe's experts' task vectors, streamed from a stack
    built with ``base_expert`` (θ0 stacked last). ``density``: the TIES trim for the sign conflicts.
    """
    if stack.expert_names[-1:] != [base_expert]:
        raise ValueError(
            f"the stack's last expert must be the base ({base_expert!r}): build it with base_expert"
        )
    if stack.shard is not None:
        raise ValueError("a sharded stack: task vectors are read from a whole stack")
    experts = stack.expert_names[:-1]
    scale = float(stack.method.get("scale", 1.0))
    lowrank = stack.lowrank.modules if stack.lowrank is not None else {}
    adapted = {f"{module}.weight": factors for module, factors in lowrank.items()}
    names = {*stack.deltas, *stack.unchanged, *adapted}  # no 'shared' ones: θ0 is an expert
    order = _model_order(stack.model)
    stats = TaskVectorStats(list(experts), density)
    for name in sorted(names, key=lambda n: order.get(n, len(order))):
        if name in stack.deltas:
            theta0, tau = _stacked(stack, name, scale)
        else:  # no expert's dense weights change it: θ0 is the model's own value
            theta0, tau = stack.model.get_parameter(name).detach().float().reshape(-1), None
        factors = adapted.get(name)
        if factors is not None:  # LoRA experts kept low-rank: s_i B_i A_i, one module at a time
            if tau is None:
                tau = torch.zeros(len(experts), theta0.numel(), device=theta0.device)
            for k in range(len(experts)):
                one_hot = torch.zeros(len(stack.expert_names))
                one_hot[k] = 1.0
                tau[k] += factors.delta(one_hot.to(factors.scaling.device)).reshape(-1).to(tau.device)
        stats.add(name, theta0, tau)
    return stats
