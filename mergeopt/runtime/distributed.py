"""Several processes, one fit: under torchrun each rank scores a share of every batch.

``torchrun --standalone --nproc_per_node=N -m mergeopt.fit RECIPE`` starts N copies; each loads the
model and the stack, takes every N-th example of each batch (training and evaluation), and the
ranks add up token-loss sums and counts with one all-reduce, so every rank sees the loss and the
K-vector gradient of the whole batch, takes the same Adam step and stops at the same step: only
those few numbers cross between processes, never a tensor of the model's size. Zero-order
strategies split the *candidates* instead: each rank scores whole mixtures of a batch (a grid, a
CMA-ES generation, the surrogate's seeds) inside :func:`this_rank_only`, and the ranks exchange
the scores, a few floats per mixture. Rank 0 writes the run directory. Without torchrun
(WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

from mergeopt.errors import UserError
from mergeopt.inputs import torchrun_variable

T = TypeVar("T")

_this_rank_only = False  # set by this_rank_only(): collectives become no-ops, shards the whole input
_joined = False  # set by init_from_env() when it created the process group, which leave() ends


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op for one process."""
    global _joined
    size = torchrun_variable("WORLD_SIZE")
    if size <= 1 or dist.is_initialized():
        return
    check_rendezvous(size)
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))  # nccl's object collectives use the current GPU
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    _joined = True


def leave() -> None:
    """End the process group :func:`init_from_env` created; a group made by the caller is left alone.

    Why: torch asks every process to destroy its process group before it exits, rather than leave
    its communication threads to the interpreter's exit. A rank of a two-node torchrun fit once
    aborted at exit (SIGABRT, "terminate called without an active exception") after its fit had
    finished, which fails the whole job; that this was the cause is likely, not established. The
    CLI calls this after every verb that succeeds.
    """
    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


def check_rendezvous(size: int, environ=os.environ) -> None:
    """WORLD_SIZE above 1 joins a process group at MASTER_ADDR:MASTER_PORT as RANK (torchrun sets all
    four); one of them missing, or a port that is no port, is one line here, not torch's ValueError
    from inside ``init_process_group``."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not environ.get(name, "").strip()]
    if missing:
        raise UserError(
            f"WORLD_SIZE={size} in the environment says this is one of {size} processes, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start it with "
            f"torchrun --nproc_per_node={size} (which sets them all), or unset WORLD_SIZE"
        )
    port = environ["MASTER_PORT"]
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536:
        raise UserError(f"MASTER_PORT={port!r} in the environment is not a port (1 to 65535)")


def process_rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes, whatever :func:`this_rank_only` says."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_and_size() -> tuple[int, int]:
    """The rank and world size data splitting sees: (0, 1) inside :func:`this_rank_only`."""
    return (0, 1) if _this_rank_only else process_rank_and_size()


@contextmanager
def this_rank_only() -> Iterator[None]:
    """Inside the block this rank works alone: :func:`shard` keeps every item, sums are not reduced.

    Used to score a whole candidate mixture on one rank while other ranks score other candidates.
    """
    global _this_rank_only
    previous, _this_rank_only = _this_rank_only, True
    try:
        yield
    finally:
        _this_rank_only = previous


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` for one process."""
    size = process_rank_and_size()[1]
    if size == 1:
        return [value]
    gathered: list = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def is_main() -> bool:
    return process_rank_and_size()[0] == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: every world-size-th item, starting at the rank."""
    rank, size = rank_and_size()
    return list(items[rank::size])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (returned for chaining); no-op for one process."""
    if rank_and_size()[1] > 1:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":  # nccl reduces GPU tensors only
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on GPUs each rank uses the GPU of its LOCAL_RANK; an explicit index
    (``cuda:1``) would put every rank on that one GPU, so it is refused in one line."""
    if device.type != "cuda" or torchrun_variable("WORLD_SIZE") <= 1:
        return device
    if device.index is not None:
        raise UserError(
            f"device {device} under torchrun would put every rank on that one GPU: use device=cuda "
            "(each rank takes the GPU of its LOCAL_RANK; CUDA_VISIBLE_DEVICES picks the GPUs)"
        )
    return torch.device("cuda", torchrun_variable("LOCAL_RANK"))


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building a world into the shared cache), the others after."""
    rank, size = process_rank_and_size()
    if size > 1 and rank != 0:
        dist.barrier()
    yield
    if size > 1 and rank == 0:
        dist.barrier()
