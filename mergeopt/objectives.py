"""The differentiable objective: mean token cross-entropy of the merged model on the dev sets.

The model's own parameters stay θ0 and frozen; the merged tensors are handed to
``torch.func.functional_call`` so autograd reaches the mixture logits and nothing else. Losses are
kept per dev set (sum and token count) so the target can weight the sets however the recipe says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mergeopt.data import Batch, DevSet, evaluation_batches
from mergeopt.distributed import all_reduce_sum
from mergeopt.methods import MergeFn, merge_linear
from mergeopt.stack import TaskVectorStack
from mergeopt.weights import weights_from_logits

IGNORE_INDEX = -100


def per_set_loss_sums(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: Batch, num_sets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of scored tokens) for each dev set present in the batch."""
    out = functional_call(
        model,
        params,
        args=(),
        kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False},
    )
    logits = out.logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scored = batch.scored[:, 1:]
    # unscored targets -> ignore_index: no gather copies of the (B, L, V) logits or of their grad
    targets = batch.input_ids[:, 1:].masked_fill(~scored, IGNORE_INDEX)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).view(targets.shape)
    zeros = token_loss.new_zeros(num_sets)
    sums = zeros.index_add(0, batch.set_index, token_loss.sum(dim=1))
    counts = zeros.index_add(0, batch.set_index, scored.sum(dim=1).to(token_loss.dtype))
    return sums, counts


def target_loss(sums: torch.Tensor, counts: torch.Tensor, set_weights: torch.Tensor) -> torch.Tensor:
    """Σ_s a_s · mean_loss_s / Σ_s a_s over the sets that have tokens (a_s = 0 for untargeted sets)."""
    present = counts > 0
    a = set_weights.to(sums.device) * present
    means = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return (a * means).sum() / a.sum()


def dev_loss(
    model: torch.nn.Module,
    stack: TaskVectorStack,
    logits: torch.Tensor,
    temperature: float,
    batch: Batch,
    set_weights: torch.Tensor,
    method: MergeFn = merge_linear,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Target loss on one batch as a function of the mixture logits z (differentiable in z).

    ``buffers`` (from ``stack.allocate_buffers()``) makes the merge reuse memory across calls.
    """
    params = stack.merged(weights_from_logits(logits, temperature), method, out=buffers)
    sums, counts = per_set_loss_sums(model, params, batch, len(set_weights))
    # under torchrun: divide this rank's sums by the whole batch's counts, so the ranks' losses
    # (and their gradients) add up to the whole batch's
    counts = all_reduce_sum(counts.detach().clone())
    return target_loss(sums, counts, set_weights)


@torch.no_grad()
def evaluate_sums(
    model: torch.nn.Module,
    stack: TaskVectorStack,
    weights: torch.Tensor,
    sets: Sequence[DevSet],
    part: str,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    method: MergeFn = merge_linear,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-loss sum, token count) of each dev set over ``part`` ('fit', 'heldout', 'all') at w."""
    params = stack.merged(weights.to(device), method, out=buffers)
    sums = torch.zeros(len(sets), device=device, dtype=torch.float64)
    counts = torch.zeros(len(sets), device=device, dtype=torch.float64)
    for batch in evaluation_batches(sets, part, batch_size, pad_id):
        s, c = per_set_loss_sums(model, params, batch.to(device), len(sets))
        sums += s
        counts += c
    return all_reduce_sum(sums).cpu(), all_reduce_sum(counts).cpu()


def evaluate(*args, **kwargs) -> torch.Tensor:
    """Mean token loss of each dev set at mixture w; same arguments as :func:`evaluate_sums`."""
    sums, counts = evaluate_sums(*args, **kwargs)
    return sums / counts.clamp_min(1)
