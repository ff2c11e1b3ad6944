"""What a gated DeltaNet layer keeps for the backward: the linear attention of Qwen 3.5 and
Qwen3-Next, three of every four of their layers.

transformers runs it, where flash-linear-attention's kernels are not installed (on a CPU always),
as PyTorch code that splits the sequence into chunks of 64 tokens: every chunk's (64 × 64)
matrices per value head in float32, whatever the compute dtype, and a recurrent state per head
carried from chunk to chunk. Those, not the projections, are most of what such a layer keeps, so a
plan that estimated it as an attention layer fell short by more than half (0.42x of the activations
autograd saves at the shapes transformers gives Qwen3.5-27B, in bfloat16). Every term of
:meth:`LinearAttention.saved_bytes` is a tensor autograd saves, checked on small random models in
tests/test_linear_attention.py (transformers 5.25); the backward's and an evaluation's moments are
fitted to measured peaks. flash-linear-attention's kernels, where a GPU has them, keep less: the
plan is then an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeopt.errors import UserError

FLOAT32 = 4
CHUNK = 64  # transformers' torch_chunk_gated_delta_rule


def _padded(length: int) -> int:
    """The length rounded up to whole chunks, as the chunk algorithm pads it."""
    return -(-length // CHUNK) * CHUNK


@dataclass(frozen=True)
class LinearAttention:
    """A gated DeltaNet layer's shapes, from config.json's ``linear_*`` keys: key heads and their
    width, value heads (a multiple of the key heads, which are repeated to them) and their width,
    and the causal convolution's kernel over q, k and v. ``fused_projection``: one projection
    gives q, k, v and the output gate, which the layer reorders into copies (Qwen3-Next)."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    conv_kernel: int
    fused_projection: bool = False

    @classmethod
    def from_config(cls, config: dict, where: str) -> LinearAttention | None:
        """The config's gated DeltaNet shapes, or None where it has no linear-attention layers."""
        if "linear_attention" not in (config.get("layer_types") or ()):
            return None
        keys = (
            "linear_num_key_heads",
            "linear_key_head_dim",
            "linear_num_value_heads",
            "linear_value_head_dim",
        )
        for key in keys:
            if not isinstance(config.get(key), int):
                raise UserError(f"{where}: config.json has linear_attention layers but no {key}")
        kernel = config.get("linear_conv_kernel_dim")
        return cls(
            *(config[k] for k in keys),
            conv_kernel=kernel if isinstance(kernel, int) else 4,
            fused_projection=config.get("model_type") == "qwen3_next",
        )

    @property
    def channels(self) -> int:
        """The convolution's channels: q, k (key heads) and v (value heads), side by side."""
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def saved_bytes(self, hidden: int, batch: int, length: int, compute: int, frozen: bool = False) -> int:
        """Bytes the layer's token mixer keeps, from its input (the pre-norm's output, not counted)
        to its output projection's input, for ``batch`` right-padded sequences of ``length``.

        Per token: the padding mask (int64; transformers applies it to a batch with padding, which
        the plan assumes), the convolution's input and β (the compute dtype), the decay's float32
        softplus input and output, and q and k repeated to every value head in float32 with their
        l2 norms' reciprocals; the convolution's output with its kernel − 1 extra positions; the gated
        RMSNorm over the output (float32 input, its reciprocal, the normalised value in the compute
        dtype, the gate in float32 and its SiLU, and their product as the output projection reads
        it); the projections' inputs (the masked input, the gated output). Per padded position
        (the length rounded up to chunks of 64) and value head, in float32: β, v and k padded, k·β
        and the scaled q, the cumulative decay and its two exponentials, the new values and the
        decayed keys the chunk's solve gives, q and k with their decay, one value-width difference
        per chunk, and five 64-wide matrices (the pairwise decay, k·β kᵀ, the system solved, q kᵀ
        and it with its decay). Per chunk: the recurrent state each chunk reads and the chunk's
        decay. Per layer: two float32 vectors per value head and the chunk's boolean mask.

        PyTorch's copies depend on the shapes (measured, tests/test_linear_attention.py): with one
        chunk, the last decayed key is read as a view of the whole; in float32 with as many value
        heads as key heads, v is copied once more (and a fused projection's reordered q, k and v);
        in float32 at a length that needs no padding, q and k are copied more: with repeated heads
        over several sequences three (value heads × length × key width) copies and one chunk's of
        one for every chunk but the last (at least one), otherwise four copies over several chunks
        and none over one.

        ``frozen`` (no weight merged): the projections and the norm's weight keep nothing for a
        weight's gradient."""
        hk, dk, hv, dv = self.key_heads, self.key_dim, self.value_heads, self.value_dim
        tokens = batch * length
        padded = _padded(length)
        chunks = padded // CHUNK
        weighted = 0 if frozen else 1  # kept only for a weight's gradient
        per_token = compute * self.channels + compute * hv + (1 + weighted) * FLOAT32 * hv
        per_token += 2 * FLOAT32 * hv * (dk + 1) + 8  # q and k's l2 norms, the padding mask
        per_token += hv * dv * (3 * FLOAT32 + (1 + weighted) * compute) + FLOAT32 * hv  # the gated RMSNorm
        per_token += weighted * compute * (hidden + hv * dv)  # the projections' inputs
        # per padded position and value head, in float32: β, v and k padded; five chunk-wide
        # matrices; k·β and the scaled q; the cumulative decay and its two exponentials; the new
        # values and decayed keys of the solve; each chunk's value difference; q and k decayed
        width = (1 + dv + dk) + 5 * CHUNK + 2 * dk + 3 + (dv + dk) + dv + 2 * dk
        if chunks == 1:  # the last chunk's decayed key, read as a view of the whole
            width -= dk
        if compute == FLOAT32 and hk == hv:  # v's float32 copy is not v itself
            per_token += FLOAT32 * hv * dv
            if self.fused_projection:  # nor is the convolution's input the reordered q, k and v
                per_token += FLOAT32 * self.channels
        copies = 0
        if compute == FLOAT32 and padded == length:
            if hv != hk and batch > 1:
                width += 3 * dk
                copies = batch * hv * CHUNK * dk * FLOAT32 * max(chunks - 1, 1)
            elif chunks > 1:
                width += 4 * dk
        convolved = compute * batch * self.channels * (length + self.conv_kernel - 1)
        states = batch * chunks * hv * FLOAT32 * (1 + dk * dv)
        per_layer = (1 + weighted) * FLOAT32 * hv + CHUNK * CHUNK
        kept = tokens * per_token + batch * hv * padded * FLOAT32 * width
        return kept + convolved + states + per_layer + copies

    def backward_bytes(self, batch: int, length: int) -> int:
        """The chunk algorithm's backward, beyond what its forward kept: about three float32
        gradients per padded position and value head, as wide as the widest of a chunk, a key and a
        value, less half a chunk each (3 · (padded − 32) positions). Not a tensor count: fitted
        to the measured peaks of a checkpointed training step (1 to 5 chunks, key widths 16 to 128,
        float32 and bfloat16: the plan's step within 6% below to 12% above them, checkpointed or
        not; tests/test_layer_profiles.py and docs/guides/memory.md)."""
        padded = _padded(length)
        width = max(CHUNK, self.key_dim, self.value_dim)
        return 3 * FLOAT32 * batch * self.value_heads * width * (padded - CHUNK // 2)

    def evaluation_bytes(self, hidden: int, batch: int, length: int, compute: int) -> int:
        """The layer's working set without autograd (an evaluation batch), at its largest: the
        chunk algorithm's float32 locals, alive until it returns (per padded position and value
        head: three 64-wide matrices, five key-wide and six value-wide tensors; four recurrent
        states per value head from its loop), beside the convolution's output, the output gate and
        the layer's input in the compute dtype, and a fused projection's output (q, k, v and the
        gate) beside its reordered copies. Not a tensor count: fitted to the measured peaks of one
        layer (key and value widths 16 to 128, 1 to 4 chunks, float32 and bfloat16: 12% below to
        14% above them for Qwen 3.5's, 7% below to 13% above for Qwen3-Next's)."""
        dk, hv, dv = self.key_dim, self.value_heads, self.value_dim
        padded = _padded(length)
        chunked = FLOAT32 * batch * hv * (padded * (3 * CHUNK + 5 * dk + 6 * dv) + 4 * dk * dv)
        tokens = batch * length
        fused = self.channels + hv * dv if self.fused_projection else 0
        return chunked + compute * tokens * (self.channels + hv * dv + hidden + fused)
