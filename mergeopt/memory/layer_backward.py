"""One decoder layer's backward within a training micro-step, in bytes: its largest moment beyond
the activations the step holds when the backward starts.

:func:`mergeopt.memory.phases.training_bytes` places these in a step beside the chunked loss and
the saved activations; what each kind of layer keeps is :mod:`mergeopt.memory.activations` and
its token mixer's own moments :mod:`mergeopt.memory.linear_attention` and
:mod:`mergeopt.memory.latent_attention`. Checked in tests/test_plan.py and the layer-profile tests
against the live tensor bytes of real steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeopt.memory.activations import after_attention_bytes, layer_activation_bytes
from mergeopt.memory.sizes import FLOAT32, Dims


@dataclass(frozen=True)
class Step:
    """One micro-step as the backward of every kind of layer meets it: bytes, or elements where said."""

    checkpointed: bool
    compute: int  # bytes per element of the compute dtype
    batch: int
    length: int
    frozen: bool  # no decoder layer's weight is merged
    merge: int  # one parameter's merge in flight
    largest: int  # elements of the largest merged parameter
    layer_params: int  # elements of the largest layer's merged weights
    unstacked: int  # sharded: the largest matrix not stacked, gathered while its module runs
    gathered: int  # sharded: the recomputed layer's gathered weights

    @property
    def tokens(self) -> int:
        return self.batch * self.length


def layer_backward_bytes(d: Dims, step: Step) -> int:
    """The largest moment of the backward of one layer of the kind ``d``, beyond the activations
    the step holds when the backward starts.

    Within a layer's backward, a parameter's merge is in flight
    (:func:`~mergeopt.memory.merge_moments.merge_bytes`) beside one activation gradient (the
    module's input gradient), and the MLP's gated product is differentiated (two activation
    gradients) when no merge is. A mixture of experts meets moments of its own
    (:func:`routed_backward_moments`); eager attention, a gated DeltaNet layer or latent attention
    on a CPU meet their mixer's (:func:`mixer_backward_bytes`). Checkpointed, the layer is
    recomputed first (:func:`recomputed_layer_bytes`).
    """
    gradient = step.compute * step.tokens * d.mlp_gradient_width  # the largest activation gradient
    joined_release, fused_release, reorder = routed_backward_moments(d, step, gradient)
    attention = mixer_backward_bytes(d, step, gradient)
    if step.checkpointed:
        return recomputed_layer_bytes(d, step, gradient, attention, joined_release, fused_release, reorder)
    # GPT-OSS interleaves gate and up: each half's gradient is formed at the fused width before the
    # two are added, one fused-width gradient more when every layer's activations are kept (when
    # checkpointed, the recomputed layer has released enough of its own by then: measured)
    interleaved = gradient if d.profile.clamped_swiglu and not step.frozen else 0
    backward = max(
        2 * gradient + interleaved - joined_release,
        gradient + step.merge - fused_release,
        gradient + step.unstacked,
        reorder,
    )
    return max(backward, attention)


def routed_backward_moments(d: Dims, step: Step, gradient: int) -> tuple[int, int, int]:
    """A mixture of experts' backward (zeros elsewhere, and where no layer weight is merged): what
    its two widest moments have released, and its first moment.

    It meets its two widest moments after releasing some of what its routed copies kept: the gate
    and up gradients joined into the fused projection's, once the down projection's input and
    output are gone (``joined_release``); the fused weight's contraction, once the gate's and up's
    activations and the fused projection's output gradient are gone too (``fused_release``; the
    token copies the projection read stay, beside their gradient). Its first moment (``reorder``):
    the gradient of its output, put back in the routed copies' order (the copies' zeros it is put
    into, the gradient spread over the copies and the product with the routing weights), in float32
    where they are; at an expert width narrow against the hidden size (GLM-4.5, Qwen3-MoE) the
    widest.
    """
    if not d.profile.moe or step.frozen:
        return 0, 0, 0
    compute, copies = step.compute, step.tokens * d.top_k
    joined_release = compute * copies * (d.expert_intermediate + d.hidden)
    fused_release = compute * copies * (4 * d.expert_intermediate + d.hidden) + gradient
    fused_release -= compute * copies * d.hidden
    weighted = FLOAT32 if d.profile.routing_weights_float32 else compute
    reorder = 3 * weighted * step.tokens * d.top_k * d.hidden
    return joined_release, fused_release, reorder


def mixer_backward_bytes(d: Dims, step: Step, gradient: int) -> int:
    """The token mixer's backward, once the rest of the layer's backward has released what the layer
    kept after its attention: eager attention's (Gemma2: the attention sublayer's kept tensors
    beside the float32 gradients of the attention weights,
    :meth:`~mergeopt.memory.layer_profiles.LayerProfile.attention_backward_bytes`; zero under SDPA),
    a gated DeltaNet layer's chunk algorithm's float32 gradients (Qwen 3.5,
    :meth:`~mergeopt.memory.linear_attention.LinearAttention.backward_bytes`), or a latent attention
    layer's math kernel on a CPU (DeepSeek-V3,
    :meth:`~mergeopt.memory.latent_attention.LatentAttention.backward_bytes`)."""
    batch, length = step.batch, step.length
    mixer = batch * length * length * d.heads * d.profile.attention_backward_bytes(step.compute)
    if d.linear_mixer:
        mixer = d.linear_mixer.backward_bytes(batch, length)
    if d.latent_attention:
        mixer = d.latent_attention.backward_bytes(d.heads, batch, length)
    return mixer + gradient - after_attention_bytes(d, batch, length, step.compute, step.frozen)


def recomputed_layer_bytes(
    d: Dims, step: Step, gradient: int, attention: int, joined_release: int, fused_release: int, reorder: int
) -> int:
    """A checkpointed layer's backward: the layer being recomputed, its activations (less the MLP
    output projection's input, which that projection's backward, the first, has released by the
    layer's largest moment), its merged weights (one of them counted by the merge in flight) and
    its backward. Where the layer ends in a norm (Gemma 4), that norm's backward comes first and
    nothing is released yet."""
    compute, tokens, frozen = step.compute, step.tokens, step.frozen
    one_layer = layer_activation_bytes(d, step.batch, step.length, compute, frozen)
    released = 0 if frozen else compute * tokens * d.mlp_down_input  # frozen: never kept
    if d.profile.moe and not frozen:  # the down projection's input is released already
        joined_release, fused_release = joined_release - released, fused_release - released
    backward_peak = max(
        2 * gradient - joined_release, gradient + step.merge - compute * step.largest - fused_release
    )
    backward_peak = max(backward_peak, attention + released, reorder + released)
    weights = compute * step.layer_params + step.gathered
    layer = one_layer - released + weights + backward_peak
    # a layer that ends in a norm (Gemma 4): its backward comes first, with nothing released
    end = d.profile.output_norm_backward_bytes(d.hidden, compute) * tokens
    if end:
        layer = max(layer, one_layer + weights + end)
    return layer
