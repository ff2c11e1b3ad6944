"""LoRA adapters of a mixture-of-experts' fused expert weights and routers, read as PEFT serves them.

PEFT adapts a parameter that is not a Linear module's with ``target_parameters`` (its
``ParamWrapper``), and converts an adapter trained under transformers 4, one module per expert, to
that form when it loads it into transformers 5's fused experts. The truth here is PEFT itself:
each factor's update equals the wrapper's ``get_delta_weight``; the saved keys resolve to the
parameters PEFT wrapped; a fit's merge at one-hot weights gives ``PeftModel.from_pretrained``'s
logits, and at a mixed w the logits of θ0 + Σ w_i (θ_i − θ0) over the experts PEFT merges
(``merge_and_unload``); the memory plan counts these updates as the dense rows they are stacked as.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import peft
import pytest
import torch
import transformers
import yaml
from safetensors.torch import save_file
from torch.func import functional_call

from mergeopt.config import load_recipe
from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import open_experts
from mergeopt.loading.lora_parameters import WrappedParameter, per_expert_factors, wrapped_parameters
from mergeopt.loading.problem import load_merge
from mergeopt.worlds import resolve_recipe, toy
from tests.conftest import REPO, perturbed, recipe_tree, save_checkpoint, write_jsonl
from tests.test_conversions import MOE, SHARED, VOCAB, dev_sets
from tests.test_layer_merge import ARCHITECTURES as LAYER_MERGE_ARCHITECTURES

ARCHITECTURES = {
    **MOE,  # Mixtral, Qwen3-MoE, Qwen2-MoE (a shared expert beside), OLMoE, GLM-4.5
    # latent attention (no q_proj when q_lora_rank is set), a shared expert, a dense first layer
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", LAYER_MERGE_ARCHITECTURES["deepseek_v3"][2]),
    # experts stored (experts, in, out) (is_transposed), biased, gate and up interleaved
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2),
    ),
}
# PEFT's target_parameters for each: both fused projections, and Mixtral's router (a parameter of
# a module that is not a Linear)
TARGETS = {
    "mixtral": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
    "qwen3_moe": ["gate_up_proj", "down_proj"],
    "qwen2_moe": ["gate_up_proj", "down_proj"],  # not the shared expert's down_proj.weight
    "olmoe": ["experts.gate_up_proj", "experts.down_proj"],
    "gpt_oss": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
    "deepseek_v3": ["mlp.experts.gate_up_proj"],
    "glm4_moe": ["experts.gate_up_proj", "experts.down_proj"],  # layer 1's: layer 0 is dense
}
ATTENTION = {"deepseek_v3": "o_proj"}  # the module each adapter also adapts (a Linear: low-rank)


def moe_model(arch: str, seed: int) -> torch.nn.Module:
    config_name, model_name, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**{**SHARED, **extra})).eval()


def moe_adapter(base: str, directory: Path, seed: int, targets: list[str], attention: str = "q_proj") -> str:
    """A LoRA of the attention's ``attention`` projection and of ``targets``, random, saved by PEFT.

    The factors' numbers are this function's, not PEFT's initialisation: each is filled as
    ``nn.Linear`` fills its weight (Kaiming-uniform, a=√5) from the seeded generator, the attention
    modules' first, then each wrapped parameter's, the order PEFT 0.21 created them in; so the
    adapters are those its CPU references (benchmarks/results/moe_cpu_reference) and GPU results
    were measured with, under any PEFT (0.22 creates them in another order)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    generator = torch.get_rng_state()
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=[attention], target_parameters=targets)
    served = peft.get_peft_model(model, config)
    torch.set_rng_state(generator)
    wrapper = peft.tuners.lora.layer.ParamWrapper
    layers = [m for m in served.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    wrapped = {id(m.base_layer) for m in served.modules() if isinstance(m, wrapper)}
    for outermost in [m for m in served.modules() if isinstance(m, wrapper) and id(m) not in wrapped]:
        chain = [outermost]  # a parameter wrapped in a module's wrapper wraps the one before it
        while isinstance(chain[-1].base_layer, wrapper):
            chain.append(chain[-1].base_layer)
        layers += reversed(chain)
    with torch.no_grad():
        for layer in layers:
            for factor in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                torch.nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
    served.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def world(request, tmp_path_factory) -> dict:
    """A tiny random base, two LoRA experts of its fused experts (and attention), a dense expert,
    and two dev sets."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    base = moe_model(arch, 0)
    save_checkpoint(base, root / "base")
    dense = perturbed(base, 7)
    attention = ATTENTION.get(arch, "q_proj")
    experts = {
        "alpha": moe_adapter(str(root / "base"), root / "alpha", 10, TARGETS[arch], attention),
        "beta": moe_adapter(str(root / "base"), root / "beta", 11, TARGETS[arch], attention),
        "gamma": str(save_checkpoint(dense, root / "gamma")),
    }
    served = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(root / "base"), experts["alpha"]
    )
    wrapped = {  # what PEFT adapts: parameters (its ParamWrappers) and Linear modules
        f"{n.removeprefix('base_model.model.').replace('.base_layer', '')}.{m.parameter_name}"
        for n, m in served.named_modules()
        if isinstance(m, peft.tuners.lora.layer.ParamWrapper)
    }
    modules = {
        n.removeprefix("base_model.model.")
        for n, m in served.named_modules()
        if isinstance(m, peft.tuners.lora.layer.Linear)
    }
    dev = dev_sets(root)
    return {
        "arch": arch,
        "root": root,
        "base": str(root / "base"),
        "experts": experts,
        "dev": dev,
        "attention": attention,
        "wrapped": wrapped,
        "modules": modules,
    }


def _recipe(world: dict, tmp_path: Path, **model):
    tree = recipe_tree(world, tmp_path / "run")
    tree["model"].update(model)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    recipe, _ = resolve_recipe(load_recipe(path), lambda _m: None)
    return recipe


def _reference(world: dict, name: str) -> torch.nn.Module:
    """The expert as PEFT or transformers serves it."""
    path = world["experts"][name]
    if (Path(path) / "adapter_config.json").is_file():
        base = transformers.AutoModelForCausalLM.from_pretrained(world["base"])
        return peft.PeftModel.from_pretrained(base, path).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_each_update_is_peft_get_delta_weight(world):
    """For every wrapped parameter of a saved adapter: the resolved parameter is the wrapper's own,
    and s · b' @ a' of the per-expert factors equals ``ParamWrapper.get_delta_weight``."""
    path = world["experts"]["alpha"]
    served = _reference(world, "alpha")
    wrappers = {
        name.removeprefix("base_model.model."): module
        for name, module in served.named_modules()
        if isinstance(module, peft.tuners.lora.layer.ParamWrapper)
    }
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    resolved = wrapped_parameters(config, moe_model(world["arch"], 0))
    assert set(resolved) == set(wrappers)
    assert {t.name for t in resolved.values()} == world["wrapped"]
    for key, target in resolved.items():
        wrapper = wrappers[key]
        from mergeopt.loading.lora_parameters import BASE_LAYER

        assert target.name == f"{key.replace(BASE_LAYER, '')}.{wrapper.parameter_name}"
        a, b = wrapper.lora_A["default"].weight.detach(), wrapper.lora_B["default"].weight.detach()
        a2, b2 = per_expert_factors(a, b, target)
        want = wrapper.get_delta_weight("default").detach()
        assert want.shape == target.shape
        torch.testing.assert_close(wrapper.scaling["default"] * (b2 @ a2), want, atol=1e-6, rtol=1e-6)


def test_one_hot_and_mixed_weights_give_peft_and_its_merge(world, tmp_path):
    """The fit's model at each one-hot mixture against PEFT's model of that adapter (or the dense
    expert), and at a mixed w against θ0 + Σ w_i (θ_i − θ0) of the experts PEFT merges."""
    model, stack, _, _ = load_merge(_recipe(world, tmp_path), progress=False)
    names = stack.expert_names
    fused = [n for n, a in stack.anchor.items() if a.dim() == 3]
    assert fused, "the fused expert weights are stacked"
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    merged = {}
    for i, name in enumerate(names):
        reference = _reference(world, name)
        with torch.no_grad():
            want = reference(ids).logits
            got = functional_call(model, stack.mix_params(torch.eye(len(names))[i]), (ids,)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
        if isinstance(reference, peft.PeftModel):
            reference = reference.merge_and_unload()
        merged[name] = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    base = transformers.AutoModelForCausalLM.from_pretrained(world["base"]).eval()
    theta0 = base.state_dict()
    mixed = {
        k: theta0[k] + sum(float(w) * (merged[n][k] - theta0[k]) for n, w in zip(names, weights))
        for k in theta0
    }
    base.load_state_dict(mixed)
    with torch.no_grad():
        want = base(ids).logits
        got = functional_call(model, stack.mix_params(weights), (ids,)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_nesting_follows_peft_for_any_order_and_subset(tmp_path):
    """Which saved key adapts which parameter, for one or both of a module's parameters named in
    either order, against the wrappers PEFT builds."""
    base = moe_model("mixtral", 0)
    for targets in (["gate_up_proj"], ["down_proj"], ["down_proj", "gate_up_proj"], ["experts.gate_up_proj"]):
        served = peft.get_peft_model(
            moe_model("mixtral", 0), peft.LoraConfig(r=2, target_parameters=targets, target_modules=[])
        )
        wrappers = {
            name.removeprefix("base_model.model."): f"{name}.{m.parameter_name}"
            for name, m in served.named_modules()
            if isinstance(m, peft.tuners.lora.layer.ParamWrapper)
        }
        resolved = wrapped_parameters({"target_parameters": targets}, base)
        assert {k: v.name for k, v in resolved.items()} == {
            k: v.removeprefix("base_model.model.").replace(".base_layer", "") for k, v in wrappers.items()
        }, targets


def test_square_transposed_experts_are_read_in_their_layout():
    """GPT-OSS stores its experts (experts, in, out); with in = out the factors' shapes cannot tell,
    so the layout is the module's ``is_transposed``: the update is (B_e A_e)ᵀ there, B_e A_e otherwise."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3 * 2, 5, generator=generator), torch.randn(5, 3 * 2, generator=generator)
    plain = WrappedParameter("w", (3, 5, 5))
    flipped = WrappedParameter("w", (3, 5, 5), transposed=True)
    a1, b1 = per_expert_factors(a, b, plain)
    a2, b2 = per_expert_factors(a, b, flipped)
    torch.testing.assert_close(b2 @ a2, (b1 @ a1).transpose(1, 2))
    for e in range(3):  # expert e's rows of A, and its columns e, E + e of B
        torch.testing.assert_close((b1 @ a1)[e], b[:, e::3] @ a[2 * e : 2 * e + 2])


def _v4_adapter(directory: Path, arch: str, seed: int, modules: dict[str, tuple[int, int]]) -> str:
    """An adapter as PEFT saved it under transformers 4: one module per expert and projection, named
    as the checkpoint stores them (``block_sparse_moe.experts.3.w1`` for Mixtral)."""
    generator = torch.Generator().manual_seed(seed)
    tensors, r = {}, 2
    where = "block_sparse_moe" if arch == "mixtral" else "mlp"
    for layer in range(SHARED["num_hidden_layers"]):
        prefix = f"base_model.model.model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"] = torch.randn(r, 32, generator=generator)
        tensors[f"{prefix}.self_attn.q_proj.lora_B.weight"] = torch.randn(32, r, generator=generator)
        for expert in range(4):
            for module, (n_in, n_out) in modules.items():
                key = f"{prefix}.{where}.experts.{expert}.{module}"
                tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(r, n_in, generator=generator)
                tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(n_out, r, generator=generator)
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 6, "target_modules": ["q_proj", *modules]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return str(directory)


V4_MODULES = {
    "mixtral": {"w1": (32, 48), "w3": (32, 48), "w2": (48, 32)},
    "qwen3_moe": {"gate_proj": (32, 24), "up_proj": (32, 24), "down_proj": (24, 32)},
}


@pytest.mark.parametrize("arch", sorted(V4_MODULES))
def test_adapters_of_per_expert_modules_are_converted_as_peft_does(arch, tmp_path):
    """An adapter trained under transformers 4 (a module per expert): PEFT fuses it into
    target_parameters when it loads it; the fit's one-hot mixture gives PEFT's logits."""
    base = moe_model(arch, 0)
    save_checkpoint(base, tmp_path / "base")
    experts = {
        "alpha": _v4_adapter(tmp_path / "alpha", arch, 1, V4_MODULES[arch]),
        "beta": _v4_adapter(tmp_path / "beta", arch, 2, V4_MODULES[arch]),
    }
    samplers, rng = toy.domain_samplers(0), random.Random(0)
    dev = {
        d: str(write_jsonl(tmp_path / f"{d}.jsonl", [samplers[d](rng) for _ in range(8)])) for d in ("arith",)
    }
    world = {"base": str(tmp_path / "base"), "experts": experts, "dev": dev}
    model, stack, _, _ = load_merge(_recipe(world, tmp_path), progress=False)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    for i, name in enumerate(stack.expert_names):
        reference = _reference(world, name)
        with torch.no_grad():
            want = reference(ids).logits
            got = functional_call(model, stack.mix_params(torch.eye(2)[i]), (ids,)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
    from mergeopt.memory.dry_run import read_inventory

    inventory, _ = read_inventory(_recipe(world, tmp_path))  # the plan converts them too
    for sizes in inventory.adapters.values():  # both fused weights of each layer, kept low-rank
        assert set(sizes.parameters) == set(stack.lowrank.parameters)
        assert len(sizes.parameters) == 2 * SHARED["num_hidden_layers"]
        assert all(m.endswith("q_proj") for m in sizes.modules)
    # an adapter of gate_proj without up_proj cannot be fused: PEFT refuses, in one line here
    half = {k: v for k, v in list(V4_MODULES[arch].items())[:1]}
    lone = _v4_adapter(tmp_path / "half", arch, 3, half)
    with pytest.raises(UserError, match="cannot convert") as caught:
        open_experts(world["base"], {"alpha": lone, "beta": experts["beta"]})
    assert "\n" not in str(caught.value)


def test_target_parameters_naming_nothing_is_one_line(tmp_path):
    base = moe_model("mixtral", 0)
    save_checkpoint(base, tmp_path / "base")
    served = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_parameters=["gate_up_proj"], target_modules=[])
    )
    served.save_pretrained(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    config["target_parameters"] = ["no_such_proj"]
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="names no parameter of the base"):
        open_experts(str(tmp_path / "base"), {"a": str(tmp_path / "lora"), "b": str(tmp_path / "lora")})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mixed", [False, True], ids=["lora", "lora+dense"])
def test_the_plan_holds_what_the_fit_stacks(world, tmp_path, dtype, mixed):
    """The memory plan, from headers: the LoRA experts' updates of the fused weights and routers
    stay factors, and the plan's factor row is the bytes of the fit's low-rank stack: alone with
    no dense row, beside a dense expert on top of the dense rows its weights need."""
    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    experts = world["experts"] if mixed else {n: p for n, p in world["experts"].items() if n != "gamma"}
    recipe = _recipe({**world, "experts": experts}, tmp_path, stack_dtype=dtype)
    inventory, dims = dry_run.read_inventory(recipe)
    p = plan.plan_memory(recipe, inventory, dims, DeviceMemory("cpu", "test", 2**40, 2**40))
    _, stack, _, _ = load_merge(recipe, progress=False)
    targets = world["wrapped"]
    for sizes in inventory.adapters.values():
        assert set(sizes.parameters) == targets
        assert all(m.endswith(world["attention"]) for m in sizes.modules)
    assert p.row("LoRA factors of") == stack.lowrank.nbytes()
    assert set(stack.lowrank.parameters) == targets
    if mixed:  # the dense expert's rows, the adapters' factors added to their merge
        assert targets <= set(stack.anchor)
    else:
        assert set(stack.lowrank.parameters) == targets and not stack.anchor
        assert not [r.label for r in p.held if r.label.startswith(("stack anchor", "stack differences"))]


def test_merge_as_adapter_saves_the_fused_experts_whole(world, tmp_path):
    """``mergeopt merge --as-adapter`` of adapters of the fused experts: no LoRA factor can carry
    the merged update of a fused weight, so its module goes in whole (``modules_to_save``), the
    attention as factors; PEFT loads it with the logits of the merge the fit scores."""
    from mergeopt.config import recipe_from_dict
    from mergeopt.loading.problem import load_problem
    from tests.test_lora_experts import merge_as_adapter

    experts = {n: p for n, p in world["experts"].items() if n != "gamma"}
    experts["gamma"] = moe_adapter(
        world["base"], tmp_path / "gamma", 12, TARGETS[world["arch"]], world["attention"]
    )
    result, tree = merge_as_adapter(world, tmp_path, experts, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {n.rpartition(".")[0] for n in world["wrapped"]}
    assert set(config["target_modules"]) == world["modules"]
    base = transformers.AutoModelForCausalLM.from_pretrained(world["base"]).eval()
    loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    problem = load_problem(recipe_from_dict(tree), progress=False)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), problem.stack.at(torch.tensor([0.5, 0.3, 0.2])) as merged:
        want = merged(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def two_set_batch():
    """Two dev sets' padded batch over this vocabulary (tests/test_layer_merge.py's layout)."""
    from mergeopt.objectives.data import Batch

    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    scored = mask.bool().clone()
    scored[:, :3] = False
    return Batch(input_ids=ids, attention_mask=mask, scored=scored, set_index=torch.tensor([0, 1, 1]))


def _adapters_only(world: dict) -> dict:
    return {**world, "experts": {n: p for n, p in world["experts"].items() if n != "gamma"}}


def _stacks(world: dict, tmp_path: Path, monkeypatch, mixed: bool = False, **model):
    """(model, stack) with the fused weights' LoRA kept as factors, and with it as dense rows (the
    adapters' updates made dense, as a dense expert's weights), for the same adapters; ``mixed``:
    beside the dense expert, whose rows the factors' update is added to."""
    from mergeopt.merging import mixed_experts

    recipe = _recipe(world if mixed else _adapters_only(world), tmp_path, **model)
    low = load_merge(recipe, progress=False)[:2]
    assert set(low[1].lowrank.parameters) == world["wrapped"]
    assert bool(low[1].anchor) == mixed
    with monkeypatch.context() as patched:
        patched.setattr(mixed_experts, "split_parameter_lora", lambda adapters, exclude: (dict(adapters), []))
        dense = load_merge(recipe, progress=False)[:2]
    assert not dense[1].lowrank.parameters and world["wrapped"] <= set(dense[1].anchor)
    return low, dense


@pytest.mark.parametrize(
    "checkpointed,compute,mixed",
    [
        (False, "float32", False),
        (True, "float32", False),
        (True, "bfloat16", False),
        (False, "float32", True),
    ],
    ids=["kept", "checkpointed", "bf16", "beside-dense"],
)
def test_the_low_rank_merge_equals_the_dense_rows(world, tmp_path, monkeypatch, checkpointed, compute, mixed):
    """Loss and ∂L/∂z of the fused weights merged from the LoRA factors against the same adapters
    stacked as dense rows (the per-layer merge, itself checked against finite differences in
    tests/test_layer_merge.py), with and without activation checkpointing, and beside a dense
    expert (the factors' update added to its merge); in bfloat16 both merge in float32 and round
    once, to the same weights but where float32 sums differ in their last bit."""
    from mergeopt.memory import checkpointing
    from tests.test_layer_merge import loss_and_grad, per_layer_loss

    logits = torch.tensor([0.4, -0.3, 0.1] if mixed else [0.4, -0.3], dtype=torch.float64)
    results = []
    for model, stack in _stacks(world, tmp_path, monkeypatch, mixed, compute_dtype=compute):
        (checkpointing.enable if checkpointed else checkpointing.disable)(model)
        results.append(
            loss_and_grad(lambda w, m=model, s=stack: per_layer_loss(m, s, w, two_set_batch(), 5), logits)
        )
    (low_loss, low_grad), (dense_loss, dense_grad) = results
    if compute == "bfloat16":  # measured: losses within 6e-5, gradients within 4% of the largest
        assert low_loss == pytest.approx(dense_loss, rel=1e-3)
        torch.testing.assert_close(low_grad, dense_grad, rtol=0.05, atol=1e-4)
    else:
        assert low_loss == pytest.approx(dense_loss, rel=1e-6)
        torch.testing.assert_close(low_grad, dense_grad, rtol=1e-5, atol=1e-9)
    assert low_grad.abs().max() > 1e-4  # the adapters move the loss


def test_no_merged_copy_of_the_experts_is_saved_for_the_backward(world, tmp_path, monkeypatch):
    """Autograd keeps a recipe, not the tensor, for every fused weight merged from the factors."""
    from mergeopt.merging import layer_merge
    from tests.test_layer_merge import counting_recipes, per_layer_loss

    (model, stack), _ = _stacks(world, tmp_path, monkeypatch)
    recipes, kept = counting_recipes(monkeypatch)
    w = torch.softmax(torch.tensor([0.3, -0.1], dtype=torch.float64, requires_grad=True), 0)
    loss = per_layer_loss(model, stack, w, two_set_batch(), None)
    fused = {n for n, f in stack.lowrank.parameters.items() if len(f.shape) == 3}
    assert fused <= {r.source.parametrization.name for r in recipes}
    assert not any(getattr(t, layer_merge.SOURCE_ATTRIBUTE, None) is not None for t in kept)
    loss.backward()  # the recipes merge again in the backward


def test_the_written_merge_loads_back_with_the_in_memory_logits(world, tmp_path, monkeypatch):
    """``mergeopt merge`` writes the fused weights merged from the factors; transformers reads them
    back to the merge the fit scores, which equals the dense rows' merge."""
    from mergeopt.errors import run_cli
    from mergeopt.export import merge as merge_cli

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_tree(_adapters_only(world), tmp_path / "run")))
    out = tmp_path / "merged"
    argv = [str(recipe_path), "--weights", "alpha=0.7,beta=0.3", "--out", str(out), "--quiet"]
    assert run_cli(merge_cli.main, argv) == 0
    written = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    for model, stack in _stacks(world, tmp_path, monkeypatch):
        with torch.no_grad():
            got = functional_call(model, stack.mix_params(w), (ids,)).logits
        torch.testing.assert_close(written(ids).logits, got, atol=1e-5, rtol=0)


def test_a_fit_of_lora_experts_of_the_fused_experts(world, tmp_path):
    """``mergeopt fit`` end to end on adapters of the fused experts alone: the gradient strategy
    runs through the factors' merge, and mixture.json says what stayed low-rank."""
    from tests.conftest import run_in_process

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_tree(_adapters_only(world), tmp_path / "run")))
    result = run_in_process("fit", str(recipe_path), "--quiet")
    assert result.returncode == 0, result.stderr
    mixture = json.loads((tmp_path / "run" / "mixture.json").read_text())
    assert mixture["stack"]["lowrank_parameters"] == len(world["wrapped"])
    assert mixture["stack"]["lowrank_modules"] == len(world["modules"]) and mixture["stack"]["tensors"] == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(world["base"])
    others = len(list(model.parameters())) - mixture["stack"]["lowrank_parameters"]
    assert mixture["stack"]["unchanged"] == others  # the adapted ones are merged, not unchanged
    assert sum(mixture["weights"].values()) == pytest.approx(1.0)


def _header_only_adapter(
    directory: Path, base: Path, tensors: dict[str, tuple[int, ...]], config: dict
) -> str:
    """A LoRA adapter whose safetensors file has these bfloat16 tensors' header and zero data, the
    data a sparse file (no disk): the plan reads headers alone."""
    directory.mkdir()
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(directory / "adapter_model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    (directory / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(base)})
    )
    return str(directory)


def test_qwen3_moe_with_four_lora_experts_of_its_experts_plans_on_one_gpu(tmp_path):
    """Qwen3-30B-A3B's shapes (its published config.json) with four rank-16 LoRA experts of every
    expert projection (PEFT's target_parameters) and of the attention: the stack is their factors,
    1.2 GiB each, where dense rows would be four copies of the experts (29.0B parameters each,
    216 GiB in bfloat16); the fit plans to fit one 80 GB GPU."""
    from mergeopt.memory import dry_run, plan, plan_table
    from tests.test_plan import EXCLUDED, EXPERTS_8B, GPU_80GB

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        (REPO / "tests" / "data" / "configs" / "qwen3-30b-a3b.json").read_text()
    )
    config = json.loads((base / "config.json").read_text())
    hidden, width, experts = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    heads, kv, head = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    r, layers = 16, config["num_hidden_layers"]
    tensors = {}
    for i in range(layers):
        prefix = f"base_model.model.model.layers.{i}"
        for module, (n_in, n_out) in {
            "q_proj": (hidden, heads * head),
            "k_proj": (hidden, kv * head),
            "v_proj": (hidden, kv * head),
            "o_proj": (heads * head, hidden),
        }.items():
            tensors[f"{prefix}.self_attn.{module}.lora_A.weight"] = (r, n_in)
            tensors[f"{prefix}.self_attn.{module}.lora_B.weight"] = (n_out, r)
        # gate_up_proj (experts, 2·width, hidden) inside, down_proj (experts, hidden, width) outside
        tensors[f"{prefix}.mlp.experts.base_layer.lora_A.weight"] = (r * experts, hidden)
        tensors[f"{prefix}.mlp.experts.base_layer.lora_B.weight"] = (2 * width, r * experts)
        tensors[f"{prefix}.mlp.experts.lora_A.weight"] = (r * experts, width)
        tensors[f"{prefix}.mlp.experts.lora_B.weight"] = (hidden, r * experts)
    lora = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    }
    paths = {e: _header_only_adapter(tmp_path / e, base, tensors, lora) for e in EXPERTS_8B}
    recipe = load_recipe(
        REPO / "recipes" / "moe.yaml",
        [f"model.base={base}", *(f"model.experts.{e}={p}" for e, p in paths.items()), "model.shard=none"],
    )
    inventory, dims = dry_run.read_inventory(recipe)
    p = plan.plan_memory(recipe, inventory, dims, GPU_80GB, 1)
    factors = sum(math.prod(shape) for shape in tensors.values())
    per_rank_column = 4 * r * (8 + 4) * (4 * layers + 2 * layers)  # each column's expert and scaling
    assert p.row("LoRA factors of") == 4 * 2 * factors + per_rank_column
    assert 4 * 2 * factors / 2**30 == pytest.approx(4.79, abs=0.01)  # 1.2 GiB per expert
    assert not [r.label for r in p.held if r.label.startswith(("stack anchor", "stack differences"))]
    fused = [n for n, shape in inventory.shapes.items() if len(shape) == 3]
    dense_rows = 4 * 2 * sum(math.prod(inventory.shapes[n]) for n in fused)  # anchor + 3 differences
    assert dense_rows / 2**30 == pytest.approx(216, abs=1)
    assert not any(x in n for n in fused for x in EXCLUDED)
    assert p.fits, plan_table.gib(p.peak)
    assert p.peak < 80 * 10**9


def _checkpointed_step(world: dict, tmp_path: Path, device: str) -> tuple[float, torch.Tensor]:
    """(loss, ∂L/∂z) of one checkpointed float32 step of the adapters alone on ``device``."""
    from mergeopt.config import recipe_from_dict
    from mergeopt.memory import checkpointing
    from mergeopt.objectives.loss import dev_loss

    tree = recipe_tree(_adapters_only(world), tmp_path)
    tree["device"] = device
    tree["model"]["compute_dtype"] = "float32"  # the CPU's: auto is bfloat16 on a GPU
    model, stack, _, _ = load_merge(recipe_from_dict(tree), progress=False)
    assert stack.lowrank.parameters
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    checkpointing.enable(model)
    z = torch.tensor([0.4, -0.3], dtype=torch.float64, device=device, requires_grad=True)
    loss = dev_loss(model, stack, z, two_set_batch().to(device), torch.tensor([1.0, 2.0]), 5)
    loss.backward()
    return float(loss.detach()), z.grad.cpu()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_low_rank_merge_on_cuda_equals_the_cpu(world, tmp_path):
    """The fused weights merged from the factors on a GPU (its grouped_mm and batched matmuls) give
    the CPU's loss and ∂L/∂z in float32, checkpointed. (The first GPU session ran this step at
    compute_dtype auto, bfloat16 on a GPU, and compared it with the CPU's float32: off by the
    bfloat16 rounding, as the CPU's own bfloat16 step is.)"""
    results = {device: _checkpointed_step(world, tmp_path / device, device) for device in ("cpu", "cuda")}
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-4)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_training_step_plan_of_fused_lora_bounds_the_live_bytes(tmp_path, checkpointed, compute):
    """``mergeopt plan``'s training step for LoRA experts of a Mixtral's fused experts (and
    attention), from headers, against the peak of live tensor bytes of dev_loss + backward on the
    same model: each layer's fused weights are formed from θ0 and the factors as the per-layer
    merge forms a dense stack's, so the plan counts them as merged weights. Measured 1.05x to 1.06x
    in float32 and bfloat16, but 1.16x for bfloat16 checkpointed, where the same adapters stacked as
    dense rows measure 1.18x: on this small model the step's peak is the forming of the largest
    fused weight (a float32 block beside its bfloat16 value), which the checkpointed plan counts
    beside a layer's backward. So the bound here is 1% below to 20% above."""
    from tests.test_plan import planned_and_live_step, small_fields

    vocab, batch, length = 100, 4, 60
    config = transformers.MixtralConfig(
        **small_fields(vocab, 256, 512),
        num_local_experts=8,
        num_experts_per_tok=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    save_checkpoint(model, tmp_path / "base")
    experts = {
        f"e{k}": moe_adapter(str(tmp_path / "base"), tmp_path / f"e{k}", k, ["gate_up_proj", "down_proj"])
        for k in range(4)
    }
    planned, peak, stack = planned_and_live_step(
        model, str(tmp_path / "base"), experts, compute, checkpointed, batch, length, vocab
    )
    assert stack.lowrank.parameters and not stack.deltas
    assert peak * 0.99 <= planned <= peak * 1.20, (planned, peak, planned / peak)


def _one_and_three_ranks(
    world: dict, tmp_path: Path, search: dict | None = None, mixed: bool = False
) -> tuple[dict, dict, Path]:
    """(mixture.json of one process, of model.shard=fsdp over 3 ranks, the recipe) for the adapters
    (``mixed``: and the dense expert)."""
    from tests.conftest import fit_one_and_sharded

    tree = recipe_tree(world if mixed else _adapters_only(world), tmp_path / "one")
    tree["optim"]["batch_size"] = 6  # 12 examples a micro-batch: 4 per rank
    if search:
        tree["search"] = search
    return fit_one_and_sharded(tree, tmp_path)


# the sharded fit runs 3 ranks per architecture (about 20 s each on 2 cores), so it takes one of
# each kind of what is sharded: Mixtral (its router adapted too; Qwen3-MoE and OLMoE shard the same
# fused pair), Qwen2-MoE (a gated shared expert), DeepSeek-V3 (latent attention, shared experts and
# a dense first layer, as GLM-4.5 has) and GPT-OSS (transposed, biased, gate and up interleaved)
SHARDED = ["deepseek_v3", "gpt_oss", "mixtral", "qwen2_moe"]


@pytest.mark.parametrize("world", SHARDED, indirect=True)
def test_a_sharded_fit_finds_the_mixture_one_process_finds(world, tmp_path):
    """model.shard=fsdp over 3 ranks (a fused weight's 4 experts in blocks of 2, 2 and 0): each
    rank keeps its block of θ0's experts and of the factors, merges it and the ranks gather the
    merged weight; the fit equals the single process's (for Mixtral a grid search too, whose
    candidates the ranks score together as one sharded model, and a fit beside a dense expert),
    and each rank's factors are its block, as the plan holds them."""
    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    one, many, path = _one_and_three_ranks(world, tmp_path / "gradient")
    assert one["stack"]["lowrank_parameters"] == many["stack"]["lowrank_parameters"] == len(world["wrapped"])
    assert many["stack"]["tensors"] == one["stack"]["tensors"] == 0
    # rank 0's stack (its blocks) is what the plan holds per rank of 3
    recipe = load_recipe(path, ["model.shard=fsdp"])
    inventory, dims = dry_run.read_inventory(recipe)
    p = plan.plan_memory(recipe, inventory, dims, DeviceMemory("cpu", "test", 2**40, 2**40), 3)
    assert p.row("LoRA factors of") == many["stack"]["bytes"]
    # rank 0 keeps 2 of the 4 experts (and a third of q_proj's factors, a router's A whole)
    assert many["stack"]["bytes"] < one["stack"]["bytes"] * 0.55
    if world["arch"] == "mixtral":
        _one_and_three_ranks(world, tmp_path / "grid", {"strategy": "grid", "grid": {"divisions": 4}})
        # beside a dense expert: each rank adds its block of the factors' update to its merged rows
        one, many, _ = _one_and_three_ranks(world, tmp_path / "mixed", mixed=True)
        assert many["stack"]["lowrank_parameters"] == len(world["wrapped"]) and many["stack"]["tensors"] > 0


def _random_factors(experts: int, first: int, last: int, rank: int, seed: int = 0):
    from mergeopt.merging.lowrank_parameters import ParameterFactors

    g = torch.Generator().manual_seed(seed)
    return ParameterFactors(
        torch.randn(experts, rank, last, generator=g),
        torch.randn(experts, first, rank, generator=g),
        torch.tensor([0, 0, 2, 2, 2][:rank]),
        torch.tensor([1.5, 1.5, 0.5, 0.5, 0.5][:rank]),
        (experts, first, last) if experts > 1 else (first, last),
    )


@pytest.mark.parametrize("stored", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("experts", [1, 3], ids=["matrix", "fused"])
def test_the_kernels_add_and_contract_the_factors_over_any_chunking(monkeypatch, stored, experts):
    """The dense merge's kernel with factors equals it without them plus Σ_j c_j b_j a_j, and its
    contraction gives autograd's ∂L/∂c of ⟨G, ΔW(c)⟩, for float32, bfloat16 and int8 stacks, with
    chunks small enough to cut an expert's rows in two; so do the factors-alone kernels."""
    from mergeopt.merging import layer_merge, lowrank_parameters
    from mergeopt.merging.int8_rows import quantize_rows
    from mergeopt.merging.layer_merge import contract, merge_value

    monkeypatch.setattr(layer_merge, "CHUNK", 40)  # a few rows of 8 columns per chunk, experts cut
    monkeypatch.setattr(lowrank_parameters, "CHUNK", 40)
    factors = _random_factors(experts, 5, 8, 5)
    shape = factors.shape
    g = torch.Generator().manual_seed(1)
    anchor = torch.randn(shape, generator=g)
    deltas = 0.1 * torch.randn((2, *shape), generator=g)
    scales = None
    if stored == "int8":
        deltas, scales = quantize_rows(deltas)
    else:
        deltas = deltas.to(getattr(torch, stored))
    rest = torch.tensor([0.3, 0.2])
    c = torch.tensor([0.7, -0.2, 0.4, 0.1, 0.9])
    with_factors = merge_value(rest, anchor, deltas, scales, torch.float32, factors, c)
    without = merge_value(rest, anchor, deltas, scales, torch.float32)
    torch.testing.assert_close(with_factors, without + factors.delta(c), atol=1e-5, rtol=1e-5)
    grad = torch.randn(shape, generator=g)
    want_rest, _ = contract(grad, deltas, scales, torch.float32)
    got_rest, got_c = contract(grad, deltas, scales, torch.float32, factors)
    variable = c.clone().requires_grad_(True)
    (grad * factors.delta(variable)).sum().backward()
    torch.testing.assert_close(got_rest, want_rest)
    torch.testing.assert_close(got_c, variable.grad, atol=1e-5, rtol=1e-5)
    # the factors alone (mergeopt.merging.lowrank_parameters), in blocks of experts
    alone = lowrank_parameters.merged_value(anchor, factors, c, torch.float32)
    torch.testing.assert_close(alone, anchor + factors.delta(c), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        lowrank_parameters.contract(grad, factors), variable.grad, atol=1e-5, rtol=1e-5
    )
