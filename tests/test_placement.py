"""Spreading a model over several GPUs (model.device_map), checked where this machine allows.

There is no GPU here, so two things are checked on CPU: (1) the map mergeopt plans for
Llama-3.1-8B on the meta device, with budgets given for GPUs that need not exist (accelerate only
warns about them): no decoder layer is split, every GPU's share of model + stack + reserved
activations stays within its budget, and a model that cannot fit is refused in one line instead
of being offloaded; (2) a fit through accelerate's dispatch hooks (forced on for a CPU-only map)
equals the plain fit, so functional_call's merged parameters and the hooks work together. A real
multi-GPU run is not tested here.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.fit import fit
from mergeopt.memory import placement
from tests.conftest import recipe_tree
from tests.test_plan import LLAMA_8B

GIB = 2**30
ACTIVATIONS = 24 * GIB


@pytest.fixture(scope="module")
def meta_8b():
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_8B))


def _bytes_per_device(model, device_map, factor):
    """Planned bytes on each device: every parameter's float32 weight times the stack's factor."""
    out = {}
    for name, p in model.named_parameters():
        module = max((m for m in device_map if m == "" or name.startswith(m + ".")), key=len)
        out[device_map[module]] = out.get(device_map[module], 0) + p.numel() * 4 * factor
    return out


@pytest.mark.parametrize("strategy", ["auto", "balanced", "sequential"])
@pytest.mark.parametrize("gpus, dtype", [(4, "bfloat16"), (2, "bfloat16"), (4, "float32")])
def test_8b_map_fits_every_gpu_with_its_stack(meta_8b, strategy, gpus, dtype):
    budget = 80 * GIB
    device_map = placement.plan_device_map(
        meta_8b, strategy, 4, dtype, {i: budget for i in range(gpus)}, activations=ACTIVATIONS
    )
    reserve = placement.reserve_per_gpu(ACTIVATIONS, gpus)
    factor = placement.cost_factor(4, dtype)
    used = _bytes_per_device(meta_8b, device_map, factor)
    assert set(used) <= set(range(gpus))
    assert all(b + reserve <= budget for b in used.values()), used
    for name in device_map:  # whole decoder layers (LlamaDecoderLayer is never split)
        assert re.fullmatch(r"model\.(embed_tokens|norm|rotary_emb|layers\.\d+)|lm_head|model|", name), name
    total = sum(p.numel() for p in meta_8b.parameters()) * 4 * factor
    assert sum(used.values()) == pytest.approx(total)
    if strategy == "balanced":
        assert len(used) == gpus  # balanced uses every GPU


def test_8b_that_cannot_fit_is_refused_not_offloaded(meta_8b):
    with pytest.raises(UserError) as err:
        placement.plan_device_map(meta_8b, "auto", 4, "float32", {0: "80GiB"}, activations=ACTIVATIONS)
    message = str(err.value)
    assert "\n" not in message and "needs about" in message and "1 GPU(s)" in message
    assert "model.stack_dtype" in message


def test_cost_factor_counts_anchor_and_differences():
    """θ0 of a stacked parameter is not kept (its module reads the merge): anchor + K − 1 rows."""
    assert placement.cost_factor(4, "float32") == (4 + 3 * 4) / 4
    assert placement.cost_factor(8, "bfloat16") == (2 + 7 * 2) / 4
    assert placement.cost_factor(8, "int8") == (2 + 7 * 1) / 4


@pytest.mark.parametrize(
    "device_map, culprit",
    [
        ({"model": 0, "lm_head": "disk"}, "'lm_head' on 'disk'"),
        ({"model": 0, "lm_head": "cpu"}, "mixes 'cpu' with GPUs"),
    ],
)
def test_explicit_maps_that_would_offload_are_refused(device_map, culprit):
    with pytest.raises(UserError, match=re.escape(culprit)):
        placement.check_explicit_map(device_map)


def test_strategy_without_gpus_is_one_line(random_world, tmp_path):
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["model"]["device_map"] = "auto"
    with pytest.raises(UserError, match="none is visible here"):
        fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_fit_through_accelerate_hooks_equals_the_plain_fit(random_world, tmp_path, monkeypatch):
    """An explicit map with accelerate's hooks forced on (as on several GPUs) gives the same fit."""
    import accelerate
    from transformers import AutoModelForCausalLM

    hooked, load = [], AutoModelForCausalLM.from_pretrained

    def load_and_dispatch(*args, **kwargs):
        # transformers dispatches with hooks only for maps over >1 devices: do it as it would there
        model = load(*args, **kwargs)
        if isinstance(kwargs.get("device_map"), dict) and "" not in kwargs["device_map"]:
            accelerate.dispatch_model(model, device_map=kwargs["device_map"], force_hooks=True)
            hooked.append(sum(hasattr(m, "_hf_hook") for m in model.modules()))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_and_dispatch)
    plain = fit(recipe_from_dict(recipe_tree(random_world, tmp_path / "plain")), progress=False, log=print)
    tree = recipe_tree(random_world, tmp_path / "hooked")
    layers = {f"model.layers.{i}": "cpu" for i in range(2)}
    tree["model"]["device_map"] = {
        "model.embed_tokens": "cpu",
        **layers,
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    spread = fit(recipe_from_dict(tree), progress=False, log=print)
    assert hooked and hooked[0] > 1  # the hooks really were in the forward pass
    assert spread["weights"] == pytest.approx(plain["weights"], abs=1e-6)
    assert spread["dev_loss"] == pytest.approx(plain["dev_loss"], rel=1e-6)
    written = json.loads((tmp_path / "hooked" / "mixture.json").read_text())
    assert written["weights"] == spread["weights"]


def test_dry_run_prints_the_planned_placement(tmp_path):
    from mergeopt.memory import dry_run
    from tests.test_plan import EXPERTS_8B, recipe

    LlamaConfig(**LLAMA_8B).save_pretrained(tmp_path / "llama8b")
    base = str(tmp_path / "llama8b")
    budgets = {i: "80GiB" for i in range(4)}
    r = recipe(base, dict.fromkeys(EXPERTS_8B, base), stack_dtype="bfloat16", device_map="balanced")
    r = r.model_copy(update={"model": r.model.model_copy(update={"max_memory": budgets})})
    lines = dry_run.dry_run(r, "8b.yaml").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("placement over GPUs"))
    rows = lines[start + 1 :]
    assert [row.split()[0] for row in rows] == ["cuda:0:", "cuda:1:", "cuda:2:", "cuda:3:"]
    total = sum(float(row.split()[-1].replace(",", "")) for row in rows)
    factor = placement.cost_factor(4, "bfloat16")
    assert total == pytest.approx(8_030_261_248 * 4 * factor / GIB, abs=0.05)
