"""The memory model of a fit: byte rows from parameter shapes, phase estimates, knobs that help.

What a fit holds, in bytes (P parameters, S of them stacked, K experts; see :mod:`mergeopt.stack`):

* for the whole run: the base model in float32 (4P; ``load_problem`` loads it so), the stack's
  anchor in float32 (4S) and its K − 1 differences in ``model.stack_dtype``; the merge writes into
  the model's own storage (0) and Adam keeps 4 float64 numbers per logit (32K);
* on top, one phase at a time (the plan takes the largest): stacking (temporaries of the largest
  tensor), a training micro-step of the gradient strategy, an evaluation batch (no grad).

Everything here is arithmetic on shapes, so it runs for a 16B model on a laptop; where the shapes
come from (safetensors headers or config.json) is :mod:`mergeopt.dry_run`'s job. Which parameters
are equal in every expert cannot be known without reading weights, so every parameter that
``model.exclude`` keeps counts as stacked: an upper bound. The phases are estimates written from
what this code and a Llama decoder keep alive, checked in tests/test_plan.py against the live
tensor bytes of real steps on small Llamas (see :func:`training_bytes`, :func:`evaluation_bytes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.lora import FactorSizes
from mergeopt.scoring import loss_set_weights
from mergeopt.stack import DTYPES

GIB = 2**30
FLOAT32 = 4
# regexes a user can add to model.exclude to keep the (usually largest) embedding tensors at θ0
EMBEDDING_PATTERNS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


@dataclass(frozen=True)
class Dims:
    """The decoder shapes the activation estimate needs, read from config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict, where: str) -> Dims:
        """Llama-style keys (GPT-2 aliases accepted); a multimodal config's text_config if present."""
        cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

        def pick(*keys: str, default: int | None = None) -> int:
            for key in keys:
                if isinstance(cfg.get(key), int):
                    return cfg[key]
            if default is None:
                raise UserError(f"{where}: config.json has no {keys[0]}: cannot estimate activations")
            return default

        hidden = pick("hidden_size", "n_embd", "d_model")
        heads = pick("num_attention_heads", "n_head")
        return cls(
            hidden=hidden,
            intermediate=pick("intermediate_size", "n_inner", default=4 * hidden),
            layers=pick("num_hidden_layers", "n_layer", "num_layers"),
            heads=heads,
            kv_heads=pick("num_key_value_heads", default=heads),
            head_dim=pick("head_dim", default=hidden // heads),
            vocab=pick("vocab_size"),
        )


@dataclass(frozen=True)
class Inventory:
    """Every parameter of the base: shape and the bytes per element it is stored with on disk."""

    shapes: dict[str, tuple[int, ...]]
    source_bytes: dict[str, int]
    source: str  # where the shapes came from, for the printed plan
    notes: tuple[str, ...] = ()
    adapters: dict[str, FactorSizes] = field(default_factory=dict)  # LoRA experts, from their headers

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])


@dataclass(frozen=True)
class DeviceMemory:
    """The device a recipe resolves to, and its memory (None where it cannot be known here)."""

    device: str
    description: str
    total: int | None
    free: int | None


@dataclass(frozen=True)
class Row:
    label: str
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    """Byte rows held for the whole run, the transient phases (one at a time) and the verdict."""

    memory: DeviceMemory
    num_experts: int
    parameters: int
    tensors: int
    stacked_parameters: int
    stacked_tensors: int
    excluded_tensors: int
    held: tuple[Row, ...]
    phases: tuple[Row, ...]
    batch: str  # the batch shapes the phases assume, in words
    suggestions: tuple[tuple[str, int], ...] = field(default=())  # (override, bytes saved)
    combined_peak: int | None = None  # the peak with every suggestion applied

    def row(self, label_start: str) -> int:
        """Bytes of the first row (held or phase) whose label starts with ``label_start``."""
        return next(r.bytes for r in (*self.held, *self.phases) if r.label.startswith(label_start))

    @property
    def peak(self) -> int:
        return sum(r.bytes for r in self.held) + max((r.bytes for r in self.phases), default=0)

    @property
    def fits(self) -> bool | None:
        return None if self.memory.free is None else self.peak <= self.memory.free


# ----------------------------------------------------------------------------- phases


def stacking_bytes(recipe: Recipe, num_experts: int, numel: int, source_bytes: int) -> int:
    """Temporaries while one tensor of ``numel`` elements is stacked (build_stack's largest moment).

    Per element, measured on this code: the anchor form (linear, scale 1) holds one expert tensor
    in float32, its difference and the boolean masks of its checks (11 bytes), plus the buffer it
    was read into in its on-disk dtype. Other merges hold the K task vectors in float32 (4K) plus what their
    prepare makes (TIES: trimmed copy, signs, mask, products, 9K + 4; DARE: a drop mask, 12) and,
    for a narrower stack dtype, the float32 differences before the cast (4(K − 1)).
    """
    method, k = recipe.merge.method, num_experts
    if method == "linear" and recipe.merge.scale == 1.0:
        return numel * (11 + source_bytes)
    extra = {"linear": 0, "dare_linear": 12}.get(method, 9 * k + 4)
    cast = 4 * (k - 1) if recipe.model.stack_dtype != "float32" else 0
    return numel * (4 * k + extra + cast + source_bytes)


def saved_activation_bytes(dims: Dims, batch: int, length: int) -> int:
    """Bytes a Llama forward saves for backward in float32, for ``batch`` right-padded sequences.

    Per layer and token: the two RMSNorms keep their input, normalised input and output (6h) and a
    reciprocal RMS each (2); attention keeps q and its output (2·heads·head_dim), k and v repeated
    to every head (2·heads·head_dim: with padding, transformers' SDPA path repeats grouped kv
    heads) and a log-sum-exp per head; the gated MLP keeps gate, its activation, up and their
    product (4·intermediate). Per layer and sequence, SDPA keeps the padding mask as a float
    (length²). After the last layer: the final norm (3h + 1 per token), rotary cos/sin and the
    token ids (int64, inputs and shifted targets).
    """
    d, tokens = dims, batch * length
    per_token = 6 * d.hidden + 4 * d.heads * d.head_dim + 4 * d.intermediate + 2 + d.heads
    per_layer = FLOAT32 * (tokens * per_token + batch * length * length)
    final = FLOAT32 * tokens * (3 * d.hidden + 1) + 2 * FLOAT32 * length * d.head_dim
    ids = 8 * tokens + 8 * batch * (length - 1)
    return d.layers * per_layer + final + ids


def logits_bytes(dims: Dims, batch: int, length: int) -> int:
    """The float32 logits, their shifted copy and log-softmax: three (B, L, V) tensors at once.

    At the end of the forward the loss holds all three; in the backward the log-softmax output, its
    gradient and the logits' gradient take their place.
    """
    return FLOAT32 * dims.vocab * batch * (3 * length - 2)


def upcast_bytes(recipe: Recipe, num_experts: int, largest: int) -> int:
    """The merge kernel casts K − 1 differences to float32 one column chunk at a time (none for a
    float32 stack): at most ``mergeopt.methods.linear.CHUNK`` columns of the largest parameter."""
    from mergeopt.methods.linear import CHUNK

    if recipe.model.stack_dtype == "float32":
        return 0
    return FLOAT32 * (num_experts - 1) * min(largest, CHUNK)


def training_bytes(
    recipe: Recipe, dims: Dims, batch: int, stacked: int, largest: int, num_experts: int, rank_sum: int = 0
) -> tuple[int, int]:
    """(activations peak, backward end) of one micro-step of the gradient strategy.

    Activations: the saved activations and the boolean padding mask the model builds (length² per
    sequence), plus the larger of the logits at the end of the forward and the backward's working
    set in the last MLP (two intermediate-sized gradients per token, the gradients of lm_head and
    one MLP weight, which wait for the merge). The backward ends holding the float32 gradient of
    every stacked parameter at once: the merge's autograd nodes were created before the forward,
    so autograd runs them last, after every weight gradient exists; the first of them also
    upcasts its differences. In between, layer activations are freed as layer gradients appear,
    so the larger of the two is the step's peak. LoRA experts kept low-rank add, per adapted
    module, the rank-Σr activations x·Aᵀ and their reweighted copy (``rank_sum`` is Σr summed over
    modules and experts).
    """
    d, length = dims, recipe.data.max_length
    mask = batch * length * length
    last_mlp = FLOAT32 * (
        2 * batch * length * d.intermediate + d.vocab * d.hidden + d.hidden * d.intermediate
    )
    head = max(logits_bytes(dims, batch, length), last_mlp)
    lowrank = 2 * FLOAT32 * batch * length * rank_sum
    forward = saved_activation_bytes(dims, batch, length) + mask + head + lowrank
    backward = FLOAT32 * stacked + upcast_bytes(recipe, num_experts, largest)
    return forward, backward


def evaluation_bytes(recipe: Recipe, dims: Dims, largest: int, num_experts: int) -> int:
    """One no-grad evaluation batch of ``optim.eval_batch_size`` sequences of ``data.max_length``.

    The largest of: the logits with their shifted copy and log-softmax; a layer's working set
    (4 hidden-sized and 3 intermediate-sized float32 tensors per token, the boolean and float
    padding masks per sequence); the merge's float32 upcast of one parameter's differences.
    Generation (exact_match) keeps a KV cache that is smaller than these logits.
    """
    batch, length = recipe.optim.eval_batch_size, recipe.data.max_length
    tokens = batch * length
    layer = FLOAT32 * tokens * (4 * dims.hidden + 3 * dims.intermediate) + 5 * batch * length * length
    return max(logits_bytes(dims, batch, length), layer, upcast_bytes(recipe, num_experts, largest))


def _training_batch(recipe: Recipe) -> int:
    """Examples per micro-batch: optim.batch_size from each dev set the loss puts weight on."""
    targeted = int((loss_set_weights(recipe) > 0).sum())
    return recipe.optim.batch_size * targeted


# ----------------------------------------------------------------------------- the plan


def _excluded(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)  # as build_stack: re.search over the name


def plan_memory(recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory) -> MemoryPlan:
    """The plan for ``recipe`` with these shapes on this device, with suggestions if it does not fit."""
    plan = _plan(recipe, inventory, dims, memory)
    if plan.fits is not False:
        return plan
    saved, combined = suggest(recipe, inventory, dims, memory)
    return replace(plan, suggestions=tuple(saved), combined_peak=combined)


def _plan(recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory) -> MemoryPlan:
    """Byte rows from the inventory; no suggestions (they re-plan with changed recipes)."""
    k = len(recipe.model.experts)
    patterns = [re.compile(p) for p in recipe.model.exclude]
    names = list(inventory.shapes)
    adapters = inventory.adapters
    lowrank = bool(adapters) and recipe.merge.method == "linear"  # adapters stay factors (mergeopt.stack)
    if lowrank and len(adapters) == k:  # every expert's dense weights are θ0: nothing is stacked densely
        stacked = []
    else:
        stacked = [n for n in names if not _excluded(n, patterns)]
    params = sum(inventory.numel(n) for n in names)
    s = sum(inventory.numel(n) for n in stacked)
    largest = max((inventory.numel(n) for n in stacked), default=0)
    dtype = recipe.model.stack_dtype
    rank_sum = sum(a.rank_sum for a in adapters.values()) if lowrank else 0
    # A and B in the stack dtype, plus per rank column its expert (int64) and scaling (float32)
    factors = sum(a.numel for a in adapters.values()) * DTYPES[dtype].itemsize + rank_sum * (8 + 4)
    held = (
        Row("base model, float32, every parameter", FLOAT32 * params),
        Row("stack anchor θ_1, float32", FLOAT32 * s),
        Row(f"stack differences, {k - 1} x {dtype}", (k - 1) * s * DTYPES[dtype].itemsize),
        *(
            [Row(f"LoRA factors of {len(adapters)} expert(s), {dtype}, kept low-rank", factors)]
            if lowrank
            else []
        ),
        Row("merge buffers (the model's own storage)", 0),
        Row(f"optimizer: Adam on {k} float64 logits", 4 * 8 * k),
    )
    biggest = max(stacked, key=inventory.numel, default=None)
    source = inventory.source_bytes[biggest] if biggest else FLOAT32
    phases = [Row("stacking: temporaries of the largest tensor", stacking_bytes(recipe, k, largest, source))]
    batch = f"evaluation batch {recipe.optim.eval_batch_size} x {recipe.data.max_length} tokens"
    if recipe.search.strategy == "gradient":
        train = _training_batch(recipe)
        forward, backward = training_bytes(recipe, dims, train, s, largest, k, rank_sum)
        phases += [
            Row("training step: activations, logits or last-layer gradients", forward),
            Row("training step, backward end: float32 gradients of the stack", backward),
        ]
        batch = f"micro-batch {train} x {recipe.data.max_length} tokens; {batch}"
    phases.append(Row("evaluation batch, no grad", evaluation_bytes(recipe, dims, largest, k)))
    return MemoryPlan(
        memory, k, params, len(names), s, len(stacked), len(names) - len(stacked), held, tuple(phases), batch
    )


Knob = tuple[str, str, dict]  # (the override to type, recipe section, changed fields)


def _with(recipe: Recipe, knobs: Sequence[Knob]) -> Recipe:
    """A copy of the recipe with the knobs applied (frozen models: copied, not re-validated)."""
    for _, section, changes in knobs:
        recipe = recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=changes)})
    return recipe


def _halvings(size: int) -> list[int]:
    out = []
    while size > 1:
        size //= 2
        out.append(size)
    return out


def _knob_groups(recipe: Recipe, inventory: Inventory) -> list[list[Knob]]:
    """The knobs worth trying; each group goes from its mildest setting to its strongest."""
    groups: list[list[Knob]] = []
    if recipe.model.stack_dtype == "float32":
        groups.append([("model.stack_dtype=bfloat16", "model", {"stack_dtype": "bfloat16"})])
    patterns = [re.compile(p) for p in recipe.model.exclude]
    stacked = [n for n in inventory.shapes if not _excluded(n, patterns)]
    embeddings = [p for p in EMBEDDING_PATTERNS if any(re.search(p, n) for n in stacked)]
    if embeddings:
        exclude = (*recipe.model.exclude, *embeddings)
        groups.append([(f"model.exclude=[{','.join(exclude)}]", "model", {"exclude": exclude})])
    optim = recipe.optim
    if recipe.search.strategy == "gradient":
        examples = optim.batch_size * optim.grad_accum  # per optimizer step: kept (rounded up)
        groups.append(
            [
                (
                    f"optim.batch_size={b} optim.grad_accum={-(-examples // b)}",
                    "optim",
                    {"batch_size": b, "grad_accum": -(-examples // b)},
                )
                for b in _halvings(optim.batch_size)
            ]
        )
    groups.append(
        [
            (f"optim.eval_batch_size={b}", "optim", {"eval_batch_size": b})
            for b in _halvings(optim.eval_batch_size)
        ]
    )
    if recipe.data.max_length >= 256:  # shorter examples change what is fitted: one halving at most
        length = recipe.data.max_length // 2
        groups.append([(f"data.max_length={length}", "data", {"max_length": length})])
    return [g for g in groups if g]


def suggest(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory
) -> tuple[list[tuple[str, int]], int]:
    """Knobs that lower the peak with the bytes each saves (re-planned, not guessed), best first,
    and the peak with all of them applied.

    From each group the mildest setting that makes the recipe fit on its own is chosen, else the
    strongest: a batch is halved only as far as needed.
    """

    def peak(knobs: Sequence[Knob]) -> int:
        return _plan(_with(recipe, knobs), inventory, dims, memory).peak

    now, chosen = peak(()), []
    for group in _knob_groups(recipe, inventory):
        knob = next((k for k in group if peak([k]) <= memory.free), group[-1])
        if peak([knob]) < now:
            chosen.append(knob)
    saved = sorted(((k[0], now - peak([k])) for k in chosen), key=lambda s: -s[1])
    return saved, peak(chosen)
