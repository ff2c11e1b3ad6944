"""PEFT LoRA adapters read as experts: scaled factors equal PEFT's own merge, errors name the adapter.

Reference: ``peft``'s ``merge_and_unload()`` of the same adapter on the same base. Our θ0 + s·B·A
per adapted module must equal PEFT's merged weight, with plain, rsLoRA and per-module rank and
alpha patterns.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from mergeopt.errors import UserError
from mergeopt.loading.lora import is_adapter, read_adapter
from tests.conftest import tiny_config

CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(
        r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 3.0}
    ),
}


def _adapter(tmp_path, seed: int, **lora):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_config()).eval()
    reference = copy.deepcopy(base)
    config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **lora)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    return reference, merged, tmp_path / "adapter"


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_scaled_factors_equal_peft_merge_and_unload(kind, tmp_path):
    base, merged, path = _adapter(tmp_path, 0, **CONFIGS[kind])
    assert is_adapter(path)
    adapter = read_adapter(path, _shapes(base))
    merged_params = dict(merged.named_parameters())
    adapted = {n for n in merged_params if any(m in n for m in ("q_proj", "v_proj", "down_proj"))}
    assert set(adapter.factors) == adapted
    for name, param in base.named_parameters():
        expected = merged_params[name].detach()
        ours = param.detach() + adapter.factors[name].delta() if name in adapter.factors else param.detach()
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    if kind == "patterns":
        v = adapter.factors["model.layers.0.self_attn.v_proj.weight"]
        down = adapter.factors["model.layers.1.mlp.down_proj.weight"]
        assert (v.rank, v.scaling) == (2, 8 / 2) and (down.rank, down.scaling) == (4, 3.0 / 4)
    if kind == "rslora":
        assert adapter.factors["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(8 / 2)


def test_adapter_for_another_base_is_refused(tmp_path):
    _, _, path = _adapter(tmp_path, 0, r=4, lora_alpha=8)
    other = LlamaForCausalLM(tiny_config(hidden_size=48, num_attention_heads=4, num_key_value_heads=2))
    # modules are checked in name order: layer 0's down_proj (32 -> 48 outputs) fails first
    expected = (
        r"layers.0.mlp.down_proj has lora_A \[4, 64\] and lora_B \[32, 4\], but the base's .* is \[48, 64\]"
    )
    with pytest.raises(UserError, match=expected):
        read_adapter(path, _shapes(other))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # a Llama adapter read as GPT-2's (Conv1D, in × out): the factors do not fit the transpose
        (
            "fan_in_fan_out",
            True,
            r"down_proj has lora_A \[4, 64\] and lora_B \[32, 4\], but the base's .* is \[32, 64\]",
        ),
        ("bias", "some", "bias must be none, all or lora_only"),
        ("peft_type", "IA3", "only LoRA adapters"),
        ("layer_replication", [[0, 2], [1, 2]], "layer replication .* is not supported"),
        ("alora_invocation_tokens", [5, 6], "activated LoRA .* is not supported"),
        ("r", 0, "r must be a positive number"),
    ],
)
def test_unsupported_adapters_are_one_line_errors(tmp_path, key, value, message):
    base, _, path = _adapter(tmp_path, 0, r=4, lora_alpha=8)
    config = json.loads((path / "adapter_config.json").read_text())
    config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        read_adapter(path, _shapes(base))


def test_pickled_adapters_need_the_flag_and_load_weights_only(tmp_path):
    base, merged, path = _adapter(tmp_path, 0, r=4, lora_alpha=8)
    from safetensors.torch import load_file

    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    with pytest.raises(UserError, match="is a pickle.*allow_pickle"):
        read_adapter(path, _shapes(base))
    adapter = read_adapter(path, _shapes(base), allow_pickle=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(
        dict(base.named_parameters())[name].detach() + adapter.factors[name].delta(),
        dict(merged.named_parameters())[name].detach(),
        atol=1e-6,
        rtol=1e-6,
    )


def test_nan_factors_and_missing_weights_are_named(tmp_path):
    base, _, path = _adapter(tmp_path, 0, r=4, lora_alpha=8)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(UserError, match="lora_B.weight of the adapter contains NaN or Inf"):
        read_adapter(path, _shapes(base))
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        read_adapter(path, _shapes(base))
