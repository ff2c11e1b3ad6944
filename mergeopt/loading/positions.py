"""The base's position limit against the recipe's sequence lengths, checked before any work.

A sequence longer than the positions a model was built for is not a memory question: learned
position embeddings fail with an index error deep in the forward pass, and rotary ones extrapolate
silently, so every loss past the limit is noise. ``data.max_length`` (and ``train.max_length``)
above the limit in config.json is therefore refused up front, by the fit, its ``--dry-run`` plan
and ``mergeopt train`` alike, from the same config the plan reads. A config without any of the
usual keys (some architectures have no absolute limit) is not checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from mergeopt.errors import UserError

# the config.json keys that bound a sequence's length, by family (Llama, GPT-2, BLOOM/others, Qwen-1)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def position_limit(config: Mapping) -> tuple[str, int] | None:
    """(key, value) of the base's position limit, a multimodal config's text_config first; None if absent."""
    text = config.get("text_config")
    for cfg in ([text] if isinstance(text, Mapping) else []) + [config]:
        for key in POSITION_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
    return None


def _length(recipe, key: str) -> tuple[int, bool]:
    """The value of a recipe key such as ``data.max_length``, and whether the user left it at its default."""
    section, field = key.split(".")
    part = getattr(recipe, section)
    return getattr(part, field), field not in part.model_fields_set


def check_max_length(
    config: Mapping, recipe, where: str, keys: tuple[str, ...] = ("data.max_length",)
) -> None:
    """Refuse any of the recipe's ``keys`` (lengths in tokens) above the limit of ``config`` (read
    from ``where``). A length the user never set is refused too, not capped: capping would drop or
    cut examples the user did not choose to lose, so the line says it is the default and what to set."""
    limit = position_limit(config)
    if limit is None:
        return
    key, value = limit
    for name in keys:
        length, defaulted = _length(recipe, name)
        if length > value:
            said = f"{name} defaults to {length}, which is" if defaulted else f"{name}={length} is"
            raise UserError(
                f"{said} above the base's position limit ({key} {value} in the config of {where}): "
                f"sequences that long cannot be scored by this model; set {name} to {value} or less"
            )
