"""What a multi-head latent attention layer keeps for the backward: DeepSeek-V3's attention (and
Moonlight's, which is DeepSeek-V3's model type).

Its projections pass through two narrow latents, each normalised (q's of ``q_lora_rank`` and the
keys' and values' of ``kv_lora_rank``), and its heads are wider for q and k (a part without
rotary embedding and a rotated part of ``qk_rope_head_dim``) than for v. Planned as a Llama
layer, it fell short by a third on a small model and by nearly half at DeepSeek-V3's shapes,
because the attention kernel that runs it depends on those unequal widths:

- on a CPU, PyTorch's fused attention needs equal widths, so SDPA runs its math kernel: q (scaled),
  k and v in float32 whatever the compute dtype, and every head's float32 attention weights,
  length² per sequence, as eager attention keeps them;
- on a GPU, the memory-efficient kernel takes unequal widths: q, k, v (a view of the key-and-value
  projection's output, whose storage it keeps whole), its output and a float32 log-sum-exp per
  head, as for a Llama layer.

Every term of :meth:`LatentAttention.saved_bytes` is a tensor autograd saves, checked on the CPU
against small random models in tests/test_latent_attention.py (transformers 5.25); the GPU's terms
are checked by that file's CUDA-marked test, which runs only on a GPU (none has run it yet).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mergeopt.errors import UserError

FLOAT32 = 4
# config.json's keys of a latent attention's widths; q_lora_rank may be null (no q latent:
# DeepSeek-V2-Lite's kind), the others must be integers
_WIDTH_KEYS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class LatentAttention:
    """A latent attention layer's widths, from config.json: the q latent (None: q projected from the
    hidden state directly), the keys' and values' latent, each head's q and k width without and with
    rotary embedding, and its v width. ``math_kernel``: SDPA runs PyTorch's math kernel, as on a CPU
    where the widths are unequal (:meth:`on_device`)."""

    q_rank: int | None
    kv_rank: int
    nope_dim: int
    rope_dim: int
    value_dim: int
    math_kernel: bool = False

    @classmethod
    def from_config(cls, config: dict, where: str) -> LatentAttention | None:
        """The config's latent attention widths, or None where it names no ``kv_lora_rank``."""
        if config.get("kv_lora_rank") is None:
            return None
        for key in _WIDTH_KEYS:
            if not isinstance(config.get(key), int) or isinstance(config.get(key), bool):
                raise UserError(
                    f"{where}: config.json has kv_lora_rank (latent attention) but no integer {key}"
                )
        q_rank = config.get("q_lora_rank")
        if q_rank is not None and not isinstance(q_rank, int):
            raise UserError(f"{where}: config.json's q_lora_rank must be an integer or null, not {q_rank!r}")
        return cls(q_rank, *(config[k] for k in _WIDTH_KEYS))

    @property
    def qk_dim(self) -> int:
        """Each head's width of q and k: the part without rotary embedding and the rotated part."""
        return self.nope_dim + self.rope_dim

    def on_device(self, device: str) -> LatentAttention:
        """The widths as SDPA runs them on ``device``: PyTorch's math kernel on a CPU when q's and
        v's widths differ (its fused kernel needs them equal), the fused kernels elsewhere."""
        math = device.split(":")[0] == "cpu" and self.qk_dim != self.value_dim
        return self if math == self.math_kernel else replace(self, math_kernel=math)

    def saved_bytes(
        self, hidden: int, heads: int, batch: int, length: int, compute: int, frozen: bool = False
    ) -> int:
        """Bytes the attention keeps after its pre-norm's own tensors, up to its output projection's
        input, for ``batch`` right-padded sequences of ``length``.

        Per token: the pre-norm's output as the two first projections' input; each latent's RMSNorm
        (its float32 input, its reciprocal RMS and the normalised value as its weight's product
        reads it) and its output as the next projection's input. In float32 the keys' latent is a
        slice of the projection that also gives the rotated key, whose whole storage the norm keeps.
        Then the kernel's tensors (:meth:`kernel_bytes`) and the output projection's input: the
        kernel's output, copied from its (batch, heads, length) order into the tokens' (q, joined
        from its two parts, is in that order, and a kernel's output follows q's; a GPU kernel that
        writes its output in the tokens' order would need no copy: the plan is then over by that
        input, a tenth of the layer's attention at DeepSeek-V3's widths). Rotary
        embedding keeps cos and sin alone, shared by the layers (:func:`~mergeopt.memory.activations.rotary_bytes`).

        ``frozen`` (no weight merged): the projections keep no input and the norms no normalised
        value, for no weight needs a gradient."""
        weighted = 0 if frozen else 1

        def norm(width: int) -> int:  # an RMSNorm of Llama's kind over one latent, and what reads it
            return width * (FLOAT32 + weighted * compute) + FLOAT32 + weighted * compute * width

        per_token = weighted * compute * hidden + norm(self.kv_rank)
        per_token += norm(self.q_rank) if self.q_rank is not None else 0
        if compute == FLOAT32:  # the keys' latent, a slice of the projection's output
            per_token += FLOAT32 * self.rope_dim
        per_token += weighted * compute * heads * self.value_dim  # the kernel's output, reordered
        return batch * length * per_token + self.kernel_bytes(heads, batch, length, compute)

    def kernel_bytes(self, heads: int, batch: int, length: int, compute: int) -> int:
        """What SDPA keeps. The math kernel (:meth:`on_device`): per token and head q (scaled), k
        and v in float32 (v as wide as its projection's storage for one float32 sequence); per
        sequence and head the float32 attention weights (length²). A fused
        kernel: per token and head q and k in the compute dtype, v's storage (the key-and-value
        projection's output, the keys' part without rotary embedding beside v), the output, and a
        float32 log-sum-exp; per sequence the padding mask in the compute dtype."""
        tokens = batch * length
        if self.math_kernel:
            # v is a view of the projection's output, which the kernel copies to fold the heads into
            # the batch but for one float32 sequence (a view then, its storage kept whole)
            value = self.value_dim + (self.nope_dim if compute == FLOAT32 and batch == 1 else 0)
            return FLOAT32 * heads * (tokens * (2 * self.qk_dim + value) + batch * length * length)
        per_head = compute * (2 * self.qk_dim + self.nope_dim + 2 * self.value_dim) + FLOAT32
        return tokens * heads * per_head + batch * compute * length * length

    def backward_bytes(self, heads: int, batch: int, length: int) -> int:
        """The math kernel's backward, beyond what its forward kept: the float32 gradient of every
        head's attention weights and the softmax's input gradient (length² each per sequence), as
        for eager attention. None for a fused kernel, which recomputes its blocks."""
        return 2 * FLOAT32 * heads * batch * length * length if self.math_kernel else 0

    def evaluation_bytes(self, hidden: int, heads: int, batch: int, length: int, compute: int) -> int:
        """The attention's working set without autograd (an evaluation batch), at the kernel's
        largest moment, beside the residual stream (not counted): the layer's input and its norm;
        the keys' latent with the rotated key, its norm's output and the rotated key after rotary
        embedding; per head q as projected, its rotated part after rotary embedding, q and k joined
        from their two parts, and the key-and-value projection's output; the padding mask (boolean
        and in the compute dtype) per sequence. The math kernel: every head's float32 scores with
        the mask added (length² each per sequence), the scaled q in float32 and, narrower, the
        float32 copies of q, k and v. A fused kernel: its output."""
        tokens = batch * length
        latent = 2 * self.kv_rank + 2 * self.rope_dim
        per_head = 3 * self.qk_dim + self.nope_dim + self.value_dim + self.rope_dim
        if not self.math_kernel:
            per_head += self.value_dim
        per_token = compute * (2 * hidden + latent + heads * per_head)
        per_sequence = (compute + 1) * length * length
        if self.math_kernel:  # the scaled q and, narrower, the float32 copies of q, k and v
            upcast = self.qk_dim if compute == FLOAT32 else 3 * self.qk_dim + self.value_dim
            per_token += FLOAT32 * heads * upcast
            per_sequence += 2 * FLOAT32 * heads * length * length
        return tokens * per_token + batch * per_sequence
