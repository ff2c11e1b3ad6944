"""DARE (Yu et al. 2024): drop each task-vector entry with probability 1 − density, rescale by 1/density.

``dare_linear`` then merges linearly, ``dare_ties`` with TIES's sign election and disjoint mean.
Why it fits the stack: the drop mask is random but drawn from τ's shape alone, once per run, so
τ' = drop(τ) is fixed and the merge is linear in w. The mask must be the same at every step (a new
mask per step would make the objective noisy) and reproducible from the recipe seed: each parameter
gets its own ``torch.Generator`` seeded from (seed, parameter name), and draws one ``bernoulli`` per
expert in expert order. That is exactly what peft's ``dare_linear`` and ``dare_ties`` draw from the
global generator, so with the same seed the masks are the same. The generator is always the
CPU's and the masks are moved to the parameter's device: CUDA's generator draws other numbers for
the same seed, and a fit on a GPU must score the masks that ``mergeopt.export.merge`` on a CPU writes.
"""

from __future__ import annotations

import zlib

import torch

from mergeopt.merging.methods import linear
from mergeopt.merging.methods.ties import MajoritySign, disjoint, disjoint_reference


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """The (CPU) generator of one parameter's masks: independent of the order parameters are built
    in, and of the device they live on.

    The seed is crc32 of "seed/name": 32 bits, because torch's CPU generator (mt19937) ignores the
    upper half of a 64-bit seed.
    """
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def drop(task_vectors: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """τ_i · Bernoulli(density) / density per expert, as peft's ``prune(..., 'random', rescale=True)``.

    ``generator=None`` draws from torch's global generator on the task vectors' device, as peft
    does; a generator draws on its own device and the mask is moved to the task vectors'.
    """
    if density >= 1:  # peft keeps the tensor and draws nothing
        return task_vectors
    where = task_vectors.device if generator is None else generator.device
    dropped = torch.empty_like(task_vectors)
    for tau, out in zip(task_vectors, dropped):
        probability = torch.full(tau.shape, density, dtype=tau.dtype, device=where)
        mask = torch.bernoulli(probability, generator=generator).to(tau.device)
        divide(tau * mask, density, out)
    return dropped


def divide(numerator: torch.Tensor, density: float, out: torch.Tensor, by_tensor: bool | None = None) -> None:
    """``out = numerator / density`` with the CPU's quotient on every device.

    The CPU divides (half and bfloat16 in float32, rounded once). CUDA divides by a Python number
    as a multiplication by its reciprocal, which can differ in the last bit, so a GPU's masks would
    not be the ones ``mergeopt.export.merge`` writes on a CPU (nor peft's). Divided by a float
    tensor on the device (``by_tensor``, the default off the CPU), in float32 for half and
    bfloat16, the GPU computes the CPU's quotient.
    """
    if by_tensor is None:
        by_tensor = numerator.device.type != "cpu"
    if not by_tensor:
        torch.div(numerator, density, out=out)
        return
    opmath = torch.float64 if numerator.dtype == torch.float64 else torch.float32
    divisor = torch.tensor(density, dtype=opmath, device=numerator.device)
    if numerator.dtype == opmath:
        torch.div(numerator, divisor, out=out)
    else:
        out.copy_(numerator.to(opmath).div_(divisor))


def prepare_linear(
    task_vectors: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    return drop(task_vectors, density, generator)


def prepare_ties(
    task_vectors: torch.Tensor,
    density: float,
    majority_sign: MajoritySign,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return disjoint(drop(task_vectors, density, generator), majority_sign)


def reference_linear(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    scale: float = 1.0,
    density: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return linear.reference(base, drop(task_vectors, density, generator), weights, scale)


def reference_ties(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    scale: float = 1.0,
    density: float = 0.5,
    majority_sign: MajoritySign = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    dropped = drop(task_vectors, density, generator)
    return disjoint_reference(base, dropped, weights, scale, majority_sign)
