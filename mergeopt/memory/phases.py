"""The transient phases of a fit, in bytes: stacking, a training micro-step, an evaluation batch.

Each is an estimate written from what the code keeps alive in that phase (see
:mod:`mergeopt.memory.rows` for the whole memory model), checked in tests/test_plan.py against
the live tensor bytes of real steps on small Llamas and of sharded steps on gloo ranks.
"""

from __future__ import annotations

from dataclasses import replace

from mergeopt.config import Recipe
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


def anchor_itemsize(recipe: Recipe, compute: int) -> int:
    """The anchor is stored in the stack dtype; an int8 stack keeps it in the compute dtype."""
    return compute if recipe.model.stack_dtype == "int8" else DTYPES[recipe.model.stack_dtype].itemsize


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


def layer_activation_bytes(dims: Dims, batch: int, length: int, compute: int, frozen: bool = False) -> int:
    """Bytes one decoder layer's forward saves for backward, for ``batch`` right-padded sequences,
    as its architecture's profile (:class:`~mergeopt.memory.layer_profiles.LayerProfile`) says:
    its attention sublayer's (:func:`attention_sublayer_bytes`), then per token the MLP's input
    (a pre-norm's output, or the residual stream where there is none), the other norms' own saved
    tensors, and the gated MLP's gate, its activation, up and their product (4·intermediate).

    ``frozen``: no weight of the layer is merged (LoRA experts alone, kept low-rank), so nothing
    is kept for a weight's gradient: a norm keeps its float32 input alone (not its output, the
    projections' input), and the MLP not the product, the down projection's input.
    """
    attention = attention_sublayer_bytes(dims, batch, length, compute, frozen)
    return attention + after_attention_bytes(dims, batch, length, compute, frozen)


def after_attention_bytes(dims: Dims, batch: int, length: int, compute: int, frozen: bool = False) -> int:
    """What a layer keeps after its attention (:func:`layer_activation_bytes`): the norms other
    than the first pre-norm, the MLP's input and its four tensors, and the norms' float32 weights."""
    d, p, tokens = dims, dims.profile, batch * length
    norms = (p.pre_norms + p.post_norms - min(p.pre_norms, 1)) * p.norm_bytes(d.hidden, 1, compute, frozen)
    mlp = (0 if frozen else compute * d.hidden) + compute * (3 if frozen else 4) * d.intermediate
    if d.per_layer_input:  # Gemma 4's per-layer input and the norm after it
        norms += p.norm_bytes(d.hidden, 1, compute, frozen) + per_layer_input_bytes(d, compute, frozen)
    if d.moe_block:  # and its mixture-of-experts block
        mlp += moe_block_bytes(d, compute, frozen)
    # a gated DeltaNet layer has no q and k norms (nor one float32 weight for its gated norm)
    normed = replace(p, qk_norm=None) if d.linear_mixer else p
    extra = (1 if d.per_layer_input else 0) + (3 if d.moe_block else 0)
    per_layer = normed.norm_weight_bytes(d.hidden, d.heads, d.own_kv_heads, d.head_dim, compute, extra)
    per_layer += 4 * d.experts if d.moe_block else 0  # grouped_mm's int32 offsets per expert
    if p.moe:  # the router reads the MLP's input; grouped_mm keeps its int32 offsets per expert
        mlp = (0 if frozen else compute * d.hidden) + p.moe_mlp_bytes(
            d.hidden, d.experts, d.top_k, d.expert_intermediate, compute, frozen, d.expert_groups
        )
        mlp += p.shared_expert_bytes(d.hidden, d.shared_intermediate, compute, frozen)
        per_layer += 4 * d.experts
        if p.grouped_router and compute != FLOAT32:  # the router's weight, cast to float32
            per_layer += FLOAT32 * d.experts * d.hidden
    return tokens * (norms + mlp) + per_layer


def per_layer_input_bytes(dims: Dims, compute: int, frozen: bool = False) -> int:
    """Per token, what a layer's per-layer input (Gemma 4) keeps beyond its norm: the gate's
    input (the residual stream) and output, the activation's output and its product with the
    per-layer input, the projection's input. ``frozen``: neither projection's input."""
    width = dims.per_layer_input
    return compute * (2 * width + (0 if frozen else dims.hidden + width))


def moe_block_bytes(dims: Dims, compute: int, frozen: bool = False) -> int:
    """Per token, what Gemma 4's mixture-of-experts block beside its MLP (26B-A4B's kind) keeps:
    three norms of its own (after the MLP, before and after the experts) and, reading the MLP's
    input, a norm without weight (its float32 input and row scalars; in float32 the input is the
    MLP norm's, as is the norm before the experts'), the router (its input scaled, the projection's
    input, the float32 softmax over the experts, the top-k indices, weights and their sum, the
    renormalised weights and each expert's gathered scale) and the routed copies as in
    :meth:`~mergeopt.memory.layer_profiles.LayerProfile.moe_mlp_bytes` (float32 routing weights).
    ``frozen``: nothing kept for a weight's gradient."""
    p, h, k, experts = dims.profile, dims.hidden, dims.top_k, dims.experts
    shared = FLOAT32 * h if compute == FLOAT32 else 0  # the float32 input the MLP's norm keeps
    norms = 3 * p.norm_bytes(h, 1, compute, frozen) - shared
    router = p.norm_bytes(h, 1, compute, frozen=True) - shared + (0 if frozen else 2 * compute * h)
    # the renormalised weights are kept for each expert's scale's gradient
    router += FLOAT32 * experts + 8 * k + FLOAT32 * (1 + (1 if frozen else 2) * k) + compute * k
    width = 4 * dims.expert_intermediate
    per_copy = (
        3 * 8 + FLOAT32 + compute * ((h + width - dims.expert_intermediate) if frozen else (2 * h + width))
    )
    return norms + router + k * per_copy


def per_layer_inputs_bytes(dims: Dims, batch: int, length: int, compute: int, frozen: bool = False) -> int:
    """What a model with per-layer inputs (Gemma 4) keeps before its layers: the projection of the
    embeddings to every layer's input (its input: in float32, the first layer's norm keeps it
    already), the norm of each layer's part (a row per token and layer) and the per-layer inputs
    themselves, one per token and layer, in the compute dtype; the norm's float32 weight."""
    if not dims.per_layer_input:
        return 0
    p, width = dims.profile, dims.layers * dims.per_layer_input
    projection = compute * dims.hidden if compute != FLOAT32 and not frozen else 0
    per_token = projection + p.norm_bytes(width, dims.layers, compute, frozen) + compute * width
    weight = FLOAT32 * dims.per_layer_input if p.weight_cast and compute != FLOAT32 else 0
    return batch * length * per_token + weight


def attention_sublayer_bytes(dims: Dims, batch: int, length: int, compute: int, frozen: bool = False) -> int:
    """What a layer keeps up to its attention's output projection: per token the first pre-norm's
    own saved tensors (:meth:`LayerProfile.norm_bytes`: Llama's 12 bytes per hidden unit in float32
    with its output, 8 in 16 bits) and its output as the projections' input (or the residual
    stream where there is no pre-norm), q and k norms where the model has them; q and its output
    (2·heads·head_dim), k and v repeated to every head (2·heads·head_dim: with padding,
    transformers' SDPA path repeats grouped kv heads) and a log-sum-exp per head. Per sequence,
    SDPA keeps the padding mask (length²), in the compute dtype; eager attention instead keeps every
    head's attention weights (length² each, :meth:`LayerProfile.attention_weight_bytes`) and no
    log-sum-exp. Eager attention's backward runs once the rest of the layer's backward has
    released everything else (:func:`training_bytes`). A gated DeltaNet layer (Qwen 3.5) keeps its
    first norm's tensors and what :meth:`~mergeopt.memory.linear_attention.LinearAttention.saved_bytes`
    says; gated attention, three attention-output-sized tensors more (four in float32). A latent
    attention layer (DeepSeek-V3) keeps its first norm's tensors and what
    :meth:`~mergeopt.memory.latent_attention.LatentAttention.saved_bytes` says, for the kernel the
    planned device runs (:meth:`~mergeopt.memory.sizes.Dims.on_device`)."""
    d, p, tokens = dims, dims.profile, batch * length
    norm = p.norm_bytes(d.hidden, 1, compute, frozen) if p.pre_norms else 0
    if d.linear_mixer:
        return tokens * norm + d.linear_mixer.saved_bytes(d.hidden, batch, length, compute, frozen)
    if d.latent_attention:
        latent = d.latent_attention.saved_bytes(d.hidden, d.heads, batch, length, compute, frozen)
        return tokens * norm + latent
    own_kv = d.own_kv_heads  # a layer reading another's keys has no k norm
    norm += p.qk_norm_bytes(d.heads, own_kv, d.head_dim, compute, frozen)
    if p.v_norm and own_kv:  # a norm without weight over v (in float32, where v is k's projection,
        # its input is the k norm's)
        norm += p.norm_bytes(own_kv * d.head_dim, own_kv, compute, frozen=True)
        norm -= FLOAT32 * own_kv * d.head_dim if d.k_eq_v and compute == FLOAT32 else 0
    attention = (3 if frozen and p.eager else 4) * d.heads * d.head_dim
    if not p.eager and d.kv_heads in (1, d.heads):  # k and v not copied per head: their own (one
        # key head repeated is a view of it), or, in a layer reading another's, that layer's
        attention -= 2 * (d.heads if d.kv_shared else d.heads - d.kv_heads) * d.head_dim
        if p.fused_qkv:  # v, a view of the fused projection's output, keeps all of it
            attention += (d.heads + d.kv_heads) * d.head_dim
    if p.attention_output_copies > 1 and not frozen:
        attention += (p.attention_output_copies - 1) * d.heads * d.head_dim
    if p.gated_attention:  # the output's copy, its gate's sigmoid and their product (in float32,
        # the gate's copy too)
        attention += ((2 if frozen else 3) + (compute == FLOAT32)) * d.heads * d.head_dim
    inputs = 0 if frozen else d.hidden
    lse = 0 if p.eager else FLOAT32 * d.heads
    per_sequence = (p.attention_weight_bytes(compute) * d.heads if p.eager else compute) * length * length
    per_sequence += p.sink_row_bytes(compute) * d.heads * length
    positions = compute * length if p.query_position_scale else 0  # one factor per position
    return tokens * (norm + compute * (inputs + attention) + lse) + batch * per_sequence + positions


def saved_activation_bytes(
    dims: Dims, batch: int, length: int, compute: int = FLOAT32, frozen: bool = False
) -> int:
    """Bytes a decoder forward saves for backward: every layer's (:func:`layer_activation_bytes`,
    per kind of layer: :meth:`~mergeopt.memory.sizes.Dims.layer_kinds`), then the final norm with
    its output (the output layer's input), rotary cos/sin (a pair per kind of layer where the model
    forms them so) and the token ids (int64, inputs and shifted targets)."""
    d, tokens = dims, batch * length
    final = tokens * (d.profile.norm_bytes(d.hidden, 1, compute) + compute * d.hidden)
    cast = d.profile.weight_cast and compute != FLOAT32
    final += FLOAT32 * d.hidden if d.profile.offset_weight or cast else 0
    final += per_layer_inputs_bytes(d, batch, length, compute)
    rotary = rotary_bytes(d, length, compute, batch)
    ids = 8 * tokens + 8 * batch * (length - 1)
    layers = sum(n * layer_activation_bytes(k, batch, length, compute, frozen) for k, n in d.layer_kinds())
    return layers + final + rotary + ids


def rotary_bytes(dims: Dims, length: int, compute: int, batch: int = 1) -> int:
    """Rotary embedding's cos and sin, shared by every sequence: one pair, or one per kind of
    layer where the model forms them so (OLMo3, Gemma3); one per sequence where the model forms
    them so (Qwen 3.5)."""
    if dims.linear_layers == dims.layers:  # no attention layer to read them
        return 0
    per_width = 2 * (FLOAT32 if dims.profile.rope_float32 else compute) * length
    per_width *= batch if dims.profile.rope_per_sequence else 1
    if dims.layer_shapes and dims.profile.rope_per_layer_type:  # each kind at its own head width
        widths = {shape.layer_type: shape.head_dim for shape, _ in dims.layer_shapes}
        return per_width * sum(widths.values())
    kinds = dims.profile.mask_kinds if dims.profile.rope_per_layer_type else 1
    return per_width * dims.rotary_width * kinds


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


def _contraction_bytes(recipe: Recipe, largest: int, compute: int, from_factors: bool = False) -> int:
    """⟨∂L/∂W, δ_i⟩'s temporaries: the gradient's block upcast to float32 (a narrower compute
    dtype) and, for narrow differences, their product with it. A weight merged from LoRA factors
    (``from_factors``, :mod:`mergeopt.merging.lowrank_parameters`) projects the upcast block onto
    the factors, whose products are rank-sized: the upcast alone."""
    from mergeopt.merging.layer_merge import CHUNK

    if from_factors:
        return FLOAT32 * min(largest, CHUNK) * (compute != FLOAT32)
    same, block = _blocks(recipe, largest, compute)
    return FLOAT32 * block * ((compute != FLOAT32) + (not same))


def merge_bytes(
    recipe: Recipe,
    num_experts: int,
    largest: int,
    compute: int,
    gathers: Gathers | None = None,
    from_factors: bool = False,
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
        compute * largest + _contraction_bytes(recipe, largest, compute, from_factors),
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
    layer at a time again: that layer's activations (less the MLP output projection's input, which
    that projection's backward, the first, has released by the layer's largest moment; where the
    layer ends in a norm, Gemma 4's, that norm's backward comes first and nothing is released yet)
    plus its merged weights (``layer_params`` elements in the compute dtype) are added. Within a layer's backward, a parameter's merge is in
    flight (:func:`merge_bytes`) beside one activation gradient (the module's input gradient), and
    the MLP's gated product is differentiated (two activation gradients) when no merge is. On top:
    the chunked loss's backward and the attention mask the model builds (length² booleans per
    sequence).

    LoRA experts kept low-rank add, per adapted module, the rank-Σr activations x·Aᵀ, kept for the
    gradient of their coefficients c(w) (``rank_sum`` is Σr summed over modules and experts; the
    factors need no gradient, so nothing else is kept). Each DoRA layer kept low-rank adds its
    output x W0ᵀ, kept for its row gain's gradient (``gain_rows``: Σ of those layers' output
    widths), and the (tokens × out) product its backward reduces to the gain's gradient (out at
    most the MLP's width). Where layer weights are merged, the low-rank branch's input gradient
    (tokens × in) comes beside the projection's own backward. Checkpointed, a decoder layer's
    share of those is held only while the layer is recomputed: ``lowrank_by_layer`` (per token,
    the largest layer's and what is outside the layers) replaces the total (None: every layer's
    is counted). ``factor_copies``: elements of the factors cast to the compute dtype at each
    forward and kept for the backward (all of them; checkpointed, the largest layer's and those
    outside the layers). ``frozen``: no decoder layer's weight is merged
    (:func:`layer_activation_bytes`). ``from_factors``: the layers' merged weights are formed from
    LoRA factors (a mixture of experts' fused experts: :func:`merge_bytes`).

    Eager attention (Gemma2) adds its backward's moment: the attention sublayer's kept tensors
    beside the float32 gradients of the attention weights
    (:meth:`~mergeopt.memory.layer_profiles.LayerProfile.attention_backward_bytes`); a gated
    DeltaNet layer (Qwen 3.5) its chunk algorithm's float32 gradients at the same moment
    (:meth:`~mergeopt.memory.linear_attention.LinearAttention.backward_bytes`), and a latent
    attention layer (DeepSeek-V3) on a CPU its math kernel's
    (:meth:`~mergeopt.memory.latent_attention.LatentAttention.backward_bytes`).

    A sharded stack (``gathers``) gathers the merged weights whole (:func:`merge_bytes`), the output
    layer's beside the loss, and the matrices not stacked while their modules run: with
    checkpointing the recomputed layer's among its weights, without it the largest one beside an
    activation gradient.
    """
    d, length = dims, recipe.data.max_length
    tokens = batch * length
    mask = batch * d.profile.mask_bytes(length, compute)
    lowrank = compute * tokens * (rank_sum + gain_rows)
    if recipe.optim.activation_checkpointing and lowrank_by_layer is not None:
        lowrank = compute * tokens * sum(lowrank_by_layer)
    if gain_rows:  # a DoRA layer's backward forms ∂L/∂y ⊙ x W0ᵀ (tokens × out) to sum it to ∂L/∂g
        lowrank += compute * tokens * d.intermediate
    if rank_sum and not frozen:  # beside a merged projection's backward (its input gradient and its
        # weight's contraction), the low-rank branch's input gradient (tokens × in, in ≤ the MLP's width)
        lowrank += compute * tokens * d.intermediate
    lowrank += compute * factor_copies[1 if recipe.optim.activation_checkpointing else 0]
    head = head_bytes(recipe, d, batch, length, compute, merged_head, gathers)
    merge = merge_bytes(recipe, num_experts, largest, compute, gathers, from_factors)
    unstacked = compute * gathers.unstacked if gathers else 0
    saved = saved_activation_bytes(d, batch, length, compute, frozen)
    if recipe.optim.activation_checkpointing:  # each layer's input, and what is outside the layers
        layers = sum(
            n * layer_activation_bytes(k, batch, length, compute, frozen) for k, n in d.layer_kinds()
        )
        saved += d.layers * compute * tokens * d.hidden - layers

    def layer_peak(d: Dims) -> int:
        """The moment of the backward of one layer of the kind ``d`` (beyond ``saved``)."""
        gradient = compute * tokens * d.mlp_gradient_width  # the largest activation gradient
        # a mixture of experts' backward meets its two widest moments after releasing some of what its
        # routed copies kept: the gate and up gradients joined into the fused projection's, once the
        # down projection's input and output are gone; the fused weight's contraction, once the gate's
        # and up's activations and the fused projection's output gradient are gone too (the token
        # copies the projection read stay, beside their gradient)
        joined_release = fused_release = 0
        if d.profile.moe and not frozen:
            copies = tokens * d.top_k
            joined_release = compute * copies * (d.expert_intermediate + d.hidden)
            fused_release = compute * copies * (4 * d.expert_intermediate + d.hidden) + gradient
            fused_release -= compute * copies * d.hidden
        # GPT-OSS interleaves gate and up: each half's gradient is formed at the fused width before the
        # two are added, one fused-width gradient more when every layer's activations are kept (when
        # checkpointed, the recomputed layer has released enough of its own by then: measured)
        interleaved = gradient if d.profile.clamped_swiglu and not frozen else 0
        # the first moment of a mixture of experts' backward: the gradient of its output, put back
        # in the routed copies' order (the copies' zeros it is put into, the gradient spread over
        # the copies and the product with the routing weights), in float32 where they are; at an
        # expert width narrow against the hidden size (GLM-4.5, Qwen3-MoE) the widest
        reorder = 0
        if d.profile.moe and not frozen:
            weighted = FLOAT32 if d.profile.routing_weights_float32 else compute
            reorder = 3 * weighted * tokens * d.top_k * d.hidden
        backward = max(
            2 * gradient + interleaved - joined_release,
            gradient + merge - fused_release,
            gradient + unstacked,
            reorder,
        )
        one_layer = layer_activation_bytes(d, batch, length, compute, frozen)
        # eager attention's backward, once the rest of the layer's backward has released what the
        # layer kept after its attention (zero under SDPA), or a gated DeltaNet layer's chunks'
        mixer = batch * length * length * d.heads * d.profile.attention_backward_bytes(compute)
        if d.linear_mixer:
            mixer = d.linear_mixer.backward_bytes(batch, length)
        if d.latent_attention:
            mixer = d.latent_attention.backward_bytes(d.heads, batch, length)
        attention = mixer + gradient - after_attention_bytes(d, batch, length, compute, frozen)
        if recipe.optim.activation_checkpointing:
            # the layer being recomputed: its activations, its merged weights (one of them counted by
            # the merge in flight), its backward. Its largest moments come after the backward of the
            # MLP's output projection, which runs first and releases that module's input (the gated
            # product, one intermediate-sized activation) before its weight's contraction
            released = 0 if frozen else compute * tokens * d.mlp_down_input  # frozen: never kept
            if d.profile.moe and not frozen:  # the down projection's input is released already
                joined_release, fused_release = joined_release - released, fused_release - released
            backward_peak = max(
                2 * gradient - joined_release, gradient + merge - compute * largest - fused_release
            )
            gathered = compute * gathers.layer if gathers else 0
            backward_peak = max(backward_peak, attention + released, reorder + released)
            layer = one_layer - released + compute * layer_params + gathered + backward_peak
            # a layer that ends in a norm (Gemma 4): its backward comes first, with nothing released
            end = d.profile.output_norm_backward_bytes(d.hidden, compute) * tokens
            if end:
                layer = max(layer, one_layer + compute * layer_params + gathered + end)
        else:
            layer = max(backward, attention)
        return layer

    layer = max(layer_peak(kind) for kind, _ in d.layer_kinds())
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
    A gated DeltaNet layer's working set is its chunk algorithm's float32 locals
    (:meth:`~mergeopt.memory.linear_attention.LinearAttention.evaluation_bytes`), where larger; a
    latent attention layer's, its attention's widest moment
    (:meth:`~mergeopt.memory.latent_attention.LatentAttention.evaluation_bytes`), where larger.
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

    def working_set(dims: Dims) -> int:
        """A layer's working set, for a layer of the kind ``dims``."""
        layer = e * tokens * (4 * dims.hidden + 3 * dims.intermediate)
        if dims.linear_mixer:
            return max(layer, dims.linear_mixer.evaluation_bytes(dims.hidden, batch, length, e))
        if dims.profile.moe or dims.moe_block:
            # grouped_mm reads a fused expert weight whole (merged: the largest stacked tensor at most,
            # its kernel's temporaries gone) while the routed copies' working set is alive: the token
            # copies, the fused projection's output, the gate's activation and its product with up
            copies = tokens * dims.top_k
            # GPT-OSS: its clamped SwiGLU's five activations and the gathered gate-and-up biases
            width = (9 if dims.profile.clamped_swiglu else 4) * dims.expert_intermediate
            routed = copies * (dims.hidden + width)
            # then, the down projection done, its output weighted by the routing weights (float32
            # where they are: the product is float32; Gemma 4's block's always) and put back in the
            # tokens' order, beside the token copies, one hidden-sized tensor fewer alive: at an
            # expert width narrow against the hidden size (GLM-4.5, Qwen3-MoE), this is the larger
            # moment
            weighted = FLOAT32 if dims.profile.routing_weights_float32 or dims.moe_block else e
            reordered = copies * dims.hidden * (2 * e + 2 * weighted) - e * tokens * dims.hidden
            routed_layer = e * (tokens * 4 * dims.hidden + largest) + max(e * routed, reordered)
            # Gemma 4's block runs after its dense MLP, whose output it holds
            layer = max(layer, routed_layer + e * tokens * dims.hidden) if dims.moe_block else routed_layer
            if dims.shared_intermediate:  # a shared expert, a dense MLP, beside the routed experts'
                # output: Qwen2-MoE's runs first and its output stays, DeepSeek-V3's kind runs after
                shared = e * tokens * (4 * dims.hidden + 3 * dims.shared_intermediate)
                if dims.profile.shared_expert == "gated":
                    layer = max(layer + e * tokens * dims.hidden, shared)
                else:
                    layer = max(layer, shared + e * tokens * dims.hidden)
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

    layer = max(working_set(kind) for kind, _ in dims.layer_kinds())
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


def eval_itemsize(recipe: Recipe) -> int:
    """Bytes per element of ``model.eval_dtype`` (auto: float32, on every device)."""
    name = recipe.model.eval_dtype
    return FLOAT32 if name == "auto" else DTYPES[name].itemsize


def training_batch(recipe: Recipe) -> int:
    """Examples per micro-batch: optim.batch_size from each dev set the loss puts weight on."""
    targeted = int((Objective.from_recipe(recipe).loss_set_weights() > 0).sum())
    return recipe.optim.batch_size * targeted
