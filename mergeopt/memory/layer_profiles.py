"""What a decoder layer of each architecture keeps for the backward, beyond its shapes.

The activation estimate (:mod:`mergeopt.memory.activations`) is written per tensor autograd saves, and
the architectures users fine-tune differ in exactly those tensors: where an RMSNorm applies its
weight (Llama casts the normalised value back to the compute dtype first, Gemma and OLMo2 multiply
in float32 and so keep the float32 value), how many norms a layer has and whether a projection reads
their output (Gemma2's post-norms, OLMo2's norms after each sublayer), per-head or whole-width norms
of q and k (Qwen3, Gemma3, OLMo2), and eager attention, which keeps every head's attention weights
(Gemma2: transformers has no SDPA path for its soft-capping; GPT-OSS, whose attention has sinks), and
a mixture of experts in place of the MLP (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE, OLMoE,
GPT-OSS, and DeepSeek-V3's kind with dense first layers, a grouped sigmoid router and shared experts:
GLM-4.5, dots.llm1): the router's tensors and, per routed copy of a token, what transformers'
grouped_mm keeps; gated attention beside gated DeltaNet linear-attention layers (Qwen 3.5,
Qwen3.5-MoE, Qwen3-Next: :mod:`mergeopt.memory.linear_attention`); multi-head latent attention
(DeepSeek-V3: :mod:`mergeopt.memory.latent_attention`, read from config.json's widths, not from the
profile); Gemma 4's norms (float32, two scalars per row, a weight cast per layer), its norm over v,
its per-layer inputs and its layers of different widths (:mod:`mergeopt.memory.layer_shapes`). A
profile names those
differences, read from config.json's ``model_type``; each is checked against what autograd saves in
tests/test_layer_profiles.py (measured with transformers 5.25: a release that changes a model's
forward shows there first). A model type not profiled is
planned as a Llama layer, or as a mixture of experts of Mixtral's kind where its config names
routed experts (of DeepSeek-V3's where it names groups of them), and the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

FLOAT32 = 4


def _cast(compute: int) -> int:
    """Bytes of a float32 tensor's cast to the compute dtype (none when that is float32)."""
    return 0 if compute == FLOAT32 else compute


@dataclass(frozen=True)
class LayerProfile:
    """The activation-relevant structure of one decoder layer.

    ``norm_weight_float32``: the RMSNorm multiplies its weight in float32 and casts after (Gemma,
    OLMo2), so it keeps the float32 normalised value rather than its cast. ``pre_norms``: norms whose
    output the projections read (Llama: 2); the sublayers without one read the residual stream.
    ``post_norms``: norms on a sublayer's output, added to the residual stream. ``qk_norm``: ``head``
    (over head_dim, per head) or ``full`` (over every head at once) norms of q and k. ``eager``:
    transformers' default attention for the model is eager (attention weights kept per head).
    ``offset_weight``: the norm scales by 1 + weight, formed in float32 and kept (Gemma).
    ``attention_output_copies``: 2 where the attention output is kept by SDPA and copied again for
    the output projection (Phi3). ``rope_float32``: cos and sin are kept in float32.
    ``rope_per_layer_type``: cos and sin are formed once per kind of layer (Gemma3's and OLMo3's
    sliding-window and full layers, each kind with its own rotary parameters).
    ``query_position_scale``: each layer scales q by a factor per position, which it keeps
    (Ministral 3's long-context scaling of the attention).
    ``mask_kinds``: the attention masks the model builds per sequence (Gemma2's alternating sliding
    and full layers: 2); eager attention adds them as float masks in the compute dtype.
    ``moe``: the MLP is a mixture of experts run by transformers' grouped_mm (:meth:`moe_mlp_bytes`);
    ``router_renorm``: its top-k routing weights are renormalised to sum to one (Mixtral always,
    Qwen3-MoE where ``norm_topk_prob``); ``routing_weights_float32``: they stay float32 (Mixtral;
    Qwen3-MoE casts them to the compute dtype); ``shared_expert``: a dense MLP beside the routed
    experts, ``gated`` (scaled by a sigmoid gate: Qwen2-MoE) or ``plain`` (added as it is: GLM-4.5).
    ``grouped_router``: DeepSeek-V3's router, which GLM-4.5 and dots.llm1 share: a float32 linear
    over the MLP's input, sigmoid scores, the top-k experts within the best groups of experts.
    ``attention_sinks``: eager attention with a learned sink logit per head, its softmax in the
    compute dtype over the keys and the sink, the router's softmax over the top-k logits alone,
    biased experts (GPT-OSS); ``clamped_swiglu``: the experts' activation clamps gate and up and
    scales the gate inside its sigmoid (GPT-OSS).
    ``gated_attention``: q's projection also gives a gate per head, whose sigmoid scales the
    attention's output (Qwen 3.5, Qwen3-Next); ``rope_per_sequence``: cos and sin are formed per
    sequence (Qwen 3.5's multimodal positions). Their gated DeltaNet layers:
    :mod:`mergeopt.memory.linear_attention`.
    ``fused_qkv``: one projection gives q, k and v, so a v not copied per head (as many key heads
    as heads, or one) is a view that keeps the projection's whole output (Phi3).
    ``norm_row_scalars``: float32 scalars a norm keeps per row (Gemma 4's: its mean square and
    the power it raises it to, 2); ``weight_cast``: each norm casts its weight to float32 once per
    layer, a copy kept where the compute dtype is narrower (Gemma 4); ``v_norm``: a norm without
    weight over v (Gemma 4); ``per_layer_shapes``: the layers' widths differ from layer to layer
    (Gemma 4: :mod:`mergeopt.memory.layer_shapes`). ``output_norm_first``: the layer's output
    leaves through a float32 norm (Gemma 4's, after its per-layer input) whose backward runs
    first, while every activation of the recomputed layer is still alive
    (:meth:`output_norm_backward_bytes`).
    """

    norm_weight_float32: bool = False
    offset_weight: bool = False
    pre_norms: int = 2
    post_norms: int = 0
    qk_norm: str | None = None
    eager: bool = False
    attention_softcap: bool = False
    attention_output_copies: int = 1
    rope_float32: bool = False
    rope_per_layer_type: bool = False
    query_position_scale: bool = False
    mask_kinds: int = 1
    moe: bool = False
    router_renorm: bool = False
    routing_weights_float32: bool = False
    shared_expert: str | None = None
    grouped_router: bool = False
    attention_sinks: bool = False
    clamped_swiglu: bool = False
    gated_attention: bool = False
    rope_per_sequence: bool = False
    fused_qkv: bool = False
    norm_row_scalars: int = 1
    weight_cast: bool = False
    v_norm: bool = False
    per_layer_shapes: bool = False
    output_norm_first: bool = False

    def output_norm_backward_bytes(self, hidden: int, compute: int) -> int:
        """Per token, the backward of a layer's output norm (``output_norm_first``): three float32
        temporaries of its mean square's gradient (the squared input's, its product with the
        incoming gradient, the mean's spread back over the row) beside the residual stream's
        gradient and its sum with the branch's, in the compute dtype. Measured on Gemma 4, where
        it is the checkpointed step's peak (the plan was 0.96x of it without)."""
        return (3 * FLOAT32 + 2 * compute) * hidden if self.output_norm_first else 0

    def norm_bytes(self, elements: int, rows: int, compute: int, frozen: bool = False) -> int:
        """Bytes one RMSNorm over ``elements`` per token (``rows`` norms of them) keeps, its output
        not counted: the float32 input (in float32 the input itself), the normalised value as the
        weight's product reads it (float32, or cast to the compute dtype) and a reciprocal RMS per
        row. ``frozen``: no weight gradient, so only the input and the reciprocal RMS."""
        weighted = 0 if frozen else (FLOAT32 if self.norm_weight_float32 else compute)
        return elements * (FLOAT32 + weighted) + FLOAT32 * rows * self.norm_row_scalars

    def qk_norm_bytes(self, heads: int, kv_heads: int, head_dim: int, compute: int, frozen: bool) -> int:
        """Per token, the norms of q and k (neither output is kept: rotary embedding needs neither)."""
        if self.qk_norm == "head":
            return self.norm_bytes((heads + kv_heads) * head_dim, heads + kv_heads, compute, frozen)
        if self.qk_norm == "full":
            return self.norm_bytes(heads * head_dim, 1, compute, frozen) + self.norm_bytes(
                kv_heads * head_dim, 1, compute, frozen
            )
        return 0

    def norm_weight_bytes(
        self, hidden: int, heads: int, kv_heads: int, head_dim: int, compute: int = FLOAT32, norms: int = 0
    ) -> int:
        """Per layer (not per token): the float32 1 + weight of each norm, where the norm forms it,
        or its float32 cast where the norm casts it and the compute dtype is narrower; ``norms``:
        hidden-wide norms beyond the profile's pre- and post-norms (Gemma 4's after its per-layer
        input). A layer without key heads of its own (``kv_heads`` 0) has no k norm."""
        if not (self.offset_weight or (self.weight_cast and compute != FLOAT32)):
            return 0
        k = 1 if kv_heads else 0
        qk = {"head": (1 + k) * head_dim, "full": (heads + kv_heads) * head_dim}.get(self.qk_norm or "", 0)
        return FLOAT32 * ((self.pre_norms + self.post_norms + norms) * hidden + qk)

    def attention_weight_bytes(self, compute: int) -> int:
        """Eager attention, per head and (query, key) pair: the float32 softmax output, its cast to
        the compute dtype that the product with v reads, and the soft-cap's tanh output; with
        sinks, the softmax output in the compute dtype (its sink column: :meth:`sink_row_bytes`)."""
        if not self.eager:
            return 0
        if self.attention_sinks:
            return compute
        return FLOAT32 + _cast(compute) + (compute if self.attention_softcap else 0)

    def sink_row_bytes(self, compute: int) -> int:
        """Per head and query, what attention sinks add: the softmax's sink column and the int64
        index of the row's maximum (subtracted before the softmax)."""
        return compute + 8 if self.attention_sinks else 0

    def attention_backward_bytes(self, compute: int) -> int:
        """Eager attention's backward, per head and (query, key) pair, beyond what the forward kept:
        the weights' gradient in float32 and the softmax's input gradient, once the product with v
        has released the cast weights."""
        if not self.eager:
            return 0
        if self.attention_sinks:
            return 2 * compute
        return 2 * FLOAT32 - _cast(compute)

    def eager_scores_bytes(self, compute: int) -> int:
        """Eager attention without autograd, per head and (query, key) pair, at the softmax: the
        scores in the compute dtype, the softmax's float32 output and, when the scores are not
        float32, their float32 upcast."""
        if self.attention_sinks:  # the logits with the sink column, less their maximum, the softmax
            return 3 * compute
        return 2 * FLOAT32 + _cast(compute)

    def moe_mlp_bytes(
        self,
        hidden: int,
        experts: int,
        top_k: int,
        expert_width: int,
        compute: int,
        frozen: bool,
        groups: tuple[int, int] = (1, 1),
    ) -> int:
        """Per token, what a mixture-of-experts MLP keeps beyond its input: the router's float32
        probabilities over every expert and its top-k indices (int64), the renormalisation's sum and
        weights (float32), the three int64 indices per routed copy that sort the copies by expert
        and back, the routing weight of each copy, and per copy (top_k of them per token) what a
        dense MLP keeps plus the copy of the token the experts read and the expert's output that
        the routing weight multiplies: 2·hidden + 4·width. ``frozen`` (no expert weight merged):
        neither the token copies nor the down projection's input are kept.

        A grouped router keeps the sigmoid's float32 scores in place of the softmax's
        probabilities, the int64 indices of each group's two best experts and of the groups it
        picks, and the boolean mask of the experts in those groups (these three are released when
        the router returns: the choice has no gradient, but autograd saves them while it runs) and,
        where the compute dtype is narrower, its float32 copy of the MLP's input."""
        router = FLOAT32 * experts + 8 * top_k + (FLOAT32 * (1 + top_k) if self.router_renorm else 0)
        if self.grouped_router:
            router += 16 * groups[0] + 8 * groups[1] + experts
            router += FLOAT32 * hidden if compute != FLOAT32 and not frozen else 0
        if self.attention_sinks:  # GPT-OSS: top-k of the logits, a softmax over those k alone
            router = 8 * top_k + compute * top_k
        weight = FLOAT32 if self.routing_weights_float32 else compute
        width = (7 if self.clamped_swiglu else 4) * expert_width
        per_copy = (
            (4 if self.attention_sinks and not frozen else 3) * 8  # GPT-OSS gathers its experts' biases too
            + weight
            + compute * ((hidden + width - expert_width) if frozen else (2 * hidden + width))
        )
        return router + top_k * per_copy

    def shared_expert_bytes(self, hidden: int, width: int, compute: int, frozen: bool) -> int:
        """Per token, a shared expert's dense MLP of ``width`` (as a Llama MLP's, its input the
        routed experts' own) and, gated, its gate: the sigmoid's output and the MLP output it
        scales."""
        if not self.shared_expert:
            return 0
        gate = hidden + 1 if self.shared_expert == "gated" else 0
        return compute * ((3 if frozen else 4) * width + gate)

    def mask_bytes(self, length: int, compute: int) -> int:
        """Per sequence, the attention masks held through the step: SDPA's boolean mask, or eager
        attention's float masks in the compute dtype, one per kind of layer."""
        return length * length * (compute * self.mask_kinds if self.eager else 1)


LLAMA = LayerProfile()
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # config.json's routed experts
_GEMMA_NORMS = dict(norm_weight_float32=True, offset_weight=True)
_OLMO = LayerProfile(norm_weight_float32=True, pre_norms=0, post_norms=2, qk_norm="full", rope_float32=True)
_GROUPED = LayerProfile(moe=True, grouped_router=True, routing_weights_float32=True, shared_expert="plain")
_QWEN3_5 = LayerProfile(**_GEMMA_NORMS, qk_norm="head", gated_attention=True, rope_per_sequence=True)
PROFILES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "ministral3": LayerProfile(query_position_scale=True),
    "qwen2": LLAMA,
    "granite": LLAMA,  # its scalar multipliers keep nothing more
    "seed_oss": LLAMA,
    "qwen3": LayerProfile(qk_norm="head"),
    "exaone4": LayerProfile(qk_norm="head"),  # norms after the sublayers keep what pre-norms keep
    "hunyuan_v1_dense": LayerProfile(qk_norm="head"),
    "gemma": LayerProfile(**_GEMMA_NORMS),
    "gemma2": LayerProfile(**_GEMMA_NORMS, post_norms=2, eager=True),
    "gemma3_text": LayerProfile(**_GEMMA_NORMS, post_norms=2, qk_norm="head", rope_per_layer_type=True),
    "phi3": LayerProfile(attention_output_copies=2, fused_qkv=True),
    "olmo2": _OLMO,
    "olmo3": replace(_OLMO, rope_per_layer_type=True),  # OLMo2's layer, over sliding-window and full layers
    "smollm3": LLAMA,  # Llama's layer; every fourth without rotary embedding (the same tensors kept)
    "mixtral": LayerProfile(moe=True, router_renorm=True, routing_weights_float32=True),
    "qwen3_moe": LayerProfile(qk_norm="head", moe=True),
    "qwen2_moe": LayerProfile(moe=True, shared_expert="gated"),
    "olmoe": LayerProfile(qk_norm="full", moe=True),
    # DeepSeek-V3's mixture of experts beside grouped-query attention: GLM-4.5 (rotary embedding
    # over part of each head, joined back to the rest: SDPA's output is then copied for the output
    # projection; per-head q/k norms where its config says use_qk_norm), dots.llm1 (per-head q/k norms)
    "glm4_moe": replace(_GROUPED, attention_output_copies=2),
    # DeepSeek-V3 itself (and Moonlight): its mixture of experts beside multi-head latent attention
    # (mergeopt.memory.latent_attention, from config.json's kv_lora_rank and head widths)
    "deepseek_v3": _GROUPED,
    "dots1": replace(_GROUPED, qk_norm="head", rope_per_layer_type=True),
    # Gemma 4: norms that multiply their weight, cast to float32, in float32, keeping two float32
    # scalars per row; per-head q/k norms and a norm without weight over v; cos and sin per kind of
    # layer, each at its kind's head width (mergeopt.memory.layer_shapes); per-layer inputs; the
    # layer's output norm, whose backward is a recomputed layer's first moment
    "gemma4_text": LayerProfile(
        norm_weight_float32=True,
        post_norms=2,
        qk_norm="head",
        rope_per_layer_type=True,
        norm_row_scalars=2,
        weight_cast=True,
        v_norm=True,
        per_layer_shapes=True,
        output_norm_first=True,
    ),
    "gpt_oss": LayerProfile(
        norm_weight_float32=True, eager=True, attention_sinks=True, moe=True, clamped_swiglu=True
    ),
    # Qwen 3.5: Gemma's norms, per-head q/k norms, gated attention in every fourth layer and gated
    # DeltaNet linear attention in the others (mergeopt.memory.linear_attention)
    "qwen3_5_text": _QWEN3_5,
    # with Qwen2-MoE's mixture of experts (a gated shared expert) in every layer: Qwen3.5-MoE (its
    # routing weights always renormalised), and Qwen3-Next (its cos and sin shared by every sequence)
    "qwen3_5_moe_text": replace(_QWEN3_5, moe=True, router_renorm=True, shared_expert="gated"),
    "qwen3_next": replace(_QWEN3_5, moe=True, shared_expert="gated", rope_per_sequence=False),
}
# a mixture of experts of a type not profiled: its MLP planned as a routed one of Mixtral's kind,
# or of DeepSeek-V3's where its config names groups of experts (n_group, topk_group)
ROUTED = LayerProfile(moe=True)
GROUPED_KEYS = ("n_group", "topk_group")


def profile_for(config: dict) -> LayerProfile:
    """The profile of a config.json (a multimodal config's text part already picked). A model type
    not in :data:`PROFILES` gets Llama's (:func:`not_profiled_note`)."""
    routed = (_GROUPED if routes_in_groups(config) else ROUTED) if routes(config) else LLAMA
    profile = PROFILES.get(str(config.get("model_type", "")), routed)
    if profile.eager and config.get("attn_logit_softcapping") is not None:
        profile = replace(profile, attention_softcap=True)
    if profile.moe and config.get("norm_topk_prob"):
        profile = replace(profile, router_renorm=True)
    if profile.grouped_router and config.get("use_qk_norm"):  # GLM-4.5's switch
        profile = replace(profile, qk_norm="head")
    kinds = len(set(config.get("layer_types") or ())) or 1
    return replace(profile, mask_kinds=kinds) if kinds != profile.mask_kinds else profile


def routes(config: dict) -> bool:
    """Whether config.json names routed experts (a mixture of experts)."""
    return any(isinstance(config.get(k), int) and config[k] > 0 for k in EXPERT_COUNT_KEYS)


def routes_in_groups(config: dict) -> bool:
    """Whether config.json names groups of routed experts (DeepSeek-V3's router)."""
    return any(isinstance(config.get(k), int) for k in GROUPED_KEYS)


def not_profiled_note(
    model_type: str, routed: bool = False, grouped: bool = False, linear: bool = False, latent: bool = False
) -> str | None:
    """The plan's note for a model type whose layer is estimated as Llama's, or as a mixture of
    experts of Mixtral's kind (``routed``: the config names routed experts) or of DeepSeek-V3's
    (``grouped`` too: groups of them) (None: profiled), its ``linear`` attention layers as Qwen
    3.5's gated DeltaNet (config.json's layer_types name them), its ``latent`` attention as
    DeepSeek-V3's (config.json names a kv_lora_rank)."""
    if model_type in PROFILES:
        return None
    kind = "Llama's"
    if routed:
        kind = f"a mixture of experts of {'DeepSeek-V3' if grouped else 'Mixtral'}'s kind"
    layers = "its attention layers" if linear else "its layers"
    also = "; its linear_attention layers as Qwen 3.5's gated DeltaNet" if linear else ""
    also += "; its latent attention as DeepSeek-V3's" if latent else ""
    return (
        f"activations: model type {model_type or '(none)'} is not profiled; {layers} are estimated "
        f"as {kind}{also} (profiled: {', '.join(sorted(PROFILES))})"
    )
