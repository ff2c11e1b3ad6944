"""LoRA adapters on a base whose output layer shares its input embedding's weight
(``tie_word_embeddings``: SmolLM2, Gemma, Llama-3.2-1B).

Why its own module: PEFT serves such an adapter on one layer but merges it into the weight both
share, so some adapters are two different experts at once. The adapter reader and the memory plan
refuse the same ones with the same words from here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from mergeopt.errors import UserError


def check_untied(path: Path, name: str, tied: Collection[str]) -> None:
    """An adapter of an output layer whose weight the base ties to its input embedding is two
    experts at once: PEFT's adapter changes the output layer alone, its merge the shared weight."""
    if name in tied:
        module = name.removesuffix(".weight")
        raise UserError(
            f"{path}: adapts {module}, whose weight the base ties to its input embedding "
            "(tie_word_embeddings): PEFT applies the adapter to that layer alone but merges it into the "
            "weight both layers share, so the expert is ambiguous; merge it into a dense checkpoint "
            f"(merge_and_unload) if that is what you serve, or train it without {module} in target_modules"
        )


def check_saved_tied_embedding(
    path: Path, config: Mapping, kinds: dict, tied: Collection[str], model
) -> None:
    """modules_to_save of an input embedding whose weight the base's output layer shares (or of that
    output layer). Without ``ensure_weight_tying`` PEFT serves the adapter with the other layer at
    θ0 and its merge_and_unload unties the two; a stack of tied experts cannot hold that expert, so it is
    refused. With it PEFT saves the output layer's copy too, equal to the embedding's, and serves
    and merges them tied: the copy of the tied name is dropped, the embedding's stands for both."""
    held = kinds.pop("tied copy")
    if not tied:
        return
    name = input_embedding_weight(model)
    if config.get("ensure_weight_tying") and name is not None:
        for target, tensor in held.items():
            if name not in kinds["copy"] or not torch.equal(kinds["copy"][name], tensor):
                raise UserError(
                    f"{path}: ensure_weight_tying is set, but the adapter's copy of {target} is not "
                    f"its copy of {name}, the weight the base ties it to"
                )
        return
    for target in held:  # the output layer saved whole, or its copy beside LoRA factors on it
        output = target.removesuffix(".weight")
        if saved_whole(config, output):
            raise saved_tied_embedding(path, output, "its input embedding")
        check_untied(path, target, tied)
    if name in kinds["copy"] and saved_whole(
        config, name.removesuffix(".weight")
    ):  # not an adapted embedding's θ0
        raise saved_tied_embedding(path, name.removesuffix(".weight"), "its output layer")


def saved_whole(config: Mapping, module: str) -> bool:
    """Whether the adapter saves ``module`` whole: its last name is in modules_to_save, as PEFT
    matches them."""
    return module.rsplit(".", 1)[-1] in {m.rsplit(".", 1)[-1] for m in config.get("modules_to_save") or ()}


def input_embedding_weight(model: torch.nn.Module | None) -> str | None:
    """The name of the base's input embedding weight (``model.embed_tokens.weight``), or None."""
    if model is None:
        return None
    embedding = model.get_input_embeddings()
    return next((f"{n}.weight" for n, m in model.named_modules() if m is embedding), None)


def saved_tied_embedding(path: Path, module: str, other: str) -> UserError:
    """The refusal of an adapter that saves one of two tied layers whole (``other``: the layer it
    shares its weight with) without ensure_weight_tying (:func:`check_saved_tied_embedding`; the
    plan says it too)."""
    return UserError(
        f"{path}: saves {module} whole (modules_to_save), whose weight the base ties to {other} "
        f"(tie_word_embeddings); PEFT serves and merges this adapter with {other} left at the "
        "base's (merge_and_unload unties them), which experts stacked tied cannot hold: train it "
        "with ensure_weight_tying=True in its LoraConfig, which keeps the two tied"
    )
