"""The transient phases of a fit, in bytes: stacking, a training micro-step, an evaluation batch.

What a layer's forward saves for backward is :mod:`mergeopt.memory.activations`, one layer's
backward (a checkpointed recompute included) :mod:`mergeopt.memory.layer_backward`, and one merged
parameter in flight :mod:`mergeopt.memory.merge_moments`; this module places them in a step beside
the chunked loss.

Each is an estimate written from what the code keeps alive in that phase (see
:mod:`mergeopt.memory.rows` for the whole memory model), checked in tests/test_plan.py against
the live tensor bytes of real steps on small Llamas and of sharded steps on gloo ranks.
"""

from __future__ import annotations

from mergeopt.config import Recipe
from mergeopt.memory.activations import layer_activation_bytes, saved_activation_bytes
from mergeopt.memory.layer_backward import Step, layer_backward_bytes
from mergeopt.memory.merge_moments import anchor_itemsize, merge_bytes, merge_evaluation_bytes
from mergeopt.memory.sizes import (
    FLOAT32,
    Dims,
    Gathers,
)
from mergeopt.merging.stack import DTYPES
from mergeopt.objectives.objective import Objective


def compute_itemsize(recipe: Recipe, device: str) -> int:
    """Bytes per element of ``model.compute_dtype`` on the planned device (auto: bfloat16 on CUDA)."""
    name = recipe.model.compute_dtype
    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return DTYPES[name].itemsize


def stacking_bytes(
    recipe: Recipe,
    num_experts: int,
    numel: int,
    source_bytes: int,
    compute: int = 4,
    short: bool = False,
    block: int | None = None,
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

    ``block`` (a large matrix stacked a block of rows at a time in one process,
    :func:`mergeopt.merging.stacking.in_blocks`): those temporaries over the block's elements alone,
    with the block's float32 anchor and its differences before they are copied into the stacked
    tensors, plus the whole anchor where it is held wider than it is stored (a float32 parameter
    under a bfloat16 stack).
    """
    method, k = recipe.merge.method, num_experts
    upcast = 0 if compute == FLOAT32 else FLOAT32
    anchor = anchor_itemsize(recipe, compute)
    upcast += anchor if anchor != FLOAT32 else 0  # the anchor's cast to its storage dtype
    int8 = 7 * (k - 1) + 1 if recipe.model.stack_dtype == "int8" else 0
    if method == "linear" and recipe.merge.scale == 1.0:
        temporaries = 11 + source_bytes + upcast + int8
        if block is not None:
            # per block element also the block's anchor (float32) and differences as stored (int8:
            # quantised), before they are copied into the stacked tensors
            rows = (k - 1) * DTYPES[recipe.model.stack_dtype].itemsize
            held = max(anchor, compute)  # the wider of the anchor's storage and the parameter's dtype
            return numel * (held if held != anchor else 0) + block * (temporaries + FLOAT32 + rows)
        if short:
            stored = DTYPES[recipe.model.stack_dtype].itemsize
            rows = FLOAT32 if recipe.model.stack_dtype == "int8" else stored
            temporaries = max(temporaries, 2 * (FLOAT32 + rows * (k - 1)) - anchor - stored * (k - 1))
        return numel * temporaries
    extra = {"linear": 0, "dare_linear": 12}.get(method, 9 * k + 4)
    cast = 4 * (k - 1) if recipe.model.stack_dtype != "float32" else 0
    return numel * (4 * k + extra + cast + source_bytes + upcast + int8)


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
    gain_rows: int = 0,
    frozen: bool = False,
    lowrank_by_layer: tuple[int, int] | None = None,
    factor_copies: tuple[int, int] = (0, 0),
    from_factors: bool = False,
) -> int:
    """The peak of one micro-step of the gradient strategy (forward, then backward), for ``batch``
    examples (a rank's share under torchrun).

    Without activation checkpointing every layer's saved activations are held when the backward
    starts. With it, only each layer's input (tokens × hidden) is held, and the backward runs one
    layer at a time again. Either way one layer's backward comes on top
    (:func:`~mergeopt.memory.layer_backward.layer_backward_bytes`), beside the chunked loss's
    backward (:func:`head_bytes`), the attention mask the model builds (length² booleans per
    sequence) and what LoRA experts kept low-rank add (:func:`_lowrank_bytes`). ``layer_params``:
    elements of the largest layer's merged weights; ``frozen``: no decoder layer's weight is merged
    (:func:`~mergeopt.memory.activations.layer_activation_bytes`); ``from_factors``: the layers'
    merged weights are formed from LoRA factors (a mixture of experts' fused experts:
    :func:`~mergeopt.memory.merge_moments.merge_bytes`).

    A sharded stack (``gathers``) gathers the merged weights whole
    (:func:`~mergeopt.memory.merge_moments.merge_bytes`), the output layer's beside the loss, and the
    matrices not stacked while their modules run: with checkpointing the recomputed layer's among its
    weights, without it the largest one beside an activation gradient.
    """
    d, length = dims, recipe.data.max_length
    checkpointed = recipe.optim.activation_checkpointing
    mask = batch * d.profile.mask_bytes(length, compute)
    lowrank = _lowrank_bytes(
        d, batch * length, compute, checkpointed, rank_sum, gain_rows, frozen, lowrank_by_layer, factor_copies
    )
    head = head_bytes(recipe, d, batch, length, compute, merged_head, gathers)
    step = Step(
        checkpointed,
        compute,
        batch,
        length,
        frozen,
        merge=merge_bytes(recipe, num_experts, largest, compute, gathers, from_factors),
        largest=largest,
        layer_params=layer_params,
        unstacked=compute * gathers.unstacked if gathers else 0,
        gathered=compute * gathers.layer if gathers else 0,
    )
    saved = saved_activation_bytes(d, batch, length, compute, frozen)
    if checkpointed:  # each layer's input, and what is outside the layers
        layers = sum(
            n * layer_activation_bytes(k, batch, length, compute, frozen) for k, n in d.layer_kinds()
        )
        saved += d.layers * compute * batch * length * d.hidden - layers
    layer = max(layer_backward_bytes(kind, step) for kind, _ in d.layer_kinds())
    return saved + mask + lowrank + max(head, layer)


def _lowrank_bytes(
    d: Dims,
    tokens: int,
    compute: int,
    checkpointed: bool,
    rank_sum: int,
    gain_rows: int,
    frozen: bool,
    lowrank_by_layer: tuple[int, int] | None,
    factor_copies: tuple[int, int],
) -> int:
    """What LoRA experts kept low-rank add to a micro-step.

    Per adapted module, the rank-Σr activations x·Aᵀ, kept for the gradient of their coefficients
    c(w) (``rank_sum`` is Σr summed over modules and experts; the factors need no gradient, so
    nothing else is kept). Each DoRA layer kept low-rank adds its output x W0ᵀ, kept for its row
    gain's gradient (``gain_rows``: Σ of those layers' output widths), and the (tokens × out)
    product its backward reduces to the gain's gradient (out at most the MLP's width). Where layer
    weights are merged, the low-rank branch's input gradient (tokens × in) comes beside the
    projection's own backward. Checkpointed, a decoder layer's share of those is held only while the
    layer is recomputed: ``lowrank_by_layer`` (per token, the largest layer's and what is outside
    the layers) replaces the total (None: every layer's is counted). ``factor_copies``: elements of
    the factors cast to the compute dtype at each forward and kept for the backward (all of them;
    checkpointed, the largest layer's and those outside the layers).
    """
    lowrank = compute * tokens * (rank_sum + gain_rows)
    if checkpointed and lowrank_by_layer is not None:
        lowrank = compute * tokens * sum(lowrank_by_layer)
    if gain_rows:  # a DoRA layer's backward forms ∂L/∂y ⊙ x W0ᵀ (tokens × out) to sum it to ∂L/∂g
        lowrank += compute * tokens * d.intermediate
    if rank_sum and not frozen:  # beside a merged projection's backward (its input gradient and its
        # weight's contraction), the low-rank branch's input gradient (tokens × in, in ≤ the MLP's width)
        lowrank += compute * tokens * d.intermediate
    return lowrank + compute * factor_copies[1 if checkpointed else 0]


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
    (formed by the merge, or cast from the compute dtype); a layer's working set
    (:func:`_working_set_bytes`); one parameter's merge (merged while it runs); an evaluation wider
    than the compute dtype reads each parameter that is not stacked as a cast copy (the largest,
    ``unstacked_largest`` elements).
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
    layer = max(_working_set_bytes(kind, e, batch, length, largest) for kind, _ in dims.layer_kinds())
    if dims.layer_shapes:  # Gemma 4: alive through the layers, the per-layer inputs and the keys
        # and values each kind of layer stores for the layers that read them
        stored = {s.layer_type: s.kv_heads * s.head_dim for s, _ in dims.layer_shapes if not s.kv_shared}
        layer += e * tokens * (dims.layers * dims.per_layer_input + 2 * sum(stored.values()))
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


def _working_set_bytes(dims: Dims, e: int, batch: int, length: int, largest: int) -> int:
    """The working set of a layer of the kind ``dims`` evaluated in ``e`` bytes per element: 4
    hidden-sized and 3 intermediate-sized tensors per token, the boolean and float padding masks per
    sequence. A gated DeltaNet layer's is its chunk algorithm's float32 locals
    (:meth:`~mergeopt.memory.linear_attention.LinearAttention.evaluation_bytes`), where larger; a
    mixture of experts' its routed copies' (:func:`_routed_working_set_bytes`); eager attention's
    its attention weights and masks; a latent attention layer's, its attention's widest moment
    (:meth:`~mergeopt.memory.latent_attention.LatentAttention.evaluation_bytes`), where larger."""
    tokens = batch * length
    layer = e * tokens * (4 * dims.hidden + 3 * dims.intermediate)
    if dims.linear_mixer:
        return max(layer, dims.linear_mixer.evaluation_bytes(dims.hidden, batch, length, e))
    if dims.profile.moe or dims.moe_block:
        layer = _routed_working_set_bytes(dims, e, tokens, largest, layer)
    if dims.profile.eager:
        # the float masks, held through the forward; the layer holds the attention weights it
        # returns through its MLP, and the attention's softmax meets every head's scores
        pairs, masks = batch * length * length, e * dims.profile.mask_kinds
        scores = pairs * (dims.heads * dims.profile.eager_scores_bytes(e) + masks)
        qkv = e * tokens * (dims.hidden + 3 * dims.heads * dims.head_dim)
        layer = max(layer + pairs * (dims.heads * e + masks), scores + qkv)
    else:
        layer += 5 * batch * length * length  # SDPA's boolean and float padding masks
    if dims.latent_attention:  # its attention's moment, the widest heads' tensors alive
        latent = dims.latent_attention.evaluation_bytes(dims.hidden, dims.heads, batch, length, e)
        layer = max(layer, latent)
    return layer


def _routed_working_set_bytes(dims: Dims, e: int, tokens: int, largest: int, dense: int) -> int:
    """A mixture of experts' layer evaluated (``dense``: the working set of a dense layer of its
    widths, Gemma 4's dense MLP beside its block).

    grouped_mm reads a fused expert weight whole (merged: the largest stacked tensor at most, its
    kernel's temporaries gone) while the routed copies' working set is alive: the token copies, the
    fused projection's output, the gate's activation and its product with up. Then, the down
    projection done, its output is weighted by the routing weights (float32 where they are: the
    product is float32; Gemma 4's block's always) and put back in the tokens' order, beside the
    token copies, one hidden-sized tensor fewer alive: at an expert width narrow against the hidden
    size (GLM-4.5, Qwen3-MoE), this is the larger moment. A shared expert is a dense MLP beside the
    routed experts' output: Qwen2-MoE's runs first and its output stays, DeepSeek-V3's kind runs
    after."""
    copies = tokens * dims.top_k
    # GPT-OSS: its clamped SwiGLU's five activations and the gathered gate-and-up biases
    width = (9 if dims.profile.clamped_swiglu else 4) * dims.expert_intermediate
    routed = copies * (dims.hidden + width)
    weighted = FLOAT32 if dims.profile.routing_weights_float32 or dims.moe_block else e
    reordered = copies * dims.hidden * (2 * e + 2 * weighted) - e * tokens * dims.hidden
    routed_layer = e * (tokens * 4 * dims.hidden + largest) + max(e * routed, reordered)
    # Gemma 4's block runs after its dense MLP, whose output it holds
    layer = max(dense, routed_layer + e * tokens * dims.hidden) if dims.moe_block else routed_layer
    if dims.shared_intermediate:
        shared = e * tokens * (4 * dims.hidden + 3 * dims.shared_intermediate)
        if dims.profile.shared_expert == "gated":
            layer = max(layer + e * tokens * dims.hidden, shared)
        else:
            layer = max(layer, shared + e * tokens * dims.hidden)
    return layer


def eval_itemsize(recipe: Recipe) -> int:
    """Bytes per element of ``model.eval_dtype`` (auto: float32, on every device)."""
    name = recipe.model.eval_dtype
    return FLOAT32 if name == "auto" else DTYPES[name].itemsize


def training_batch(recipe: Recipe) -> int:
    """Examples per micro-batch: optim.batch_size from each dev set the loss puts weight on."""
    targeted = int((Objective.from_recipe(recipe).loss_set_weights() > 0).sum())
    return recipe.optim.batch_size * targeted
