"""Activation checkpointing per decoder layer (``optim.activation_checkpointing``).

A checkpointed layer keeps only its inputs through the forward; its backward runs the layer
again, the per-layer merge of its weights included (:mod:`mergeopt.merging.layer_merge`), and then
differentiates it. The activations of a step shrink from every layer's to one layer's plus the
layer inputs, for one more forward of the layers.

Transformers' own switch (``gradient_checkpointing_enable``) only acts in training mode, and the
fit keeps the model in eval mode (no dropout: the proxy is the model as it would be served). So
mergeopt wraps each decoder layer's ``forward`` in ``torch.utils.checkpoint`` (non-reentrant)
itself. The decoder layers are the classes the model names in ``_no_split_modules``, the same
list accelerate uses to keep layers whole, so no architecture's module names are assumed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from mergeopt.errors import UserError
from mergeopt.merging.layer_merge import MIX_BUFFER

WRAPPED = "_mergeopt_checkpointed"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of the model, found by the class names it declares unsplittable."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise UserError(
            f"optim.activation_checkpointing: {type(model).__name__} declares no decoder layer class "
            "(_no_split_modules); set optim.activation_checkpointing=false"
        )
    return layers


def _mixture_context(layer: torch.nn.Module):
    """checkpoint's ``context_fn``: the layer's recomputation sees the mixture its forward saw.

    functional_call hands w to the mixture buffers only while the forward runs; the backward, and
    with it the recomputation, comes after functional_call has put the old values back. So the
    tensors in the buffers are captured at the forward and put back while the layer is recomputed.
    """
    buffers = [(m, MIX_BUFFER) for m in layer.modules() if MIX_BUFFER in m._buffers]
    captured = [(m, name, getattr(m, name)) for m, name in buffers]

    @contextlib.contextmanager
    def reinstated():
        previous = [(m, name, getattr(m, name)) for m, name, _ in captured]
        for m, name, value in captured:
            setattr(m, name, value)
        try:
            yield
        finally:
            for m, name, value in previous:
                setattr(m, name, value)

    return contextlib.nullcontext(), reinstated()


def _checkpointed(layer: torch.nn.Module, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
            return forward(*args, **kwargs)
        context = functools.partial(_mixture_context, layer)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)

    return run


def enable(model: torch.nn.Module) -> int:
    """Checkpoint every decoder layer; returns how many. Calling it twice changes nothing."""
    layers = decoder_layers(model)
    for layer in layers:
        if not getattr(layer, WRAPPED, False):
            layer.forward = _checkpointed(layer, layer.forward)
            setattr(layer, WRAPPED, True)
    return len(layers)


def disable(model: torch.nn.Module) -> None:
    for layer in model.modules():
        if getattr(layer, WRAPPED, False):
            del layer.forward  # the class's own forward again
            delattr(layer, WRAPPED)
