"""What a decoder's forward saves for its backward, in bytes: per layer, per kind of layer, per model.

The training step's plan (:func:`mergeopt.memory.phases.training_bytes`) is built from these: a
layer's saved tensors are what activation checkpointing recomputes and what an unchecked step holds
for every layer at once. Each term is written from the tensors autograd saves, as the
architecture's profile (:class:`~mergeopt.memory.layer_profiles.LayerProfile`) describes them, and
checked against what autograd saves in tests/test_layer_profiles.py, tests/test_layer_shapes.py,
tests/test_latent_attention.py and tests/test_linear_attention.py.
"""

from __future__ import annotations

from dataclasses import replace

from mergeopt.memory.sizes import FLOAT32, Dims


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
    released everything else (:func:`~mergeopt.memory.phases.training_bytes`). A gated DeltaNet layer (Qwen 3.5) keeps its
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
