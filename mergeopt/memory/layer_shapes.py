"""Decoder layers whose shapes differ from layer to layer: Gemma 4's.

Gemma 4's full-attention layers have heads twice as wide as its sliding-window layers (and, where
its config says so, their own key-and-value head count, with keys and values from one projection),
and its last ``num_kv_shared_layers`` layers read the keys and values of an earlier layer of their
kind instead of projecting their own (their MLP twice as wide where ``use_double_wide_mlp``). The
plan groups the layers into kinds of equal shapes (:meth:`~mergeopt.memory.sizes.Dims.layer_kinds`),
each planned with its own widths; this module reads those shapes from config.json.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mergeopt.errors import UserError


@dataclass(frozen=True)
class LayerShape:
    """One layer's attention and MLP widths: its kind (config.json's layer_types), head width,
    key-and-value heads, MLP width; ``kv_shared``: it reads another layer's keys and values;
    ``k_eq_v``: its values are its keys' projection (no value projection)."""

    layer_type: str
    head_dim: int
    kv_heads: int
    intermediate: int
    kv_shared: bool = False
    k_eq_v: bool = False


def _int(config: dict, key: str, where: str, default: int | None = None) -> int:
    value = config.get(key)
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: config.json's {key} must be an integer, not {value!r}")
    return value


def gemma4_layers(
    config: dict, where: str, head_dim: int, kv_heads: int, intermediate: int
) -> tuple[tuple[LayerShape, int], ...]:
    """Gemma 4's layers grouped by shape, with their counts, from its config.json (``head_dim``,
    ``kv_heads`` and ``intermediate``: the sliding-window layers', as the plan read them):
    ``layer_types`` (where absent, transformers' default: five sliding-window layers to one full,
    the last full), the full-attention layers' overrides (``per_layer_config``, as transformers
    writes it, or ``global_head_dim`` and ``num_global_key_value_heads``), ``num_kv_shared_layers``,
    ``attention_k_eq_v`` and ``use_double_wide_mlp``."""
    layers = _int(config, "num_hidden_layers", where)
    types = list(config.get("layer_types") or ())
    if not types:
        types = [
            "full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention"
            for i in range(layers)
        ]
    if len(types) != layers:
        raise UserError(
            f"{where}: config.json's layer_types names {len(types)} layers, not num_hidden_layers={layers}"
        )
    overrides = config.get("per_layer_config")
    if not isinstance(overrides, dict):  # as released: the full layers' widths by name
        full = {"head_dim": config.get("global_head_dim") or 512}
        if config.get("attention_k_eq_v") and config.get("num_global_key_value_heads"):
            full["num_key_value_heads"] = config["num_global_key_value_heads"]
        overrides = {i: full for i, t in enumerate(types) if t == "full_attention"}
    else:  # keyed by layer index, as strings ("05") in a saved config
        overrides = {int(k): v for k, v in overrides.items() if str(k).isdigit()}
    shared_from = layers - _int(config, "num_kv_shared_layers", where, 0)
    shapes = []
    for i, layer_type in enumerate(types):
        own = overrides.get(i) or {}
        shared = i >= shared_from
        shapes.append(
            LayerShape(
                layer_type,
                _int(own, "head_dim", where, head_dim),
                _int(own, "num_key_value_heads", where, kv_heads),
                intermediate * (2 if shared and config.get("use_double_wide_mlp") else 1),
                kv_shared=shared,
                k_eq_v=bool(config.get("attention_k_eq_v"))
                and layer_type != "sliding_attention"
                and not shared,
            )
        )
    return tuple(Counter(shapes).items())
