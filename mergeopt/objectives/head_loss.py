"""Token losses from the last hidden states, over chunks of tokens: the (B, L, V) logits never exist.

At Llama-3's 128k vocabulary the float32 logits of 8 × 1,024 tokens are 4 GiB, and a plain
``cross_entropy`` keeps three such tensors at once (logits, log-softmax, its gradient). Here the
output layer and the loss run over ``chunk`` tokens at a time. The forward keeps only each
token's log-sum-exp and the last chunk's ∂loss/∂logits; the backward forms the other chunks'
logits again and turns them into the gradients of the hidden states and (when the output layer is
merged) of its weight. This is the method of torchtune's chunked loss and Liger-Kernel's fused
linear cross-entropy; it is written here because Liger's kernels need Triton on a GPU, the fit
runs on CPU too, and the output layer's weight must go through the per-layer merge's recompute
(:mod:`mergeopt.merging.layer_merge`).

A LoRA expert that adapts the output layer and is kept low-rank (:mod:`mergeopt.merging.lowrank`)
changes the logits by u Bᵀ, u = (h Aᵀ) ⊙ c(w): the output layer's forward hook adds it when the
module is called, and since this path reads the weight instead, it carries (u, B) beside (h, W).

Architectures that transform the logits are covered by the post-processing their configs
declare: Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's
``logits_scaling``. :func:`check_head` compares the chunked path with the model's own logits on a
probe, so a model that does anything else is refused before the fit starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeopt.merging.lowrank import update_terms

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Head:
    """What turns a hidden state into logits: logits = cap · tanh(scale · (h Wᵀ + b) / cap)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> Head:
        text = getattr(config, "text_config", None) or config
        scale = float(getattr(text, "logit_scale", None) or 1.0)
        granite = getattr(text, "logits_scaling", None)
        if granite:
            scale /= float(granite)
        softcap = getattr(text, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(softcap) if softcap else None)

    def logits(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        low: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Float32 logits of a chunk, as the model computes them (matmul in the compute dtype);
        ``low`` = (u, B) adds a low-rank update's u Bᵀ."""
        y = F.linear(hidden, weight, bias)
        if low is not None:
            y = y + F.linear(*low)
        y = y.float()
        if self.scale != 1.0:
            y = y * self.scale
        if self.softcap is not None:
            y = torch.tanh(y / self.softcap) * self.softcap
        return y


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden`` (N, H) against ``targets`` (N,), ``chunk`` rows at a time.

    The backward forms each chunk's logits again, except the last chunk's: the forward keeps that
    chunk's ∂loss/∂logits (one chunk × V in float32, no more than the backward of any chunk holds)
    and the backward takes it first and frees it. So a batch that fits in one chunk runs the output
    layer three times, as a plain step does, not four.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: Head, chunk: int, low_hidden=None, low_weight=None):
        n = hidden.shape[0]
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        keep_last = any(ctx.needs_input_grad[:3]) or any(ctx.needs_input_grad[6:])
        ctx.last = None
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            logits = head.logits(hidden[rows], weight, bias, _low(low_hidden, low_weight, rows))
            lse[rows] = torch.logsumexp(logits, dim=-1)
            t = targets[rows]
            keep = t != IGNORE_INDEX
            picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
            losses[rows] = torch.where(keep, lse[rows] - picked, torch.zeros_like(picked))
            if keep_last and rows.stop == n:
                ctx.last = (rows, _logit_gradient(logits, lse[rows], t, head))
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse, low_hidden, low_weight)
        ctx.head, ctx.chunk = head, chunk
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse, low_hidden, low_weight = ctx.saved_tensors
        head, chunk = ctx.head, ctx.chunk
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_low, need_low_weight = (
            ctx.needs_input_grad[6:8] if len(ctx.needs_input_grad) > 6 else (False, False)
        )
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_low = torch.zeros_like(low_hidden) if need_low else None
        grad_weight = None  # float32, formed by the first chunk's product and accumulated into
        grad_low_weight = None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        n = hidden.shape[0]
        last, ctx.last = ctx.last, None
        starts = list(range(0, n, chunk))
        if last is not None:  # its gradient factor came from the forward: take it first, then free it
            starts = [last[0].start] + starts[:-1]
        for start in starts:
            rows = slice(start, min(start + chunk, n))
            h, t = hidden[rows], targets[rows]
            if last is not None and rows == last[0]:
                d, last = last[1], None
            else:
                low = _low(low_hidden, low_weight, rows)
                d = _logit_gradient(head.logits(h, weight, bias, low), lse[rows], t, head)
            g = torch.where(t != IGNORE_INDEX, grad_losses[rows].float(), torch.zeros_like(lse[rows]))
            d *= g[:, None]
            if need_hidden:
                grad_hidden[rows] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_low:
                grad_low[rows] = (d.to(low_weight.dtype) @ low_weight).to(low_hidden.dtype)
            if need_weight:
                grad_weight = _accumulate(grad_weight, d, h)
            if need_low_weight:
                grad_low_weight = _accumulate(grad_low_weight, d, low_hidden[rows])
            if need_bias:
                grad_bias += d.sum(dim=0)
            del d
        # no tokens (a rank's empty share of a batch): zero gradients
        if need_weight:
            grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)
        if need_low_weight:
            grad_low_weight = (
                torch.zeros_like(low_weight)
                if grad_low_weight is None
                else grad_low_weight.to(low_weight.dtype)
            )
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, grad_low, grad_low_weight


def _low(low_hidden, low_weight, rows: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if low_hidden is None else (low_hidden[rows], low_weight)


def _accumulate(total: torch.Tensor | None, d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """total + dᵀ h in float32 (formed by the first chunk's product)."""
    return d.t() @ h.float() if total is None else total.addmm_(d.t(), h.float())


def _logit_gradient(
    logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, head: Head
) -> torch.Tensor:
    """∂loss_t/∂(h Wᵀ + b) of each token of a chunk (before the upstream gradient): softmax minus the
    target's one-hot, through the soft-cap and the scale. Consumes ``logits`` (float32, post-processed)."""
    # logits = cap · tanh(z / cap), so ∂logits/∂z = 1 − tanh² = 1 − (logits / cap)²
    cap = None if head.softcap is None else (logits / head.softcap).square_().neg_().add_(1.0)
    d = logits.sub_(lse[:, None]).exp_()
    d[torch.arange(d.shape[0], device=d.device), targets.clamp_min(0)] -= 1.0
    if cap is not None:
        d *= cap
    if head.scale != 1.0:
        d *= head.scale
    return d


def hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The decoder's last hidden states (final norm applied), without the output layer."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """(B, L − 1) float32 losses of predicting ``targets`` (B, L − 1; IGNORE_INDEX: not scored)."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, :-1]
    output = model.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.shape[-1])
    low = update_terms(output, flat)  # a LoRA expert's low-rank update of the output layer
    losses = ChunkedCrossEntropy.apply(
        flat, output.weight, output.bias, targets.reshape(-1), Head.of(model.config), chunk, *(low or ())
    )
    return losses.view(targets.shape)


def full_logits_losses(model, input_ids, attention_mask, targets) -> torch.Tensor:
    """The same losses from the model's own logits (the reference the chunked path is checked against)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).view(targets.shape)


def check_head(model: torch.nn.Module, device: torch.device, vocab: int, tolerance: float = 1e-3) -> bool:
    """Whether the chunked path reproduces the model's own loss on a short probe (float32 terms
    compared relative to their size): False means the model post-processes its logits in a way
    :class:`Head` does not know, and the caller falls back to full logits."""
    if model.get_output_embeddings() is None or not hasattr(model, "base_model"):
        return False
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 8), generator=generator).to(device)
    mask = torch.ones_like(ids)
    targets = ids[:, 1:]
    with torch.no_grad():
        try:
            chunked = token_losses(model, ids, mask, targets, chunk=3)
        except (AttributeError, TypeError):
            return False
        full = full_logits_losses(model, ids, mask, targets)
    return bool(torch.allclose(chunked, full, rtol=tolerance, atol=tolerance))
