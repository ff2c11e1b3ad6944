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
from mergeopt.loading.lora import read_adapter
from mergeopt.loading.peft_format import is_adapter
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


Q = "base_model.model.model.layers.0.self_attn.q_proj"  # an adapted module's keys, as PEFT saves them
K = "base_model.model.model.layers.0.self_attn.k_proj"  # a module the adapter does not adapt


def _drop_b(tensors, shapes):
    del tensors[f"{Q}.lora_B.weight"]


def _no_factors(tensors, shapes):
    tensors.clear()


def _convolution(tensors, shapes):
    shapes["model.layers.0.self_attn.q_proj.weight"] = (32, 32, 1)


def _bias_without_base_bias(tensors, shapes):
    tensors[f"{Q}.lora_B.bias"] = torch.ones(32)


def _bias_of_wrong_width(tensors, shapes):
    shapes["model.layers.0.self_attn.q_proj.bias"] = (32,)
    tensors[f"{Q}.lora_B.bias"] = torch.ones(3)


def _magnitude_of_wrong_width(tensors, shapes):
    tensors[f"{Q}.lora_magnitude_vector"] = torch.ones(3)


def _magnitude_without_factors(tensors, shapes):
    tensors[f"{K}.lora_magnitude_vector"] = torch.ones(16)


def _embedding_of_no_matrix(tensors, shapes):
    tensors["base_model.model.model.missing.lora_embedding_A"] = torch.ones(4, 54)
    tensors["base_model.model.model.missing.lora_embedding_B"] = torch.ones(32, 4)


def _tokens_beside_factors(tensors, shapes):
    tensors[f"{Q}.token_adapter.trainable_tokens_delta"] = torch.ones(2, 32)


def _tokens_of_no_matrix(tensors, shapes):
    tensors["base_model.model.model.missing.token_adapter.trainable_tokens_delta"] = torch.ones(2, 32)


def _unexpected_tensor(tensors, shapes):
    tensors["base_model.model.model.missing.weight"] = torch.ones(3)


def _copy_of_wrong_shape(tensors, shapes):
    tensors["base_model.model.model.norm.weight"] = torch.ones(3)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_b, r"module model.layers.0.self_attn.q_proj has lora_A but not its pair$"),
        (_no_factors, r"the adapter holds no LoRA factors$"),
        (_convolution, r"adapts model.layers.0.self_attn.q_proj, whose .*q_proj.weight is not a matrix"),
        (_bias_without_base_bias, r"q_proj has a LoRA bias \(lora_bias\), but the base's .*q_proj has none$"),
        (_bias_of_wrong_width, r"q_proj's LoRA bias is \[3\], not \[32\]$"),
        (_magnitude_of_wrong_width, r"q_proj's lora_magnitude_vector is \[3\], not \[32\]$"),
        (
            _magnitude_without_factors,
            r"lora_magnitude_vector of model.layers.0.self_attn.k_proj without LoRA",
        ),
        (_embedding_of_no_matrix, r"adapts the embedding model.missing, but the base has no matrix"),
        (_tokens_beside_factors, r"q_proj has trainable tokens and LoRA factors; mergeopt reads one"),
        (_tokens_of_no_matrix, r"trainable tokens for model.missing, but the base has no matrix"),
        (_unexpected_tensor, r"unexpected tensor .*missing.weight in a LoRA adapter \(the base has no"),
        (_copy_of_wrong_shape, r"norm.weight is \[3\] but the base's model.norm.weight is \[32\]"),
    ],
)
def test_damaged_adapter_tensors_are_one_line_errors_naming_the_module(tmp_path, damage, message):
    """Each way an adapter's tensors can disagree with each other or with the base is refused before
    anything is stacked, in one line that names the adapter and the module."""
    from safetensors.torch import load_file, save_file

    base, _, path = _adapter(tmp_path, 0, r=4, lora_alpha=8)
    shapes = _shapes(base)
    read_adapter(path, shapes)  # the undamaged adapter reads
    tensors = load_file(path / "adapter_model.safetensors")
    damage(tensors, shapes)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(UserError, match=message) as caught:
        read_adapter(path, shapes)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))


def test_a_fractional_rank_is_refused(tmp_path):
    base, _, path = _adapter(tmp_path, 0, r=4, lora_alpha=8)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 4.5}))
    with pytest.raises(UserError, match=r"adapter_config.json: r must be a whole number, got 4.5$"):
        read_adapter(path, _shapes(base))
