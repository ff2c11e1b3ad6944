"""LoRA adapters PEFT initialises in other ways, read as PEFT serves them once trained.

The truth is PEFT's own model at the end of training (every trainable factor moved): its logits.

- PiSSA and OLoRA (like CorDA, LoRA-GA, ASTRA and LoftQ) change the base's weights before training,
  so the saved factors belong over that changed base. Read over the base as saved they made another
  model, silently (PiSSA: logits 0.12 from PEFT's); now refused in one line that names the init and
  the ways out. Converted as PEFT converts them (``save_pretrained`` with
  ``path_initial_model_for_weight_conversion``: a plain LoRA of rank 2r over the original base),
  they give the trained model's logits.
- Initialisations that leave the base alone (gaussian, orthogonal, MiCA) are plain LoRA once trained.
- KaSA truncates the base's weights and adds a diagonal between the factors: refused, named.
- VeLoRA and MonteCLoRA change how PEFT trains, not the model: their extra tensors are left unread.
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
from tests.conftest import tiny_config

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained(init, **lora):
    """(the original base, PEFT's model after 'training' from ``init``): every trainable tensor moved."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **lora)
    model = get_peft_model(copy.deepcopy(base), config)
    return base, model


def _train(model) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.eval()


def _logits(model) -> torch.Tensor:
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        return model(ids).logits


def _read_over(base, path) -> LlamaForCausalLM:
    """The base with the adapter's updates as mergeopt reads them (its one-hot merge)."""
    adapter = read_adapter(path, {n: tuple(p.shape) for n, p in base.named_parameters()})
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, parameter in merged.named_parameters():
            if name in adapter.factors:
                parameter.add_(adapter.factors[name].delta())
    return merged


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_trained_over_a_base_its_init_changed_is_refused_naming_it(init, tmp_path):
    base, model = _trained(init)
    _train(model)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError) as refused:
        read_adapter(tmp_path / "adapter", {n: tuple(p.shape) for n, p in base.named_parameters()})
    message = str(refused.value)
    assert f"init_lora_weights is '{init}' in adapter_config.json" in message
    assert "path_initial_model_for_weight_conversion" in message and "merge_and_unload" in message
    assert "\n" not in message


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "lora_ga", "astra", "loftq", "PiSSA"])
def test_every_init_that_changes_the_base_is_refused(init, tmp_path):
    """Those PEFT makes from data or a quantizer, named in the config as PEFT writes it."""
    base, model = _trained(False)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "init_lora_weights": init})
    )
    with pytest.raises(UserError, match=f"init_lora_weights is '{init}'"):
        read_adapter(tmp_path / "adapter", {n: tuple(p.shape) for n, p in base.named_parameters()})


def test_a_pissa_adapter_converted_by_peft_gives_the_trained_model(tmp_path):
    """PEFT's recipe: the initial adapter saved with init_lora_weights true, then the trained one
    saved against it; read over the original base it is the trained model (the unconverted one
    is 0.12 off there, which is why it is refused)."""
    base, model = _trained("pissa")
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = "pissa"
    _train(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path / "unconverted")
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    torch.testing.assert_close(_logits(_read_over(base, tmp_path / "converted")), trained, atol=2e-5, rtol=0)
    # what reading the unconverted factors over the original base would serve
    (tmp_path / "unconverted" / "adapter_config.json").write_text(
        json.dumps({**config, "r": 4, "lora_alpha": 8})
    )
    unconverted = _logits(_read_over(base, tmp_path / "unconverted"))
    assert (unconverted - trained).abs().max() > 0.05


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_read_as_plain_lora(init, tmp_path):
    base, model = _trained(init)
    _train(model)
    model.save_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(
        _logits(_read_over(base, tmp_path / "adapter")), _logits(model), atol=2e-5, rtol=0
    )


def test_kasa_is_refused_naming_it(tmp_path):
    base, model = _trained(True, kasa_config={})
    _train(model)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(
        UserError, match=r"KaSA .* is not supported \(kasa_config is set in adapter_config.json\)"
    ):
        read_adapter(tmp_path / "adapter", {n: tuple(p.shape) for n, p in base.named_parameters()})


@pytest.mark.parametrize("variant", ["velora_config", "monteclora_config"])
def test_variants_that_change_only_training_read_as_plain_lora(variant, tmp_path):
    """VeLoRA (its backward's activation projection) and MonteCLoRA (a sampler perturbing A while
    training) save tensors beside the factors that PEFT's served model and merge never read: they
    were refused as unexpected tensors. Read without them, the adapter is PEFT's model, and the
    memory plan counts its factors alone."""
    from mergeopt.loading.lora_sizes import factor_sizes

    base, model = _trained(True, **{variant: {}})
    _train(model)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    torch.testing.assert_close(
        _logits(_read_over(base, tmp_path / "adapter")), _logits(model), atol=2e-5, rtol=0
    )
    sizes = factor_sizes(tmp_path / "adapter", config=config)
    assert sizes.dense == () and len(sizes.modules) == 3 * 2  # q, v and down_proj of both layers
    # the same tensor without its option set is the adapter's, and unexpected
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, variant: None}))
    with pytest.raises(UserError, match="unexpected tensor .*lora_"):
        _read_over(base, tmp_path / "adapter")
