"""Gemma 4's layers in the plan (mergeopt.memory.layer_shapes and its profile) against what autograd
saves in transformers' Gemma 4, exactly, over the config switches that change a layer's tensors:
full-attention layers with wider heads and their own key-and-value heads, keys and values from one
projection (attention_k_eq_v), layers reading an earlier layer's keys and values
(num_kv_shared_layers) with a double-wide MLP, per-layer inputs or none; with and without weight
gradients, float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import transformers

from mergeopt.errors import UserError
from mergeopt.memory import activations
from mergeopt.memory.layer_shapes import LayerShape, gemma4_layers
from mergeopt.memory.sizes import FLOAT32, Dims
from tests.test_layer_profiles import saved_bytes

HIDDEN, VOCAB, BATCH, LENGTH = 64, 200, 3, 40
KINDS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
VARIANTS = {
    "plain": {},
    "shared-double-wide": dict(num_kv_shared_layers=2, use_double_wide_mlp=True),
    "k-eq-v": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    "shared-unrepeated-no-per-layer-input": dict(
        num_key_value_heads=4, num_kv_shared_layers=2, hidden_size_per_layer_input=0
    ),
}
# Gemma 4 26B-A4B's kind: a mixture-of-experts block beside the dense MLP
MOE_BLOCK = dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24)


def _config(variant: str, **changes) -> transformers.Gemma4TextConfig:
    shapes = dict(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=len(KINDS),
        layer_types=KINDS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        hidden_size_per_layer_input=8,
        max_position_embeddings=128,
        sliding_window=16,
    )
    return transformers.Gemma4TextConfig(**{**shapes, **VARIANTS[variant], **changes})


def _planned(dims: Dims, compute: int, frozen: bool) -> int:
    """What the plan says the decoder keeps from its input embeddings to its final norm (no output
    layer reads that norm's output here)."""
    layers = sum(
        n * activations.layer_activation_bytes(kind, BATCH, LENGTH, compute, frozen)
        for kind, n in dims.layer_kinds()
    )
    final = BATCH * LENGTH * dims.profile.norm_bytes(HIDDEN, 1, compute, frozen)
    final += FLOAT32 * HIDDEN if compute != FLOAT32 else 0  # the norm's weight cast to float32
    inputs = activations.per_layer_inputs_bytes(dims, BATCH, LENGTH, compute, frozen)
    return layers + final + inputs + activations.rotary_bytes(dims, LENGTH, compute, BATCH)


def _saved_and_planned(config, compute: str, frozen: bool) -> tuple[int, int]:
    """(What autograd saves for the decoder from its input embeddings, what the plan says.)"""
    dtype = getattr(torch, compute)
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(config).to(dtype)
    model.requires_grad_(not frozen)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, LENGTH - 7 :] = 0  # right padding, as the dev sets are batched
    embedded = model.get_input_embeddings()(ids).detach().requires_grad_()
    run = lambda: model.model(inputs_embeds=embedded, attention_mask=mask, use_cache=False)  # noqa: E731
    measured = saved_bytes(run, [*model.parameters(), *model.buffers()])
    dims = Dims.from_config(config.to_dict(), "base")
    # the per-layer embedding's ids, which transformers recovers from the input embeddings here
    # (three int64 columns of a nonzero's result; the fit passes the ids, which the plan counts)
    ids = 0 if frozen or not dims.per_layer_input else 3 * 8 * BATCH * LENGTH
    return measured, _planned(dims, dtype.itemsize, frozen) + ids


@pytest.mark.parametrize("frozen", [False, True], ids=["merged", "frozen"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("moe", [False, True], ids=["mlp", "mlp-and-experts"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_decoder_saves_what_the_plan_says(variant, moe, compute, frozen):
    """Four layers (sliding-window and full, alternating) from their input embeddings, with or
    without a mixture-of-experts block beside the MLP: the distinct storages autograd saves,
    weights left out, equal the plan's layers of each shape, its per-layer inputs, the final norm
    and cos and sin per kind of layer."""
    config = _config(variant, **(MOE_BLOCK if moe else {}))
    measured, planned = _saved_and_planned(config, compute, frozen)
    assert measured == planned


def test_the_layers_are_grouped_by_shape():
    """The shapes the plan reads from a Gemma 4 config: full layers with their own head width and
    key-and-value heads, shared layers with a double-wide MLP and no keys of their own; a saved
    config (per_layer_config keyed "01") and one as released (global_head_dim) read alike."""
    config = _config("shared-double-wide").to_dict()
    assert dict(gemma4_layers(config, "base", 16, 2, 96)) == {
        LayerShape("sliding_attention", 16, 2, 96): 1,
        LayerShape("full_attention", 32, 2, 96): 1,
        LayerShape("sliding_attention", 16, 2, 192, kv_shared=True): 1,
        LayerShape("full_attention", 32, 2, 192, kv_shared=True): 1,
    }
    released = {k: v for k, v in _config("k-eq-v").to_dict().items() if k != "per_layer_config"}
    released.update(global_head_dim=32, num_global_key_value_heads=1)
    read = gemma4_layers(released, "base", 16, 2, 96)
    assert read == gemma4_layers(_config("k-eq-v").to_dict(), "base", 16, 2, 96)
    assert LayerShape("full_attention", 32, 1, 96, k_eq_v=True) in dict(read)
    # without layer_types, transformers' default: five sliding-window layers to one full
    default = {**_config("plain", num_hidden_layers=8, layer_types=None).to_dict(), "layer_types": None}
    kinds = dict(gemma4_layers(default, "base", 16, 2, 96))
    assert (
        kinds[LayerShape("full_attention", 32, 2, 96)] == 2
        and kinds[LayerShape("sliding_attention", 16, 2, 96)] == 6
    )


def test_a_gemma4_config_with_layer_types_not_matching_its_layers_is_named():
    config = {**_config("plain").to_dict(), "layer_types": KINDS[:3]}
    with pytest.raises(
        UserError, match="base: config.json's layer_types names 3 layers, not num_hidden_layers=4"
    ):
        Dims.from_config(config, "base")
