"""LoRA on a model's parameters: PEFT's ``target_parameters`` and the adapters PEFT converts to it.

Why: a mixture-of-experts' experts are not ``nn.Linear`` modules in transformers 5. Each layer holds
one fused parameter per projection (``mlp.experts.gate_up_proj``, (experts, out, in)), so a LoRA of
the experts is PEFT's ``ParamWrapper``: ``target_parameters`` in adapter_config.json, and factors
A (r·E × in) and B (out × r·E) whose update of expert e is s·B_e·A_e, with A_e the e-th block of r
rows of A and B_e the columns e, E + e, 2E + e, … of B (PEFT's ``get_delta_weight``). GPT-OSS holds
its experts as (experts, in, out) (``is_transposed``): there the update is (s·B_e·A_e)ᵀ. A router
that is a parameter, not a Linear (Mixtral's ``mlp.gate.weight``), is a 2-D ``ParamWrapper``:
s·B·A. OpenAI's GPT-OSS fine-tuning recipe and PEFT's MoE guide train such adapters.

Adapters trained under transformers 4, where each expert was a Linear module
(``block_sparse_moe.experts.3.w1``), are what PEFT converts to that form when it loads them into a
transformers 5 model (fusing w1 and w3 into gate_up_proj with a block-diagonal B, doubling r and α
there): :func:`peft_converted` runs PEFT's own conversion, the one ``PeftModel.from_pretrained``
runs, so mergeopt reads such an adapter exactly as PEFT serves it.

Saved keys do not name the parameter: PEFT nests one wrapper per targeted parameter of a module,
the first registered innermost, so ``mlp.experts.base_layer.lora_A.weight`` is gate_up_proj's and
``mlp.experts.lora_A.weight`` down_proj's. :func:`wrapped_parameters` resolves that nesting from the
model's own parameter order, as PEFT's ``_inject_parameters`` walks it.

Each update is read as a :class:`~mergeopt.loading.lora_updates.DenseUpdate` marked ``parameter``, whose
factors are batched over the experts. Under a linear merge the fit keeps them as factors and
merges each parameter as its layer reads it (:mod:`mergeopt.merging.lowrank_parameters`); TIES
and DARE make them dense, as they make every adapter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeopt.errors import UserError

PREFIX = "base_model.model."
BASE_LAYER = ".base_layer"


@dataclass(frozen=True)
class WrappedParameter:
    """One parameter a ``ParamWrapper`` adapts: its model name, shape, and whether it is stored
    (experts, in, out) (transformers' ``is_transposed`` experts, GPT-OSS) rather than (experts, out, in)."""

    name: str
    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def in_out(self) -> tuple[int, int]:
        """(in, out) of each expert's matrix, as PEFT's wrapper sees them."""
        if len(self.shape) == 2:
            return self.shape[1], self.shape[0]
        return (self.shape[1], self.shape[2]) if self.transposed else (self.shape[2], self.shape[1])


def _targets(config: Mapping) -> list[str]:
    targets = config.get("target_parameters") or []
    return [targets] if isinstance(targets, str) else sorted(set(targets))


def wrapped_parameters(config: Mapping, model: torch.nn.Module) -> dict[str, WrappedParameter]:
    """{wrapper module key as saved (less ``base_model.model.``): the parameter it adapts} for an
    adapter's ``target_parameters``. A module's targeted parameters nest in registration order, the
    first innermost: with n of them, the k-th is under ``module`` + ``.base_layer`` × (n − 1 − k).
    PEFT's match: the parameter's full name is a target or ends in ``.`` + a target."""
    targets = _targets(config)
    if not targets:
        return {}
    found: dict[str, WrappedParameter] = {}
    for module_name, module in model.named_modules():
        own = [
            (name, param)
            for name, param in module.named_parameters(recurse=False)
            if any(f"{module_name}.{name}" == t or f"{module_name}.{name}".endswith(f".{t}") for t in targets)
        ]
        transposed = bool(getattr(module, "is_transposed", False))
        for k, (name, param) in enumerate(own):
            if param.dim() not in (2, 3):
                raise UserError(
                    f"target_parameters names {module_name}.{name}, a {param.dim()}-D parameter "
                    "(PEFT adapts 2-D and 3-D parameters only)"
                )
            key = module_name + BASE_LAYER * (len(own) - 1 - k)
            found[key] = WrappedParameter(f"{module_name}.{name}", tuple(param.shape), transposed)
    return found


def resolved_parameters(
    path: Path, config: Mapping, model: torch.nn.Module | None
) -> dict[str, WrappedParameter]:
    """:func:`wrapped_parameters` of an adapter, or one line where they cannot be resolved: no
    architecture to resolve them on (a GGUF base), or targets that name no parameter of it."""
    if not config.get("target_parameters"):
        return {}
    if model is None:
        raise UserError(
            f"{path}: LoRA on parameters (target_parameters) needs the base's architecture, and none "
            "was built from the base's config"
        )
    wrapped = wrapped_parameters(config, model)
    if not wrapped:
        raise UserError(
            f"{Path(path) / 'adapter_config.json'}: target_parameters {config['target_parameters']} "
            "names no parameter of the base"
        )
    return wrapped


def per_expert_factors(
    a: torch.Tensor, b: torch.Tensor, target: WrappedParameter
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a', b') with s·b' @ a' the update in the parameter's own layout: batched over the experts
    of a 3-D parameter ((E, r, last) and (E, first, r)), plain for a 2-D one."""
    experts = target.experts
    if len(target.shape) == 2:
        return a, b
    a_e = a.reshape(experts, -1, a.shape[-1])  # (E, r, in): rows e·r … (e+1)·r − 1 of A
    b_e = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r): columns e, E + e, … of B
    if target.transposed:  # stored (E, in, out): (B_e A_e)ᵀ = A_eᵀ B_eᵀ
        return b_e.transpose(1, 2).contiguous(), a_e.transpose(1, 2).contiguous()
    return a_e.contiguous(), b_e.contiguous()


def _peft_conversion_api():
    """PEFT's conversion of adapters to transformers 5's architectures, or None (older PEFT or
    transformers: nothing to convert)."""
    from mergeopt.runtime.quiet_imports import quiet_backends

    try:
        with quiet_backends():  # PEFT imports torchao where it is installed
            from peft.utils.transformers_weight_conversion import (
                convert_peft_adapter_state_dict_for_transformers,
                convert_peft_config_for_transformers,
            )
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    return (
        convert_peft_config_for_transformers,
        convert_peft_adapter_state_dict_for_transformers,
        (get_checkpoint_conversion_mapping),
    )


_FACTOR_MODULE = re.compile(r"^(?P<module>.+)\.lora_[AB](?:\.[^.]+)?\.weight$")


def needs_conversion(keys, model: torch.nn.Module, config: Mapping) -> bool:
    """Whether some LoRA factor of these saved keys adapts a module the model does not have, on an
    architecture whose checkpoints transformers converts (an adapter trained under transformers 4)."""
    api = _peft_conversion_api()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if api is None or model_type is None or api[2](model_type) is None:
        return False
    modules = {name for name, _ in model.named_modules()}
    wrapped = wrapped_parameters(config, model) if config.get("target_parameters") else {}
    for key in keys:
        match = _FACTOR_MODULE.match(key.removeprefix(PREFIX))
        if match and match["module"] not in modules and match["module"] not in wrapped:
            return True
    return False


def peft_converted(
    path: Path, config: dict, tensors: dict[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter trained under transformers 4 on an architecture transformers 5
    fuses, converted by PEFT as ``PeftModel.from_pretrained`` converts them (the per-expert modules
    become ``target_parameters`` with their rank and α patterns); the adapter as it is otherwise."""
    if not needs_conversion(tensors, model, config):
        return config, tensors
    convert_config, convert_tensors, _ = _peft_conversion_api()
    from peft import LoraConfig

    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    try:
        peft_config = LoraConfig(**fields)
        convert_config(peft_config, model, None)
        converted = convert_tensors(model, peft_config, tensors)
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{path}: an adapter of per-expert modules that PEFT cannot convert to this model's fused "
            f"experts ({first})"
        ) from None
    config = {
        **config,
        "target_modules": sorted(peft_config.target_modules or []),
        "target_parameters": sorted(peft_config.target_parameters or []),
        "rank_pattern": dict(peft_config.rank_pattern or {}),
        "alpha_pattern": dict(peft_config.alpha_pattern or {}),
    }
    return config, dict(converted)
