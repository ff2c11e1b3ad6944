"""Checkpoint directories: sharded reads equal the state dict; incompatible experts are named precisely."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import INDEX_FILE, check_compatible, open_all, open_checkpoint
from tests.conftest import save_checkpoint, tiny_config


def test_sharded_checkpoint_reads_every_tensor_exactly(random_world, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(random_world["experts"]["alpha"], dtype=torch.float32)
    save_checkpoint(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / INDEX_FILE).is_file()
    ckpt = open_checkpoint(tmp_path / "sharded")
    assert len({m.file for m in ckpt.tensors.values()}) > 1
    state = model.state_dict()
    assert set(ckpt.tensors) == set(state)
    for name, tensor in state.items():
        assert torch.equal(ckpt.read(name), tensor)
        assert ckpt.tensors[name].shape == tuple(tensor.shape)


def test_sharded_and_single_file_experts_are_compatible(random_world, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(random_world["experts"]["beta"], dtype=torch.float32)
    save_checkpoint(model, tmp_path / "sharded", max_shard_size="20KB")
    _, experts = open_all(
        random_world["base"], {"a": random_world["experts"]["alpha"], "b": tmp_path / "sharded"}
    )
    assert set(experts) == {"a", "b"}


def test_shape_mismatch_names_tensor_and_both_directories(random_world, tmp_path):
    torch.manual_seed(0)
    wider = save_checkpoint(LlamaForCausalLM(tiny_config(intermediate_size=96)), tmp_path / "wider")
    with pytest.raises(UserError) as err:
        open_all(random_world["base"], {"alpha": random_world["experts"]["alpha"], "wide": str(wider)})
    msg = str(err.value)
    assert "tensor model.layers.0.mlp.down_proj.weight has shape [32, 64] vs [32, 96]" in msg
    assert random_world["base"] in msg and str(wider) in msg and "'wide'" in msg
    assert "\n" not in msg


def test_missing_tensor_and_vocabulary_and_architecture(random_world, tmp_path):
    base = open_checkpoint(random_world["base"])
    torch.manual_seed(0)
    fewer = open_checkpoint(
        save_checkpoint(LlamaForCausalLM(tiny_config(num_hidden_layers=1)), tmp_path / "fewer")
    )
    with pytest.raises(UserError, match=r"tensor model\.layers\.1\..* is missing from the expert"):
        check_compatible(base, fewer, "fewer")
    vocab = open_checkpoint(save_checkpoint(LlamaForCausalLM(tiny_config(vocab_size=80)), tmp_path / "vocab"))
    with pytest.raises(UserError, match="vocabulary size differs: 54 vs 80"):
        check_compatible(base, vocab, "vocab")
    arch_dir = shutil.copytree(random_world["experts"]["alpha"], tmp_path / "arch")
    config = json.loads((arch_dir / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (arch_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="architecture differs: LlamaForCausalLM vs MistralForCausalLM"):
        check_compatible(base, open_checkpoint(arch_dir), "arch")


def test_different_tokenizer_vocabulary_is_refused(random_world, tmp_path):
    other = shutil.copytree(random_world["experts"]["alpha"], tmp_path / "tok")
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Z"] = vocab.pop("z")
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(
        UserError, match="tokenizer vocabulary differs: token id \\d+ is .z. in the base, .Z. in the expert"
    ):
        check_compatible(open_checkpoint(random_world["base"]), open_checkpoint(other), "tok")
    vocab["z"] = vocab.pop("Z")
    data["added_tokens"].append({"id": 999, "content": "<|im_start|>"})  # a chat token added to one side
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(
        UserError, match="token id 999 is absent in the base, '<\\|im_start\\|>' in the expert"
    ):
        check_compatible(open_checkpoint(random_world["base"]), open_checkpoint(other), "tok")


def test_missing_shard_is_named(random_world, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(random_world["experts"]["alpha"], dtype=torch.float32)
    path = save_checkpoint(model, tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=f"names shard {shard.name}, which is missing"):
        open_checkpoint(path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"w": torch.zeros(1)}, path / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights .*pytorch_model.bin"):
        open_checkpoint(path)


@pytest.mark.parametrize("what", ["no_dir", "no_config", "no_weights", "bad_safetensors"])
def test_unreadable_checkpoints(tmp_path, what):
    path = tmp_path / "ckpt"
    if what != "no_dir":
        path.mkdir()
    if what in ("no_weights", "bad_safetensors"):
        (path / "config.json").write_text("{}")
    if what == "bad_safetensors":
        (path / "model.safetensors").write_bytes(b"not a safetensors file")
    expected = {
        "no_dir": "does not exist",
        "no_config": "no config.json",
        "no_weights": "has no model.safetensors",
        "bad_safetensors": "not a readable safetensors file",
    }[what]
    with pytest.raises(UserError, match=expected):
        open_checkpoint(path)


def test_a_trainer_output_without_its_final_save_names_the_latest_save(tmp_path):
    """TRL's (and transformers' Trainer's) output directory, the run stopped before its final save:
    only checkpoint-N subdirectories hold an adapter or a model. The refusal says so and names the
    latest by step (checkpoint-12 after checkpoint-4, whose name sorts last), where it said only
    "not a Hugging Face checkpoint directory"."""
    out = tmp_path / "trl-out"
    for step, name in ((4, "adapter_config.json"), (12, "config.json")):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / name).write_text("{}")
    (out / "checkpoint-99").mkdir()  # a save without a model in it is not named
    (out / "runs").mkdir()
    with pytest.raises(UserError) as err:
        open_checkpoint(out, role="model.experts.math")
    assert str(err.value) == (
        f"model.experts.math: {out} has no config.json: a trainer's output directory without its "
        f"final save, holding 2 checkpoint-N save(s): give one of them, the latest is {out / 'checkpoint-12'}"
    )


def test_a_dequantized_copy_that_kept_its_quantization_config_is_read(random_world, tmp_path):
    """config.json's quantization_config alone does not refuse a checkpoint: a dequantized copy may
    keep the entry while every tensor is a float. Packed (non-float) tensors beside it do (the
    bad-input row "expert is a quantized checkpoint")."""
    dst = tmp_path / "dequantized"
    shutil.copytree(random_world["experts"]["alpha"], dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "dequantize": True}
    (dst / "config.json").write_text(json.dumps(config))
    opened = open_checkpoint(dst)
    assert set(opened.tensors) == set(open_checkpoint(random_world["experts"]["alpha"]).tensors)


def test_a_tensor_only_the_expert_has_is_named(random_world, tmp_path):
    """An expert with a tensor the base lacks (another head, an extra layer's norm) is not the same
    model: the first such tensor is named, with both directories."""
    from safetensors.torch import load_file, save_file

    expert = shutil.copytree(random_world["experts"]["alpha"], tmp_path / "extra")
    tensors = load_file(expert / "model.safetensors")
    tensors["model.extra_norm.weight"] = torch.ones(32)
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})
    message = (
        r"tensor model.extra_norm.weight is in the expert but not in the base \(base .* vs expert 'extra'"
    )
    with pytest.raises(UserError, match=message):
        check_compatible(open_checkpoint(random_world["base"]), open_checkpoint(expert), "extra")


def test_an_index_that_maps_a_tensor_to_the_wrong_shard_is_named(random_world, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(random_world["experts"]["alpha"], dtype=torch.float32)
    path = save_checkpoint(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["model.not_saved.weight"] = sorted(set(index["weight_map"].values()))[0]
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"maps model.not_saved.weight to a shard that does not contain it$"):
        open_checkpoint(path)


def test_a_missing_pickle_shard_is_named(tmp_path):
    """A sharded pickle checkpoint (read only with model.allow_pickle) whose index names a shard that
    is not there: the shard is named before any is loaded."""
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"a": torch.zeros(1)}, path / "pytorch_model-00001-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match=r"pickle shard pytorch_model-00002-of-00002.bin is missing$"):
        open_checkpoint(path, allow_pickle=True)


def test_experts_stored_with_less_precision_than_the_base_are_warned_of(random_world, tmp_path):
    """A bfloat16 expert over a float32 base: its task vector holds the base's rounding, often larger
    than a short fine-tune, so fit and plan warn once, naming it; experts in the base's dtype (or a
    finer one) are not warned of."""
    from mergeopt.loading.precision import precision_warning, weight_dtype
    from tests.conftest import recipe_tree, run_in_process

    model = AutoModelForCausalLM.from_pretrained(random_world["experts"]["beta"], dtype=torch.bfloat16)
    coarse = save_checkpoint(model, tmp_path / "beta-bf16")
    base = open_checkpoint(random_world["base"])
    assert weight_dtype(base) == "F32" and weight_dtype(open_checkpoint(coarse)) == "BF16"
    experts = {"alpha": open_checkpoint(random_world["experts"]["alpha"]), "beta": open_checkpoint(coarse)}
    assert precision_warning(base, {"alpha": experts["alpha"]}) is None
    assert "expert beta (BF16) stored with less precision than the base (F32)" in precision_warning(
        base, experts
    )
    assert precision_warning(open_checkpoint(coarse), {"alpha": experts["alpha"]}) is None  # finer is fine

    tree = recipe_tree(random_world, tmp_path / "out")
    tree["model"]["experts"]["beta"] = str(coarse)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    for command in ("plan", "fit"):
        result = run_in_process(
            command, str(tmp_path / "recipe.yaml"), "--quiet" if command == "fit" else "--json"
        )
        assert result.returncode == 0, result.stderr
        warned = [line for line in result.stderr.splitlines() if "less precision" in line]
        assert len(warned) == 1 and warned[0].startswith("mergeopt: warning: expert beta (BF16)"), (
            result.stderr
        )


def test_an_exclude_pattern_that_matches_no_parameter_is_warned_of(random_world, tmp_path):
    """model.exclude=[lm-head] (a typo for lm_head) keeps nothing at θ0: plan and fit warn once,
    naming the pattern, and go on; patterns that match are not warned of."""
    from tests.conftest import recipe_tree, run_in_process

    tree = recipe_tree(random_world, tmp_path / "out")
    tree["model"]["exclude"] = ["embed_tokens", "lm-head", "norm"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    for command in ("plan", "fit"):
        quiet = "--quiet" if command == "fit" else "--json"
        result = run_in_process(command, str(tmp_path / "recipe.yaml"), quiet)
        assert result.returncode == 0, result.stderr
        warned = [line for line in result.stderr.splitlines() if "model.exclude" in line]
        assert warned == [
            "mergeopt: warning: model.exclude 'lm-head' matches no parameter of the base (the closest "
            "name to 'lm-head' is 'lm_head.weight'), so nothing is kept at θ0 for it"
        ], result.stderr
    tree["model"]["exclude"] = ["embed_tokens", "norm"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    result = run_in_process("plan", str(tmp_path / "recipe.yaml"), "--json")
    assert result.returncode == 0 and "model.exclude" not in result.stderr, result.stderr
