"""The memory model of a fit: byte rows from parameter shapes, phase estimates, knobs that help.

What a fit holds, in bytes (P parameters, S of them stacked, K experts; see :mod:`mergeopt.merging.stack`):

* for the whole run: the parameters that are not stacked in the compute dtype (c(P − S)); the
  stack's anchor (S, in ``model.stack_dtype``; the compute dtype for int8) and its K − 1
  differences (int8: one byte each plus a float32 scale per expert and row); θ0 of the stacked
  parameters is not kept, and no merged copy exists (each layer merges as it runs,
  :mod:`mergeopt.merging.layer_merge`); Adam keeps 4 float64 numbers per logit (32K);
* on top, one phase at a time (the plan takes the largest): stacking (temporaries of the largest
  tensor), a training micro-step of the gradient strategy (activations in the compute dtype, all
  layers' or, with activation checkpointing, their inputs and one layer's; the chunked loss; one
  layer's merge in flight), an evaluation batch (no grad).

Under torchrun (N ranks) the plan is per rank. With ``model.shard: fsdp``
(:mod:`mergeopt.merging.sharded_merge`) every matrix, stacked or not, is held as a block of ⌈R/N⌉ of its R
rows (anchor, differences, int8 scales, LoRA factors alike) and vectors whole; a layer gathers each
merged weight whole while it runs, and the backward reduce-scatters its gradient to the rank's
rows (:func:`merge_bytes`, :class:`Gathers`). The training micro-batch is split over the ranks
(:func:`check_shard_division`), each rank evaluates ``optim.eval_batch_size`` sequences per step.
The held rows are exact; the phases' gathers are checked, like the single-process phases, against
the live bytes of each rank of sharded steps (2 and 3 gloo processes, tests/test_plan.py).

Everything here is arithmetic on shapes, so it runs for a 16B model on a laptop; where the shapes
come from (safetensors headers or config.json) is :mod:`mergeopt.memory.dry_run`'s job. Which parameters
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
from mergeopt.loading.lora import PREFIX, FactorSizes
from mergeopt.merging.stack import DTYPES
from mergeopt.objectives.objective import Objective

GIB = 2**30
FLOAT32 = 4
# regexes a user can add to model.exclude to keep the (usually largest) embedding tensors at θ0
EMBEDDING_PATTERNS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


def block_rows(rows: int, world_size: int) -> int:
    """⌈rows / N⌉: the rows of each rank's block, padding included (:func:`mergeopt.merging.sharded_merge.block_range`)."""
    return -(-rows // world_size)


def local_numel(shape: Sequence[int], world_size: int) -> int:
    """Elements one of ``world_size`` ranks keeps of a tensor of ``shape`` under ``model.shard: fsdp``:
    a block of ⌈R/N⌉ rows of a matrix (R = shape[0]), a vector whole."""
    if len(shape) < 2:
        return math.prod(shape)
    return block_rows(shape[0], world_size) * math.prod(shape[1:])


@dataclass(frozen=True)
class Gathers:
    """What a sharded stack (``model.shard: fsdp``) forms whole on each rank while a layer runs, in
    elements: the largest stacked matrix's block (⌈R/N⌉ rows) and its all-gather buffer (N blocks,
    padding rows included); what gathering the output layer holds at once (``head``: the rank's
    merged block of it when it is stacked, the all-gather buffer and, with padding rows, the padded
    copy of a rank's short block; :func:`head_bytes`); what else is gathered whole while its module
    runs, the matrices not stacked and the LoRA factors kept low-rank (a module's A and B): in the
    largest decoder layer (``layer``, their sum, and ``unstacked``, the largest), and the largest
    anywhere (``unstacked_any``)."""

    block: int
    padded: int
    head: int = 0
    layer: int = 0
    unstacked: int = 0
    unstacked_any: int = 0


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
    world_size: int = 1  # the ranks of a torchrun job; the rows are per rank
    shard: str = "none"  # model.shard: fsdp splits the matrices' rows over the ranks

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


def compute_itemsize(recipe: Recipe, device: str) -> int:
    """Bytes per element of ``model.compute_dtype`` on the planned device (auto: bfloat16 on CUDA)."""
    name = recipe.model.compute_dtype
    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return DTYPES[name].itemsize


def anchor_itemsize(recipe: Recipe, compute: int) -> int:
    """The anchor is stored in the stack dtype; an int8 stack keeps it in the compute dtype."""
    return compute if recipe.model.stack_dtype == "int8" else DTYPES[recipe.model.stack_dtype].itemsize


def stacking_bytes(
    recipe: Recipe, num_experts: int, numel: int, source_bytes: int, compute: int = 4, short: bool = False
) -> int:
    """Temporaries while one tensor of ``numel`` elements is stacked (build_stack's largest moment).

    Per element, measured on this code: the anchor form (linear, scale 1) holds the parameter's θ0
    upcast to float32 (none when it is float32 already), one expert tensor in float32, its
    difference and the boolean masks of its checks (11 bytes), plus the buffer it was read into in
    its on-disk dtype, and the anchor's cast to its storage dtype; an int8 stack first holds the
    K − 1 float32 differences and their quantisation temporaries (7(K − 1) + 1, measured). Other merges hold the K task vectors in float32 (4K)
    plus what their prepare makes (TIES: trimmed copy, signs, mask, products, 9K + 4; DARE: a drop
    mask, 12) and, for a narrower stack dtype, the float32 differences before the cast (4(K − 1)).

    ``short``: a rank's block of a sharded matrix whose rows do not divide over the ranks (linear
    merge): it is padded to ⌈R/N⌉ rows by copying its float32 anchor and its differences (float32
    for int8, else in the stack dtype), both held twice for a moment, less the tensor's share of
    the finished stack, which the plan counts already (measured on 3 gloo ranks).
    """
    method, k = recipe.merge.method, num_experts
    upcast = 0 if compute == FLOAT32 else FLOAT32
    anchor = anchor_itemsize(recipe, compute)
    upcast += anchor if anchor != FLOAT32 else 0  # the anchor's cast to its storage dtype
    int8 = 7 * (k - 1) + 1 if recipe.model.stack_dtype == "int8" else 0
    if method == "linear" and recipe.merge.scale == 1.0:
        temporaries = 11 + source_bytes + upcast + int8
        if short:
            stored = DTYPES[recipe.model.stack_dtype].itemsize
            rows = FLOAT32 if recipe.model.stack_dtype == "int8" else stored
            temporaries = max(temporaries, 2 * (FLOAT32 + rows * (k - 1)) - anchor - stored * (k - 1))
        return numel * temporaries
    extra = {"linear": 0, "dare_linear": 12}.get(method, 9 * k + 4)
    cast = 4 * (k - 1) if recipe.model.stack_dtype != "float32" else 0
    return numel * (4 * k + extra + cast + source_bytes + upcast + int8)


def norm_bytes(compute: int) -> int:
    """Bytes an RMSNorm saves per hidden unit, measured: float32 keeps input, normalised value and
    output (12); in 16 bits the float32 copy of the input, the normalised value and its cast (10)."""
    return 12 if compute == FLOAT32 else 10


def layer_activation_bytes(dims: Dims, batch: int, length: int, compute: int) -> int:
    """Bytes one decoder layer's forward saves for backward, for ``batch`` right-padded sequences.

    Per token: each of the two RMSNorms keeps :func:`norm_bytes` per hidden unit and a reciprocal
    RMS; attention keeps q and its output (2·heads·head_dim), k and v repeated to every
    head (2·heads·head_dim: with padding, transformers' SDPA path repeats grouped kv heads) and a
    log-sum-exp per head; the gated MLP keeps gate, its activation, up and their product
    (4·intermediate). Per sequence, SDPA keeps the padding mask (length²), in the compute dtype.
    """
    d, tokens = dims, batch * length
    norms = 2 * (norm_bytes(compute) * d.hidden + FLOAT32)
    matmuls = compute * (4 * d.heads * d.head_dim + 4 * d.intermediate) + FLOAT32 * d.heads
    return tokens * (norms + matmuls) + compute * batch * length * length


def saved_activation_bytes(dims: Dims, batch: int, length: int, compute: int = FLOAT32) -> int:
    """Bytes a Llama forward saves for backward: every layer's (:func:`layer_activation_bytes`),
    then the final norm, rotary cos/sin and the token ids (int64, inputs and shifted targets)."""
    d, tokens = dims, batch * length
    final = tokens * (norm_bytes(compute) * d.hidden + FLOAT32)
    rotary = 2 * compute * length * d.head_dim
    ids = 8 * tokens + 8 * batch * (length - 1)
    return d.layers * layer_activation_bytes(dims, batch, length, compute) + final + rotary + ids


def logits_bytes(dims: Dims, batch: int, length: int) -> int:
    """Whole logits (a model whose logits the chunked loss cannot reproduce): the float32 logits,
    their shifted copy and log-softmax, three (B, L, V) tensors at once."""
    return FLOAT32 * dims.vocab * batch * (3 * length - 2)


def head_bytes(
    recipe: Recipe,
    dims: Dims,
    batch: int,
    length: int,
    compute: int,
    merged_head: bool,
    gathers: Gathers | None = None,
) -> int:
    """The chunked loss's largest moment, beside the hidden states' copy and gradient. In the
    forward: the output layer's weight (formed by the merge, when it is merged), one chunk's float32
    logits and one temporary beside them (log-sum-exp's, or the soft-cap's factor). In the
    backward: one chunk's ∂loss/∂logits (the last chunk's kept from the forward, the others formed
    again in place over their logits), the weight formed again and its float32 gradient, contracted
    with the differences right after. Whichever is larger.

    Sharded (``gathers``): the whole weight is gathered while the loss runs, merged or not (one not
    merged is the gathered weight beside the chunks). The gathering itself (:attr:`Gathers.head`)
    comes before the forward's first chunk, and again at the start of the backward beside the last
    chunk's ∂loss/∂logits; the rank's merged block is gone by the time the chunks run."""
    chunk = min(recipe.optim.loss_chunk_tokens, batch * (length - 1))
    weight = dims.vocab * dims.hidden
    logits = FLOAT32 * chunk * dims.vocab
    cast = compute if compute != FLOAT32 else 0
    forward = 2 * logits + (compute * weight if merged_head else 0)
    backward = logits + ((compute + FLOAT32 + cast) * weight if merged_head else 0)
    if gathers is not None:
        if not merged_head:  # the weight gathered from the rank's block of it
            forward += compute * weight
            backward += compute * weight
        forward = max(forward, compute * gathers.head)
        backward = max(backward, logits + compute * gathers.head)
    return 2 * compute * batch * length * dims.hidden + max(forward, backward)


def _blocks(recipe: Recipe, largest: int, compute: int) -> tuple[bool, int]:
    """Whether the merge kernel takes its one-``addmv`` form (a float32 stack), and the elements of
    its working block (a chunk of the parameter: :data:`mergeopt.merging.layer_merge.CHUNK` elements across
    the K − 1 differences for ``addmv``, per expert for the narrow form)."""
    from mergeopt.merging.layer_merge import CHUNK

    k1 = len(recipe.model.experts) - 1
    same = recipe.model.stack_dtype == "float32" and anchor_itemsize(recipe, compute) == FLOAT32
    return same, min(largest, CHUNK // max(1, k1) if same else CHUNK)


def _kernel_bytes(recipe: Recipe, largest: int, compute: int) -> int:
    """The merge kernel's temporaries: none when the result is float32 (it merges into the result),
    else one float32 block that is cast into it."""
    _, block = _blocks(recipe, largest, compute)
    return 0 if compute == FLOAT32 else FLOAT32 * block


def _contraction_bytes(recipe: Recipe, largest: int, compute: int) -> int:
    """⟨∂L/∂W, δ_i⟩'s temporaries: the gradient's block upcast to float32 (a narrower compute
    dtype) and, for narrow differences, their product with it."""
    same, block = _blocks(recipe, largest, compute)
    return FLOAT32 * block * ((compute != FLOAT32) + (not same))


def merge_bytes(
    recipe: Recipe, num_experts: int, largest: int, compute: int, gathers: Gathers | None = None
) -> int:
    """One parameter's per-layer merge in flight in a training step, at its largest moment: formed
    (its value and the kernel's temporaries), used (its value and its gradient, in the compute
    dtype, while the module's backward runs) or contracted (the gradient and the contraction's
    temporaries).

    Sharded (``gathers``, DTensor's collectives: :mod:`mergeopt.merging.sharded_merge`): the rank merges its
    block (the kernel's temporaries over the block); the all-gather fills a buffer of N blocks
    beside it, whose rows are the weight (a rank short of ⌈R/N⌉ rows pads a copy of its block
    first); the weight is used beside its gradient; the reduce-scatter leaves the rank its block of
    the gradient (with padding rows, from a padded copy of the whole gradient and of its last
    block); the contraction reads that block after the whole gradient is gone (measured on 2 and 3
    gloo ranks, tests/test_plan.py)."""
    del num_experts  # the kernel's temporaries do not grow with K
    if gathers is not None:
        block, full = gathers.block, gathers.padded
        short = block if full != largest else 0  # a rank's block padded to ⌈R/N⌉ rows by a copy
        return max(
            compute * block + _kernel_bytes(recipe, block, compute),
            compute * (block + full + short),
            compute * (full + largest),
            compute * (largest + block + (full + short if short else 0)),
            compute * block + _contraction_bytes(recipe, block, compute),
        )
    return max(
        compute * largest + _kernel_bytes(recipe, largest, compute),
        2 * compute * largest,
        compute * largest + _contraction_bytes(recipe, largest, compute),
    )


def training_bytes(
    recipe: Recipe,
    dims: Dims,
    batch: int,
    largest: int,
    num_experts: int,
    compute: int = FLOAT32,
    layer_params: int = 0,
    merged_head: bool = True,
    rank_sum: int = 0,
    gathers: Gathers | None = None,
) -> int:
    """The peak of one micro-step of the gradient strategy (forward, then backward), for ``batch``
    examples (a rank's share under torchrun).

    Without activation checkpointing every layer's saved activations are held when the backward
    starts. With it, only each layer's input (tokens × hidden) is held, and the backward runs one
    layer at a time again: that layer's activations (less the MLP output projection's input, which
    that projection's backward, the first, has released by the layer's largest moment) plus its
    merged weights (``layer_params`` elements in the compute dtype) are added. Within a layer's backward, a parameter's merge is in
    flight (:func:`merge_bytes`) beside one activation gradient (the module's input gradient), and
    the MLP's gated product is differentiated (two activation gradients) when no merge is. On top:
    the chunked loss's backward and the attention mask the model builds (length² booleans per
    sequence). LoRA
    experts kept low-rank add, per adapted module, the rank-Σr activations x·Aᵀ and their
    reweighted copy (``rank_sum`` is Σr summed over modules and experts).

    A sharded stack (``gathers``) gathers the merged weights whole (:func:`merge_bytes`), the output
    layer's beside the loss, and the matrices not stacked while their modules run: with
    checkpointing the recomputed layer's among its weights, without it the largest one beside an
    activation gradient.
    """
    d, length = dims, recipe.data.max_length
    tokens = batch * length
    mask = batch * length * length
    lowrank = 2 * compute * tokens * rank_sum
    head = head_bytes(recipe, d, batch, length, compute, merged_head, gathers)
    gradient = compute * tokens * d.intermediate  # the largest activation gradient
    merge = merge_bytes(recipe, num_experts, largest, compute, gathers)
    unstacked = compute * gathers.unstacked if gathers else 0
    backward = max(2 * gradient, gradient + merge, gradient + unstacked)
    if recipe.optim.activation_checkpointing:
        one_layer = layer_activation_bytes(d, batch, length, compute)
        outside = saved_activation_bytes(d, batch, length, compute) - d.layers * one_layer
        saved = d.layers * compute * tokens * d.hidden + outside  # each layer's input
        # the layer being recomputed: its activations, its merged weights (one of them counted by
        # the merge in flight), its backward. Its largest moments come after the backward of the
        # MLP's output projection, which runs first and releases that module's input (the gated
        # product, one intermediate-sized activation) before its weight's contraction
        released = compute * tokens * d.intermediate
        backward_peak = max(2 * gradient, gradient + merge - compute * largest)
        gathered = compute * gathers.layer if gathers else 0
        layer = one_layer - released + compute * layer_params + gathered + backward_peak
    else:
        saved = saved_activation_bytes(d, batch, length, compute)
        layer = backward
    return saved + mask + lowrank + max(head, layer)


def merge_evaluation_bytes(recipe: Recipe, largest: int, compute: int, gathers: Gathers | None = None) -> int:
    """One parameter merged without autograd: its value and the kernel's float32 temporaries;
    sharded, the rank's block merged, then gathered whole beside it (:func:`merge_bytes`)."""
    if gathers is not None:
        block, full = gathers.block, gathers.padded
        short = block if full != largest else 0
        return max(compute * block + _kernel_bytes(recipe, block, compute), compute * (block + full + short))
    return compute * largest + _kernel_bytes(recipe, largest, compute)


def evaluation_bytes(
    recipe: Recipe,
    dims: Dims,
    largest: int,
    num_experts: int,
    compute: int = FLOAT32,
    merged_head: bool = True,
    evaluate: int | None = None,
    unstacked_largest: int = 0,
    gathers: Gathers | None = None,
) -> int:
    """One no-grad evaluation batch of ``optim.eval_batch_size`` sequences of ``data.max_length``,
    run in ``evaluate`` bytes per element (``model.eval_dtype``; None: the compute dtype).

    The residual stream (tokens × hidden) plus the largest of: one chunk of the loss (its float32
    logits and the log-sum-exp temporary) with the output layer's weight as the loss reads it
    (formed by the merge, or cast from the compute dtype); a layer's working set (4 hidden-sized and
    3 intermediate-sized tensors per token, the boolean and float padding masks per sequence); one
    parameter's merge (merged while it runs); an evaluation wider than the compute dtype reads each
    parameter that is not stacked as a cast copy (the largest, ``unstacked_largest`` elements).
    Generation (exact_match) holds a merged copy of the stacked parameters instead (see docs/guides/memory.md).
    A sharded stack (``gathers``) adds the gathered weights: a merged weight beside the rank's block,
    the output layer's (read in ``evaluate`` bytes, cast when it is not merged) beside the loss
    chunk and, before it, its gathering (:attr:`Gathers.head`), the largest matrix not stacked (and
    its cast copy).
    """
    e = compute if evaluate is None else evaluate
    cast = e != compute
    batch, length = recipe.optim.eval_batch_size, recipe.data.max_length
    tokens = batch * length
    chunk = min(recipe.optim.loss_chunk_tokens, tokens)
    head = 2 * FLOAT32 * chunk * dims.vocab + (e * dims.vocab * dims.hidden if merged_head or cast else 0)
    layer = e * tokens * (4 * dims.hidden + 3 * dims.intermediate) + 5 * batch * length * length
    merge = merge_evaluation_bytes(recipe, largest, e, gathers)
    copy = e * unstacked_largest if cast else 0
    if gathers is not None:
        weight = dims.vocab * dims.hidden
        if not merged_head and not cast:  # the gathered weight, read as it is
            head += e * weight
        # gathered in the dtype it is formed in: a merge's is ``evaluate``'s, a block's its own
        gathering = e * gathers.head if merged_head else compute * gathers.head + (e * weight if cast else 0)
        head = max(head, gathering)
        copy = compute * gathers.unstacked_any + (e * gathers.unstacked_any if cast else 0)
    return e * tokens * dims.hidden + max(head, layer, merge, copy)


def eval_itemsize(recipe: Recipe) -> int:
    """Bytes per element of ``model.eval_dtype`` (auto: float32, on every device)."""
    name = recipe.model.eval_dtype
    return FLOAT32 if name == "auto" else DTYPES[name].itemsize


def _training_batch(recipe: Recipe) -> int:
    """Examples per micro-batch: optim.batch_size from each dev set the loss puts weight on."""
    targeted = int((Objective.from_recipe(recipe).loss_set_weights() > 0).sum())
    return recipe.optim.batch_size * targeted


def check_shard_division(recipe: Recipe, world_size: int) -> None:
    """With ``model.shard: fsdp`` and the gradient strategy, the micro-batch must split evenly over
    the ranks (each rank takes every N-th example); a :class:`UserError` naming the numbers and a
    batch size that does, if not."""
    if recipe.model.shard != "fsdp" or recipe.search.strategy != "gradient" or world_size < 2:
        return
    micro, size = _training_batch(recipe), recipe.optim.batch_size
    if micro % world_size == 0:
        return
    sets = micro // size
    step = world_size // math.gcd(world_size, sets)  # batch sizes that split evenly: multiples of it
    fix = -(-size // step) * step
    raise UserError(
        f"model.shard fsdp over {world_size} ranks: a micro-batch of {micro} examples (optim.batch_size "
        f"{size} × {sets} dev set{'s' * (sets > 1)}) does not split evenly over the ranks; use an "
        f"optim.batch_size that makes it a multiple of {world_size} (optim.batch_size={fix}: "
        f"{fix * sets // world_size} per rank) or a world size that divides {micro}"
    )


def check_shard_recipe(recipe: Recipe) -> None:
    """What ``model.shard: fsdp`` cannot run with, whatever the ranks: refused in one line (the
    fit and the dry run alike)."""
    if recipe.model.device_map is not None:
        raise UserError("model.shard fsdp and model.device_map both place the stack: use one of them")
    if recipe.model.gguf_file:
        raise UserError(
            "model.shard fsdp reads each rank's rows of the base from safetensors, and a GGUF base "
            "(model.gguf_file) is read whole: convert it to safetensors, or set model.shard=none"
        )


def check_world_size(recipe: Recipe, world_size: int) -> None:
    """The ranks a plan is for, refused in one line where ``model.shard: fsdp`` cannot run on them
    (as :func:`mergeopt.loading.problem.check_shard` refuses the fit)."""
    if world_size < 1:
        raise UserError(f"the world size must be at least 1, not {world_size}")
    if recipe.model.shard != "fsdp":
        return
    check_shard_recipe(recipe)
    if world_size < 2:
        raise UserError(
            "model.shard fsdp shards the stack over the processes of a torchrun job: plan it with "
            "--world-size N (N >= 2; or WORLD_SIZE in the environment), or set model.shard=none"
        )
    check_shard_division(recipe, world_size)


# ----------------------------------------------------------------------------- the plan


def _excluded(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)  # as build_stack: re.search over the name


def plan_memory(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory, world_size: int = 1
) -> MemoryPlan:
    """The plan for ``recipe`` with these shapes on this device, per rank of ``world_size`` (a
    torchrun job's processes), with suggestions if it does not fit."""
    check_world_size(recipe, world_size)
    plan = _plan(recipe, inventory, dims, memory, world_size)
    if plan.fits is not False:
        return plan
    saved, combined = suggest(recipe, inventory, dims, memory, world_size)
    return replace(plan, suggestions=tuple(saved), combined_peak=combined)


LAYER_INDEX = re.compile(r"\.(\d+)\.")
OUTPUT_LAYER = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")


def _largest_layer(names: Sequence[str], inventory: Inventory) -> int:
    """Elements of the stacked parameters of the largest decoder layer (numbered modules)."""
    layers: dict[str, int] = {}
    for name in names:
        match = LAYER_INDEX.search(name)
        if match:
            layers[match.group(1)] = layers.get(match.group(1), 0) + inventory.numel(name)
    return max(layers.values(), default=0)


def _output_layer_merged(stacked: Sequence[str], inventory: Inventory) -> bool:
    """Whether the output layer reads the merge: stacked itself, or tied to a stacked embedding."""
    if any(OUTPUT_LAYER.search(n) for n in inventory.shapes):
        return any(OUTPUT_LAYER.search(n) for n in stacked)
    return any("emb" in n or "wte" in n for n in stacked)


def _rows(inventory: Inventory, names: Sequence[str], shards: int = 1) -> int:
    """Rows of the int8 scales: the first dimension of each tensor (one for a vector); sharded over
    ``shards`` ranks, a rank's block of ⌈R/N⌉ of them."""
    return sum(
        block_rows(inventory.shapes[n][0], shards) if len(inventory.shapes[n]) >= 2 else 1 for n in names
    )


def _lora_modules(adapters: dict[str, FactorSizes]) -> dict[str, tuple[int, int, int]]:
    """(R, in, out) of each module the LoRA experts adapt, R = Σ of their ranks there: the stacked
    A is R × in, the stacked B out × R (:class:`mergeopt.merging.lowrank.LowRankFactors`)."""
    modules: dict[str, tuple[int, int, int]] = {}
    for a in adapters.values():
        for module, (r, inputs, outputs) in a.modules.items():
            total = modules.get(module, (0, inputs, outputs))[0]
            modules[module] = (total + r, inputs, outputs)
    return modules


def _not_excluded(sizes: FactorSizes, patterns: Sequence[re.Pattern]) -> FactorSizes:
    """An adapter's low-rank modules less those ``model.exclude`` leaves out of the merge (as the
    stack leaves out their factors: e.g. ``embed_tokens`` in the 8B recipe)."""
    modules = {
        m: v for m, v in sizes.modules.items() if not _excluded(f"{m.removeprefix(PREFIX)}.weight", patterns)
    }
    return sizes if len(modules) == len(sizes.modules) else sizes.keeping(modules)


def _factor_elements(adapters: dict[str, FactorSizes], shards: int) -> int:
    """Elements of the LoRA factors kept low-rank, on one rank: per module the stacked A and B
    (:func:`_lora_modules`), each a block of ⌈rows/N⌉ rows when sharded."""
    if shards == 1:
        return sum(a.numel for a in adapters.values())
    # an adapter whose modules were not read (no header shapes): its elements split evenly
    rest = sum(block_rows(a.numel, shards) for a in adapters.values() if not a.modules)
    modules = _lora_modules(adapters).values()
    return rest + sum(block_rows(r, shards) * i + block_rows(o, shards) * r for r, i, o in modules)


def _plan(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory, world_size: int = 1
) -> MemoryPlan:
    """Byte rows from the inventory, per rank; no suggestions (they re-plan with changed recipes)."""
    k = len(recipe.model.experts)
    shards = world_size if recipe.model.shard == "fsdp" else 1  # ranks the matrices are split over
    sharded = shards > 1
    patterns = [re.compile(p) for p in recipe.model.exclude]
    names = list(inventory.shapes)
    adapters = {name: _not_excluded(sizes, patterns) for name, sizes in inventory.adapters.items()}
    lowrank = (
        bool(adapters) and recipe.merge.method == "linear"
    )  # adapters stay factors (mergeopt.merging.stack)
    if lowrank and len(adapters) == k:  # every expert's dense weights are θ0 but for its dense updates
        updated = {n for a in adapters.values() for n in a.dense}
        stacked = [n for n in names if n in updated and not _excluded(n, patterns)]
    else:
        stacked = [n for n in names if not _excluded(n, patterns)]
    kept = set(stacked)
    unstacked = [n for n in names if n not in kept]

    def local(name: str) -> int:  # elements this rank keeps of a parameter
        return local_numel(inventory.shapes[name], shards)

    def matrix(name: str) -> bool:
        return len(inventory.shapes[name]) >= 2

    params = sum(inventory.numel(n) for n in names)
    s = sum(inventory.numel(n) for n in stacked)
    s_local = sum(local(n) for n in stacked)
    largest = max((inventory.numel(n) for n in stacked), default=0)
    dtype = recipe.model.stack_dtype
    compute = compute_itemsize(recipe, memory.device)
    compute_name = next(n for n in ("float32", "bfloat16") if DTYPES[n].itemsize == compute)
    if recipe.model.compute_dtype == "float16":
        compute_name = "float16"
    anchor = anchor_itemsize(recipe, compute)
    anchor_name = compute_name if dtype == "int8" else dtype
    rank_sum = sum(a.rank_sum for a in adapters.values()) if lowrank else 0
    factor_dtype = DTYPES[anchor_name]
    # A and B in the stack's float dtype, plus per rank column its expert (int64) and scaling (float32)
    factors = (
        _factor_elements(adapters, shards) * factor_dtype.itemsize + rank_sum * (8 + 4) if lowrank else 0
    )
    scales = (k - 1) * _rows(inventory, stacked, shards) * FLOAT32 if dtype == "int8" else 0
    differences = (k - 1) * s_local * DTYPES[dtype].itemsize + scales
    rows = ""
    if sharded:
        rows = f", sharded: 1/{shards} of the rows per rank"
        rows += " (vectors whole)" if any(not matrix(n) for n in stacked) else ""
    held = (
        Row(
            f"model parameters not stacked, {compute_name}"
            + (": vectors whole, matrices sharded" if sharded else ""),
            compute * sum(local(n) for n in unstacked),
        ),
        Row(f"stack anchor θ_1, {anchor_name}{rows}", anchor * s_local),
        Row(
            f"stack differences, {k - 1} x {dtype}" + (" with per-row scales" if scales else "") + rows,
            differences,
        ),
        *(
            [
                Row(
                    f"LoRA factors of {len(adapters)} expert(s), {anchor_name}, kept low-rank"
                    + (f", sharded: 1/{shards} of the rows per rank" if sharded else ""),
                    factors,
                )
            ]
            if lowrank
            else []
        ),
        Row(
            f"optimizer: Adam on {k} float64 logits" + (", whole on every rank" if world_size > 1 else ""),
            4 * 8 * k,
        ),
    )
    biggest = max(stacked, key=inventory.numel, default=None)
    source = inventory.source_bytes[biggest] if biggest else FLOAT32
    merged_head = _output_layer_merged(stacked, inventory)
    gathers = None
    if sharded:
        block = local(biggest) if biggest else 0
        # gathered whole while their module runs: matrices not stacked, and LoRA factors (A and B)
        gathered = {n: inventory.numel(n) for n in unstacked if matrix(n)}
        if lowrank:
            gathered.update({m: r * (i + o) for m, (r, i, o) in _lora_modules(adapters).items()})
        in_layers = {n: size for n, size in gathered.items() if LAYER_INDEX.search(n)}
        layers: dict[str, int] = {}
        for n, size in in_layers.items():
            index = LAYER_INDEX.search(n).group(1)
            layers[index] = layers.get(index, 0) + size
        # gathering the output layer: the rank's merged block (when merged), the all-gather buffer
        # and, when the rows do not divide, a short block's padded copy
        head_block = block_rows(dims.vocab, shards) * dims.hidden
        head = head_block * (shards + merged_head + (dims.vocab % shards != 0))
        gathers = Gathers(
            block=block,
            padded=block * shards if biggest and matrix(biggest) else block,
            head=head,
            layer=max(layers.values(), default=0),
            unstacked=max(in_layers.values(), default=0),
            unstacked_any=max(gathered.values(), default=0),
        )
    if sharded and recipe.merge.method == "linear" and recipe.merge.scale == 1.0:
        # each rank reads and stacks its block of rows of every matrix alone (mergeopt.merging.stack)
        label = "stacking: temporaries of the largest tensor's block of rows"
        stacking_elements = max((local(n) for n in stacked), default=0)
    elif sharded:  # other merges prepare one whole tensor at a time and keep its block
        label = f"stacking: temporaries of the largest tensor ({recipe.merge.method}: prepared whole)"
        stacking_elements = largest
    else:
        label, stacking_elements = "stacking: temporaries of the largest tensor", largest
    stacking = stacking_bytes(recipe, k, stacking_elements, source, compute)
    if sharded:  # blocks short of ⌈R/N⌉ rows are padded by copying them (measured on 3 gloo ranks)
        short = [local(n) for n in stacked if matrix(n) and inventory.shapes[n][0] % shards]
        if short and recipe.merge.method == "linear" and recipe.merge.scale == 1.0:
            stacking = max(stacking, stacking_bytes(recipe, k, max(short), source, compute, short=True))
        # a matrix model.exclude keeps at θ0: its padded block is copied once more into the one kept
        kept = [
            local(n)
            for n in names
            if _excluded(n, patterns) and matrix(n) and inventory.shapes[n][0] % shards
        ]
        stacking = max(stacking, compute * max(kept, default=0))
    if sharded and lowrank:  # the LoRA factors are read whole once, then cut to the rank's rows
        stacking += _factor_elements(adapters, 1) * factor_dtype.itemsize - (factors - rank_sum * (8 + 4))
        label += "; LoRA factors whole"
    phases = [Row(label, stacking)]
    batch = f"evaluation batch {recipe.optim.eval_batch_size} x {recipe.data.max_length} tokens"
    batch += " per rank" if world_size > 1 else ""
    if recipe.search.strategy == "gradient":
        train = _training_batch(recipe)
        share = block_rows(
            train, world_size
        )  # each rank takes every N-th example (mergeopt.runtime.distributed)
        step = training_bytes(
            recipe,
            dims,
            share,
            largest,
            k,
            compute,
            _largest_layer(stacked, inventory),
            merged_head,
            rank_sum,
            gathers,
        )
        how = "checkpointed" if recipe.optim.activation_checkpointing else "every activation kept"
        phases.append(Row(f"training step, {compute_name}, {how}", step))
        if world_size > 1:
            micro = f"micro-batch {train} x {recipe.data.max_length} tokens over {world_size} ranks, {share} per rank"
        else:
            micro = f"micro-batch {train} x {recipe.data.max_length} tokens"
        batch = f"{micro}; {batch}"
    evaluate = eval_itemsize(recipe)
    evaluate_name = "float32" if recipe.model.eval_dtype == "auto" else recipe.model.eval_dtype
    widest = max((inventory.numel(n) for n in unstacked), default=0)
    evaluation = evaluation_bytes(recipe, dims, largest, k, compute, merged_head, evaluate, widest, gathers)
    phases.append(Row(f"evaluation batch, no grad, {evaluate_name}", evaluation))
    return MemoryPlan(
        memory,
        k,
        params,
        len(names),
        s,
        len(stacked),
        len(names) - len(stacked),
        held,
        tuple(phases),
        batch,
        world_size=world_size,
        shard=recipe.model.shard,
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


def _knob_groups(recipe: Recipe, inventory: Inventory, world_size: int = 1) -> list[list[Knob]]:
    """The knobs worth trying; each group goes from its mildest setting to its strongest."""
    groups: list[list[Knob]] = []
    if world_size > 1 and recipe.model.shard == "none" and recipe.model.device_map is None:
        groups.append([("model.shard=fsdp", "model", {"shard": "fsdp"})])
    narrower = {"float32": ["bfloat16", "int8"], "bfloat16": ["int8"], "float16": ["int8"]}
    groups.append(
        [
            (f"model.stack_dtype={d}", "model", {"stack_dtype": d})
            for d in narrower.get(recipe.model.stack_dtype, [])
        ]
    )
    if recipe.search.strategy == "gradient" and not recipe.optim.activation_checkpointing:
        groups.append([("optim.activation_checkpointing=true", "optim", {"activation_checkpointing": True})])
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


def _runs(recipe: Recipe, world_size: int) -> bool:
    """Whether the recipe can run on ``world_size`` ranks (a sharded micro-batch splits evenly)."""
    try:
        check_world_size(recipe, world_size)
    except UserError:
        return False
    return True


def suggest(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory, world_size: int = 1
) -> tuple[list[tuple[str, int]], int]:
    """Knobs that lower the peak with the bytes each saves (re-planned, not guessed), best first,
    and the peak with all of them applied.

    From each group the mildest setting that makes the recipe fit on its own is chosen, else the
    strongest: a batch is halved only as far as needed. Settings the ranks could not run (a
    sharded micro-batch that does not split evenly) are not offered.
    """

    def peak(knobs: Sequence[Knob]) -> int:
        return _plan(_with(recipe, knobs), inventory, dims, memory, world_size).peak

    now, chosen = peak(()), []
    for group in _knob_groups(recipe, inventory, world_size):
        group = [k for k in group if _runs(_with(recipe, [*chosen, k]), world_size)]  # and together
        if not group:
            continue
        knob = next((k for k in group if peak([k]) <= memory.free), group[-1])
        if peak([knob]) < now:
            chosen.append(knob)
    saved = sorted(((k[0], now - peak([k])) for k in chosen), key=lambda s: -s[1])
    return saved, peak(chosen)
