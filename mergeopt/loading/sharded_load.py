"""Loading for a sharded stack: no rank ever holds θ0 or an expert whole.

Why: with ``model.shard: fsdp`` each rank keeps 1/N of every matrix (:mod:`mergeopt.merging.sharded_merge`),
but ``from_pretrained`` would first load the whole base on every rank: 140 GB for
Llama-3.1-70B in bfloat16, more than any GPU. So the model is built as accelerate's empty model
(parameters on the meta device, buffers such as rotary frequencies computed for real), and each
parameter is filled from a :class:`BaseSource` as the stack is built: a matrix as this rank's
block of rows (safetensors ``get_slice``: only those bytes are read), a vector whole. The experts
are read the same way (:func:`mergeopt.merging.stacking.build_stack`).

A base source is the base checkpoint's safetensors, or a ``random://`` world's seeded θ0, which
is drawn one tensor at a time and cut to the rank's rows.
"""

from __future__ import annotations

import copy

import torch

from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import Checkpoint
from mergeopt.merging.layer_merge import owners


class BaseSource:
    """θ0 by parameter name: whole, or rows [start, stop) of a matrix; in the caller's dtype and device."""

    def whole(self, name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def rows(
        self, name: str, start: int, stop: int, like: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        raise NotImplementedError


class CheckpointBase(BaseSource):
    """θ0 read tensor by tensor (or block of rows by block of rows) from the base's safetensors."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def _check(self, name: str, like: torch.Tensor) -> None:
        meta = self.checkpoint.tensors.get(name)
        if meta is None:
            raise UserError(
                f"parameter {name} of the model is not in the base checkpoint {self.checkpoint.path}"
            )
        if tuple(meta.shape) != tuple(like.shape):
            raise UserError(
                f"tensor {name} has shape {list(meta.shape)} in {self.checkpoint.path}, "
                f"but the architecture of its config.json makes it {list(like.shape)}"
            )

    def whole(self, name, like, device):
        self._check(name, like)
        return self.checkpoint.read(name).to(device=device, dtype=like.dtype)

    def rows(self, name, start, stop, like, device):
        self._check(name, like)
        return self.checkpoint.read_rows(name, start, stop).to(device=device, dtype=like.dtype)


class RandomBase(BaseSource):
    """A ``random://`` world's θ0, regenerated per tensor from its seed (:mod:`mergeopt.worlds.random_world`)."""

    def __init__(self, config, seed: int):
        self.config, self.seed = config, seed

    def whole(self, name, like, device):
        from mergeopt.worlds.random_world import base_parameter

        return base_parameter(self.config, name, like.shape, device, like.dtype, self.seed)

    def rows(self, name, start, stop, like, device):
        return self.whole(name, like, device)[start:stop].clone()


def empty_model(
    config, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The architecture of ``config`` with every parameter on the meta device (no bytes) and its
    buffers computed on ``device``, in eval mode; embeddings tied as configured."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from mergeopt.worlds.random_world import no_init_weights

    config = copy.deepcopy(config)  # from_config writes the dtype into the config it is given
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval()


def fill(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Make parameter ``name`` (every tie of it) a frozen parameter holding ``value``."""
    param = torch.nn.Parameter(value, requires_grad=False)
    for module, attr in owners(model, name):
        module._parameters[attr] = param
