"""LoRA experts merged without a dense ΔW: a rank-(Σ r_i) update computed inside the forward pass.

For a Linear weight W0 adapted by LoRA experts i (factors A_i: r_i × in, B_i: out × r_i, scaling
s_i) the merge at mixture w is W0 + λ Σ_i w_i s_i B_i A_i. Applied to an input x this is

    x W0ᵀ + ((x A_catᵀ) ⊙ c(w)) B_catᵀ,   A_cat = [A_1; …; A_K],  B_cat = [B_1 … B_K],
    c(w)_j = λ · w_owner(j) · s_owner(j)   for each of the Σ r_i rank columns j,

so the merged weight is never formed: per step the extra work is two thin matmuls per adapted
module, and the memory is the factors, Σ_i r_i (in + out) numbers per module instead of K·in·out.
An adapted embedding (PEFT's ``lora_embedding_A`` / ``_B``, whose update is s·(B·A)ᵀ) is held in
the same layout, its factors being Bᵀ and Aᵀ: the hook adds the rows (B_cat[ids] ⊙ c(w)) A_cat of
the looked-up tokens, and an output layer tied to that embedding (SmolLM2, Gemma) adds the Linear
update of the same factors, as the merged shared weight would. The update is a forward hook on the
module; the mixture reaches it through a
non-persistent buffer (``mergeopt_mix``) that :func:`torch.func.functional_call` replaces with the
w being optimized, so gradients reach w exactly as on the dense path, and ``model.generate``
(metrics) sees the value last copied into the buffer.

A DoRA expert of a Linear layer (:mod:`mergeopt.merging.dora`) rescales each output row o of
W0 + s_i B_i A_i to its magnitude: W_i = g_i ⊙ (W0 + s_i B_i A_i), g_i = m_i / ‖W0 + s_i B_i A_i‖_o.
Its task vector (g_i − 1) ⊙ W0 + s_i (g_i ⊙ B_i) A_i is a row scaling of W0 plus a low-rank term,
so it stays low-rank too: its B is stored as g_i ⊙ B_i, and the layer's output x W0ᵀ is scaled by
1 + λ Σ_i w_i (g_i − 1) (its ``gain``), one multiply per output, exact as the dense merge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from mergeopt.errors import UserError
from mergeopt.loading.lora_updates import LoraAdapter

MIX_BUFFER = "mergeopt_mix"
# set on each adapted module while attached: (its factors, λ), for code that reads the module's
# weight instead of calling it (the chunked loss reads the output layer's weight: :func:`update_terms`)
FACTORS_ATTRIBUTE = "_mergeopt_lowrank"


@dataclass
class LowRankFactors:
    """The stacked factors of one adapted Linear weight."""

    a: torch.Tensor  # (R, in), R = Σ_i r_i over the experts adapting this module
    b: torch.Tensor  # (out, R)
    owner: torch.Tensor  # (R,) long: the expert each rank column belongs to
    scaling: torch.Tensor  # (R,) float32: that expert's s_i
    # a sharded stack (mergeopt.merging.sharded_merge.shard_lowrank): ``a`` and ``b`` hold this rank's block
    # of ⌈rows/N⌉ rows, and (rows of a, rows of b) are the whole factors' row counts
    whole_rows: tuple[int, int] | None = None
    # DoRA experts of this layer: (D, out) float32 g_d − 1 per output row, and (D,) the expert each is
    # (their B columns hold g_d ⊙ B_d already); None without DoRA experts here
    gain: torch.Tensor | None = None
    gain_owner: torch.Tensor | None = None

    def whole(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in ``dtype``: gathered from the ranks' blocks when sharded (autograd saves a
        recipe to gather them again for the backward, not the tensors: mergeopt.merging.layer_merge)."""
        if self.whole_rows is None:
            return self.a.to(dtype), self.b.to(dtype)
        from mergeopt.merging.sharded_merge import gathered_for_backward

        return (
            gathered_for_backward(self.a, self.whole_rows[0], dtype),
            gathered_for_backward(self.b, self.whole_rows[1], dtype),
        )

    def coefficients(self, weights: torch.Tensor, scale: float) -> torch.Tensor:
        """c_j = λ w_owner(j) s_owner(j), in w's precision (at least float32)."""
        dtype = torch.promote_types(weights.dtype, self.scaling.dtype)
        return scale * weights.to(dtype)[self.owner] * self.scaling.to(dtype)

    def terms(
        self, x: torch.Tensor, weights: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, B) with the update's output ``F.linear(u, B)`` for input x: u = (x Aᵀ) ⊙ c(w), (…, R)."""
        a, b = self.whole_like(x)
        return F.linear(x, a) * self.coefficients(weights.to(self.scaling.device), scale).to(a), b

    def whole_like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in x's dtype on x's device (a tied output layer may sit on another GPU)."""
        a, b = self.whole(x.dtype)
        return (a, b) if a.device == x.device else (a.to(x.device), b.to(x.device))

    def delta(self, weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The dense λ Σ_i w_i s_i B_i A_i (checks only: the forward never forms it)."""
        c = self.coefficients(weights, scale)
        return (self.b.float() * c) @ self.a.float()

    def row_gain(self, weights: torch.Tensor, scale: float) -> torch.Tensor | None:
        """λ Σ_d w_owner(d) (g_d − 1), (out,) in float32 at least: what the DoRA experts add to the
        scale of each output row of x W0ᵀ; None without DoRA experts."""
        if self.gain is None:
            return None
        dtype = torch.promote_types(weights.dtype, self.gain.dtype)
        return scale * (
            weights.to(device=self.gain.device, dtype=dtype)[self.gain_owner] @ self.gain.to(dtype)
        )

    def merged(self, weight: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
        """θ0's ``weight`` (out × in) merged at w: (1 + gain) ⊙ W0 + λ Σ_i w_i s_i B_i A_i, in float32."""
        merged = weight.float()
        gain = self.row_gain(weights, scale)
        if gain is not None:
            merged = merged * (1 + gain.float().to(merged.device)).unsqueeze(1)
        return merged + self.delta(weights.to(self.scaling.device), scale).to(merged.device)

    def nbytes(self) -> int:
        parts = (self.a, self.b, self.owner, self.scaling, self.gain, self.gain_owner)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


@dataclass
class LowRankStack:
    """LoRA experts as factors, attached to the modules of one model by forward hooks."""

    expert_names: list[str]
    modules: dict[str, LowRankFactors]  # module name ('model.layers.0.self_attn.q_proj') -> factors
    scale: float = 1.0
    handles: list = field(default_factory=list)
    model: torch.nn.Module | None = None  # the model attached to
    # an output layer whose weight is an adapted embedding's (tied) -> that embedding: it reads the
    # same factors, so the merge changes both, as PEFT's merge_and_unload of the shared weight does
    tied: dict[str, str] = field(default_factory=dict)
    # parameters the experts adapt by a LoRA of the parameter itself (a mixture of experts' fused
    # expert weights), merged by a parametrization when read (mergeopt.merging.lowrank_parameters)
    parameters: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in [*self.modules.values(), *self.parameters.values()])

    def _readers(self) -> list[str]:
        """Every module holding a mixture buffer: the adapted ones and the tied output layer."""
        return [*self.modules, *self.tied]

    def mix_names(self) -> list[str]:
        """The buffer names functional_call must be given w under."""
        names = [f"{name}.{MIX_BUFFER}" for name in self._readers()]
        for parameter in self.parameters:
            module, _, attr = parameter.rpartition(".")
            names.append(f"{module}.parametrizations.{attr}.0.{MIX_BUFFER}")
        return names

    def attach(self, model: torch.nn.Module) -> None:
        """Register the mixture buffer and the low-rank forward hook on every adapted module: a
        Linear layer adds ((x Aᵀ) ⊙ c) Bᵀ to its output, an embedding the rows (B[ids] ⊙ c) A of
        its factors (B = A_peftᵀ, A = B_peftᵀ), and an output layer tied to an adapted embedding
        adds the Linear update of the embedding's factors."""
        self.model = model
        for name, factors in self.modules.items():
            module = model.get_submodule(name)
            if isinstance(module, torch.nn.Embedding):
                hook = _rows_hook(factors, self.scale, _row_scale(name, module))
                output = _tied_output(model, module)
                if output is not None:
                    self.tied[output[0]] = name
                    self._add(output[1], factors, _hook(factors, self.scale))
            elif isinstance(module, torch.nn.Linear):
                hook = _hook(factors, self.scale)
            else:
                raise TypeError(f"{name} is a {type(module).__name__}, not a Linear or Embedding layer")
            self._add(module, factors, hook)

    def _add(self, module: torch.nn.Module, factors: LowRankFactors, hook) -> None:
        mix = torch.zeros(len(self.expert_names), dtype=torch.float32, device=factors.scaling.device)
        module.register_buffer(MIX_BUFFER, mix, persistent=False)
        setattr(module, FACTORS_ATTRIBUTE, (factors, self.scale))
        self.handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for name in self._readers() if self.model is not None else ():
            module = self.model.get_submodule(name)
            if hasattr(module, FACTORS_ATTRIBUTE):
                delattr(module, FACTORS_ATTRIBUTE)

    def params(self, weights: torch.Tensor, write_buffers: bool = False) -> dict[str, torch.Tensor]:
        """{buffer name: w} for functional_call; with ``write_buffers`` w is also copied into the
        attached model's buffers, for plain forward calls (``model.generate``)."""
        if write_buffers:
            with torch.no_grad():
                for name in self.mix_names():
                    self.model.get_buffer(name).copy_(weights.detach())
        return {name: weights for name in self.mix_names()}

    def current_weights(self) -> torch.Tensor:
        """The mixture last written into the buffers (after mixup, if any)."""
        name = next(iter(self.mix_names()))
        return self.model.get_buffer(name).detach().clone()

    def materialize(self, weights: torch.Tensor) -> None:
        """Add the dense update at w to the attached model's weights and remove the hooks: for writing
        the merged model out (the only place a dense ΔW is ever formed, one module at a time)."""
        with torch.no_grad():
            for name, factors in self.modules.items():
                weight = self.model.get_submodule(name).weight
                if factors.gain is None:
                    weight.add_(
                        factors.delta(weights.to(factors.scaling.device), self.scale).to(weight.dtype)
                    )
                else:
                    weight.copy_(factors.merged(weight, weights, self.scale).to(weight))
        self.detach()


def _hook(factors: LowRankFactors, scale: float):
    def add_low_rank(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        weights = getattr(module, MIX_BUFFER)
        merged = output + F.linear(*factors.terms(args[0], weights, scale))
        gain = factors.row_gain(weights, scale)
        if gain is None:
            return merged
        # x W0ᵀ is the layer's output less its bias: a DoRA layer's weight is θ0 (mergeopt.merging.dora)
        plain = output if module.bias is None else output - module.bias
        return merged + plain * gain.to(device=output.device, dtype=output.dtype)

    return add_low_rank


def _rows_hook(factors: LowRankFactors, scale: float, row_scale: float):
    def add_low_rank_rows(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        c = factors.coefficients(getattr(module, MIX_BUFFER).to(factors.scaling.device), scale)
        a, b = factors.whole_like(output)
        rows = F.linear(F.embedding(args[0].to(b.device), b) * c.to(a), a.t())
        return output + (rows * row_scale if row_scale != 1.0 else rows)

    return add_low_rank_rows


def _row_scale(name: str, module: torch.nn.Embedding) -> float:
    """What an embedding multiplies the rows of its weight by (1 for nn.Embedding; Gemma 3's scaled
    embedding: √width), read from a probe of its first rows, so that the low-rank rows added to its
    output are scaled as the merged weight's rows would be. Anything else is refused."""
    if type(module).forward is torch.nn.Embedding.forward:
        return 1.0
    ids = torch.arange(min(8, module.num_embeddings), device=module.weight.device)
    with torch.no_grad():
        out, rows = module(ids).float(), F.embedding(ids, module.weight).float()
    scale = float((out * rows).sum() / (rows * rows).sum().clamp_min(1e-30))
    if not torch.allclose(out, rows * scale, rtol=1e-2, atol=1e-6):
        raise UserError(
            f"{name} ({type(module).__name__}) returns more than scaled rows of its weight, so a LoRA "
            "expert's update of it cannot be added low-rank: use merge.method ties or dare, which make it dense"
        )
    return scale


def weight_source(module: torch.nn.Module):
    """The object a module's weight is read from: its parameter, or its merge (a stacked weight)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight[0]
    return module.weight


def _tied_output(model: torch.nn.Module, embedding: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(name, module) of the output layer when it reads ``embedding``'s weight (tied embeddings)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None or output is embedding or weight_source(output) is not weight_source(embedding):
        return None
    name = next(n for n, m in model.named_modules() if m is output)
    return name, output


def update_terms(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(u, B) such that ``module(x)`` is ``F.linear(x, W, b) + F.linear(u, B)`` at the mixture in its
    buffer, or None when no LoRA expert adapts ``module``. Code that applies a module's weight itself
    instead of calling the module, which skips the forward hook, must add this term: the chunked
    loss does for the output layer (a LoRA on ``lm_head``)."""
    entry = getattr(module, FACTORS_ATTRIBUTE, None)
    if entry is None:
        return None
    factors, scale = entry
    if factors.gain is not None:  # mergeopt.merging.dora keeps a DoRA output layer dense
        raise TypeError("a DoRA expert's row gain on a layer whose weight is read directly")
    return factors.terms(x, getattr(module, MIX_BUFFER), scale)


def build_lowrank_stack(
    expert_names: Sequence[str],
    adapters: Mapping[str, LoraAdapter],
    device: torch.device | str | Callable[[str], torch.device],
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    gains: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> LowRankStack:
    """Stack the factors of the LoRA experts (a subset of ``expert_names``), module by module.

    Experts may adapt different modules and use different ranks: each module stacks the experts
    that adapt it, and an expert that does not adapt a module contributes nothing there (its
    weight is the base's, as the dense path sees it). ``device`` is one device, or a function from
    a parameter name to the device it lives on (a model spread over several GPUs keeps each
    module's factors beside its weight). ``gains``: {expert: {parameter: g − 1}} of DoRA experts
    (:func:`mergeopt.merging.dora.split_dora`), whose factors there hold g ⊙ B already.
    """
    device_of = device if callable(device) else (lambda _name: device)
    index = {name: i for i, name in enumerate(expert_names)}
    targets = sorted({t for adapter in adapters.values() for t in adapter.factors})
    modules = {}
    for target in targets:
        parts = [(index[n], a.factors[target]) for n, a in adapters.items() if target in a.factors]
        device = device_of(target)
        a = torch.cat([f.a for _, f in parts]).to(device=device, dtype=dtype)
        b = torch.cat([f.b for _, f in parts], dim=1).to(device=device, dtype=dtype)
        owner = torch.cat([torch.full((f.rank,), i, dtype=torch.long) for i, f in parts]).to(device)
        scaling = torch.cat([torch.full((f.rank,), f.scaling, dtype=torch.float32) for _, f in parts])
        factors = LowRankFactors(a, b, owner, scaling.to(device))
        dora = [(index[n], g[target]) for n, g in (gains or {}).items() if target in g]
        if dora:
            factors.gain = torch.stack([g for _, g in dora]).to(device=device, dtype=torch.float32)
            factors.gain_owner = torch.tensor([i for i, _ in dora], dtype=torch.long, device=device)
        modules[target.removesuffix(".weight")] = factors
    return LowRankStack(list(expert_names), modules, scale)
