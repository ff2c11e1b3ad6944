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
from tests.conftest import recipe_tree, save_checkpoint, write_jsonl
from tests.test_conversions import MOE, SHARED, VOCAB

ARCHITECTURES = {
    **{arch: MOE[arch] for arch in ("mixtral", "qwen3_moe")},
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
    "gpt_oss": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
}


def _model(arch: str, seed: int) -> torch.nn.Module:
    config_name, model_name, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**SHARED, **extra)).eval()


def _adapter(base: str, directory: Path, seed: int, targets: list[str]) -> str:
    """A LoRA of the attention's q_proj and of ``targets``, random (init_lora_weights=False), saved
    by PEFT."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    config = peft.LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["q_proj"],
        target_parameters=targets,
        init_lora_weights=False,
    )
    peft.get_peft_model(model, config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def world(request, tmp_path_factory) -> dict:
    """A tiny random base, two LoRA experts of its fused experts (and attention), a dense expert,
    and two dev sets."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    base = _model(arch, 0)
    save_checkpoint(base, root / "base")
    dense = _model(arch, 0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    experts = {
        "alpha": _adapter(str(root / "base"), root / "alpha", 10, TARGETS[arch]),
        "beta": _adapter(str(root / "base"), root / "beta", 11, TARGETS[arch]),
        "gamma": str(save_checkpoint(dense, root / "gamma")),
    }
    samplers, rng = toy.domain_samplers(0), random.Random(0)
    dev = {
        d: str(write_jsonl(root / f"{d}.jsonl", [samplers[d](rng) for _ in range(12)]))
        for d in ("arith", "markov")
    }
    return {"arch": arch, "root": root, "base": str(root / "base"), "experts": experts, "dev": dev}


def _recipe(world: dict, tmp_path: Path, **merge):
    tree = recipe_tree(world, tmp_path / "run")
    tree.setdefault("merge", {}).update(merge)
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
    resolved = wrapped_parameters(config, _model(world["arch"], 0))
    assert set(resolved) == set(wrappers)
    assert len(resolved) == 2 * (3 if world["arch"] == "mixtral" else 2)
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
    base = _model("mixtral", 0)
    for targets in (["gate_up_proj"], ["down_proj"], ["down_proj", "gate_up_proj"], ["experts.gate_up_proj"]):
        served = peft.get_peft_model(
            _model("mixtral", 0), peft.LoraConfig(r=2, target_parameters=targets, target_modules=[])
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
    base = _model(arch, 0)
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
    for sizes in inventory.adapters.values():
        assert set(sizes.dense) == set(stack.anchor)
        assert all(m.endswith("q_proj") for m in sizes.modules)
    # an adapter of gate_proj without up_proj cannot be fused: PEFT refuses, in one line here
    half = {k: v for k, v in list(V4_MODULES[arch].items())[:1]}
    lone = _v4_adapter(tmp_path / "half", arch, 3, half)
    with pytest.raises(UserError, match="cannot convert") as caught:
        open_experts(world["base"], {"alpha": lone, "beta": experts["beta"]})
    assert "\n" not in str(caught.value)


def test_target_parameters_naming_nothing_is_one_line(tmp_path):
    base = _model("mixtral", 0)
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


def test_the_plan_counts_them_as_dense_rows(world, tmp_path):
    """The memory plan (from headers): the adapted fused weights and routers are dense rows, as the
    fit stacks them, and only q_proj stays low-rank; with the adapters alone, the plan's dense
    parameters are exactly the fit's stacked ones."""
    from mergeopt.memory.dry_run import read_inventory

    adapters = {n: p for n, p in world["experts"].items() if n != "gamma"}
    recipe = _recipe({**world, "experts": adapters}, tmp_path)
    inventory, _ = read_inventory(recipe)
    _, stack, _, _ = load_merge(recipe, progress=False)
    for sizes in inventory.adapters.values():
        assert set(sizes.dense) == set(stack.anchor)
        assert all(m.endswith("q_proj") for m in sizes.modules)
    assert all(n.endswith(("gate_up_proj", "down_proj", "gate.weight")) for n in stack.anchor)
    assert len(stack.anchor) == len(TARGETS[world["arch"]]) * SHARED["num_hidden_layers"]


def test_merge_as_adapter_saves_the_fused_experts_whole(world, tmp_path):
    """``mergeopt merge --as-adapter`` of adapters of the fused experts: no LoRA factor can carry
    the merged update of a fused weight, so its module goes in whole (``modules_to_save``), the
    attention as factors; PEFT loads it with the logits of the merge the fit scores."""
    from mergeopt.config import recipe_from_dict
    from mergeopt.loading.problem import load_problem
    from tests.test_lora_experts import merge_as_adapter

    experts = {n: p for n, p in world["experts"].items() if n != "gamma"}
    experts["gamma"] = _adapter(world["base"], tmp_path / "gamma", 12, TARGETS[world["arch"]])
    result, tree = merge_as_adapter(world, tmp_path, experts, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    layers = range(SHARED["num_hidden_layers"])
    whole = {f"model.layers.{i}.mlp.experts" for i in layers}
    if world["arch"] == "mixtral":
        whole |= {f"model.layers.{i}.mlp.gate" for i in layers}
    assert set(config["modules_to_save"]) == whole
    assert set(config["target_modules"]) == {f"model.layers.{i}.self_attn.q_proj" for i in layers}
    base = transformers.AutoModelForCausalLM.from_pretrained(world["base"]).eval()
    loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    problem = load_problem(recipe_from_dict(tree), progress=False)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), problem.stack.at(torch.tensor([0.5, 0.3, 0.2])) as merged:
        want = merged(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
