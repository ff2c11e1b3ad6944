"""The differentiable objective: mean token cross-entropy of the merged model on the dev sets.

The model's stacked parameters read the merge at the mixture in their ``mergeopt_mix`` buffers
(:mod:`mergeopt.merging.layer_merge`); ``torch.func.functional_call`` hands those buffers the w being
optimized, so autograd reaches the mixture logits and nothing else. Losses come from the hidden
states over chunks of tokens (:mod:`mergeopt.objectives.head_loss`) when ``loss_chunk`` is set, else from
the model's own logits. Losses are kept per dev set (sum and token count) so the target can
weight the sets however the recipe says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call

from mergeopt.merging.eval_dtype import evaluating_in
from mergeopt.merging.layer_merge import recompute_merged
from mergeopt.merging.stack import TaskVectorStack
from mergeopt.merging.weights import weights_from_logits
from mergeopt.objectives.data import Batch, DevSet, evaluation_batches
from mergeopt.objectives.head_loss import IGNORE_INDEX, full_logits_losses, token_losses
from mergeopt.runtime.distributed import all_reduce_sum
from mergeopt.runtime.interrupts import check_interrupt_alone


class _TokenLosses(torch.nn.Module):
    """The model and its loss as one module, so functional_call can swap buffers for the whole pass."""

    def __init__(self, model: torch.nn.Module, chunk: int | None):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, input_ids, attention_mask, targets):
        if self.chunk is None:
            return full_logits_losses(self.model, input_ids, attention_mask, targets)
        return token_losses(self.model, input_ids, attention_mask, targets, self.chunk)


def per_set_loss_sums(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    batch: Batch,
    num_sets: int,
    loss_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of scored tokens) for each dev set present in the batch.

    ``params`` are functional_call's replacements by name (the mixture buffers; {} for the model
    as it is); ``loss_chunk`` tokens at a time go through the output layer, None: whole logits.
    """
    scored = batch.scored[:, 1:]
    # unscored targets -> ignore_index: no gather copies of the (B, L, V) logits or of their grad
    targets = batch.input_ids[:, 1:].masked_fill(~scored, IGNORE_INDEX)
    module = _TokenLosses(model, loss_chunk)
    with recompute_merged():  # merged weights are formed again in the backward, not kept
        token_loss = functional_call(
            module,
            {f"model.{name}": value for name, value in params.items()},
            args=(batch.input_ids, batch.attention_mask, targets),
        )
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
    batch: Batch,
    set_weights: torch.Tensor,
    loss_chunk: int | None = None,
    to_weights: Callable[[torch.Tensor], torch.Tensor] = weights_from_logits,
) -> torch.Tensor:
    """Target loss on one batch as a function of the mixture logits z (differentiable in z);
    ``to_weights`` maps z to w (softmax, or a hierarchical mixture's two levels)."""
    params = stack.mix_params(to_weights(logits))
    sums, counts = per_set_loss_sums(model, params, batch, len(set_weights), loss_chunk)
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
    loss_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-loss sum, token count) of each dev set over ``part`` ('fit', 'heldout', 'all') at w.

    Each batch merges every layer as it runs: one candidate costs forward passes only. Weights are
    read in ``stack.eval_dtype`` (``model.eval_dtype``), whatever the compute dtype of the steps.
    """
    params = stack.mix_params(weights.to(device))
    sums = torch.zeros(len(sets), device=device, dtype=torch.float64)
    counts = torch.zeros(len(sets), device=device, dtype=torch.float64)
    with evaluating_in(model, stack.eval_dtype):  # float32 by default: see mergeopt.merging.eval_dtype
        for batch in evaluation_batches(sets, part, batch_size, pad_id):
            check_interrupt_alone("an evaluation")  # a big dev set takes minutes: Ctrl-C within a batch
            s, c = per_set_loss_sums(model, params, batch.to(device), len(sets), loss_chunk)
            sums += s
            counts += c
    return all_reduce_sum(sums).cpu(), all_reduce_sum(counts).cpu()


def evaluate(*args, **kwargs) -> torch.Tensor:
    """Mean token loss of each dev set at mixture w; same arguments as :func:`evaluate_sums`."""
    sums, counts = evaluate_sums(*args, **kwargs)
    return sums / counts.clamp_min(1)
