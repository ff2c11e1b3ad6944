"""Several processes, one fit: under torchrun each rank scores a share of every batch.

``torchrun --standalone --nproc_per_node=N -m mergeopt.fit RECIPE`` starts N copies; each loads the
model and the stack, takes every N-th example of each batch (training and evaluation), and the
ranks add up token-loss sums and counts with one all-reduce, so every rank sees the loss and the
K-vector gradient of the whole batch, takes the same Adam step and stops at the same step: only
those few numbers cross between processes, never a tensor of the model's size. Zero-order
strategies run in lockstep the same way (each evaluation is split over the ranks). Rank 0 writes
the run directory. Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: every world-size-th item, starting at the rank."""
    rank, size = rank_and_size()
    return list(items[rank::size])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (returned for chaining); no-op for one process."""
    if rank_and_size()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on GPUs each rank uses the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building a world into the shared cache), the others after."""
    rank, size = rank_and_size()
    if size > 1 and rank != 0:
        dist.barrier()
    yield
    if size > 1 and rank == 0:
        dist.barrier()
