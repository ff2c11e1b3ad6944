"""Mixture-of-experts checkpoints, stored one tensor per expert, read under the model's fused names.

transformers 5 holds Mixtral's, Qwen2-MoE's, Qwen3-MoE's, OLMoE's and GLM-4.5's expert weights fused,
(experts, out, in) per projection, and converts the checkpoints' per-expert tensors as it loads
them; ``save_pretrained`` writes them back per expert. The truth here is transformers itself:
every tensor mergeopt reads from an expert checkpoint equals that parameter of ``from_pretrained``
of the same directory, exactly; a fit's merge at one-hot weights gives each expert's own logits; a
written merge loads back with the in-memory merge's logits; and the memory plan counts the
model's tensors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open
from torch.func import functional_call

from mergeopt.config import load_recipe
from mergeopt.loading.checkpoints import open_checkpoint, open_experts
from mergeopt.loading.conversions import plan_conversions
from mergeopt.loading.problem import load_merge
from mergeopt.worlds import resolve_recipe, toy
from tests.conftest import TINY_SHAPES, recipe_tree, save_checkpoint, write_jsonl

VOCAB = TINY_SHAPES["vocab_size"]
SHARED = {**TINY_SHAPES, "intermediate_size": 48}
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8, norm_topk_prob=True),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40
        ),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    # DeepSeek-V3's kind: a dense first layer, a float32 router with a score-correction buffer,
    # shared experts
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_replace=1),
    ),
}
# what each architecture's checkpoints store per expert, and the fused parameter it becomes
STORED = {
    "mixtral": (
        "model.layers.0.block_sparse_moe.experts.3.w1.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
    ),
    "qwen3_moe": ("model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"),
    "qwen2_moe": ("model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"),
    "olmoe": ("model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"),
    "glm4_moe": ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.gate_up_proj"),
}


def _model(arch: str, seed: int) -> torch.nn.Module:
    config_name, model_name, extra = MOE[arch]
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**SHARED, **extra)).eval()


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_world(request, tmp_path_factory) -> dict:
    """A random tiny mixture-of-experts base and three experts (every parameter perturbed), saved by
    save_pretrained, and two dev sets."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = _model(arch, 0)
    save_checkpoint(base, root / "base")
    experts = {}
    for i, name in enumerate(("alpha", "beta", "gamma")):
        expert = _model(arch, 0)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        experts[name] = str(save_checkpoint(expert, root / name))
    return {"arch": arch, "root": root, "base": str(root / "base"), "experts": experts, "dev": dev_sets(root)}


def dev_sets(root: Path, examples: int = 12) -> dict[str, str]:
    """The toy world's arith and markov dev sets, seeded, written under ``root``."""
    samplers, rng = toy.domain_samplers(0), random.Random(0)
    return {
        d: str(write_jsonl(root / f"{d}.jsonl", [samplers[d](rng) for _ in range(examples)]))
        for d in ("arith", "markov")
    }


def _held(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` holds: its parameters and persistent buffers (GLM-4.5's
    routers keep a score-correction bias, set by its load balancing, not by gradient)."""
    return {n: t.detach() for n, t in model.state_dict().items()}


def _stored_names(directory: str) -> set[str]:
    with safe_open(str(Path(directory) / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_each_expert_is_read_as_from_pretrained_holds_it(moe_world):
    """The checkpoints store one tensor per expert (so the conversion is exercised); open_experts
    presents the model's names and shapes, and every tensor read, whole or as a block of rows,
    equals from_pretrained's parameter exactly."""
    stored, fused = STORED[moe_world["arch"]]
    assert stored in _stored_names(moe_world["base"]) and fused not in _stored_names(moe_world["base"])
    base, dense, _ = open_experts(moe_world["base"], moe_world["experts"])
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_world["experts"]["beta"]).eval()
    params = _held(model)
    expert = dense["beta"]
    assert set(expert.tensors) == set(params) == set(base.tensors)
    for name, parameter in params.items():
        assert expert.tensors[name].shape == tuple(parameter.shape), name
        assert torch.equal(expert.read(name), parameter), name
    reads = []
    stored_read = expert._stored.read
    expert._stored.read = lambda n, device="cpu": reads.append(n) or stored_read(n, device)
    block = expert.read_rows(fused, 1, 3)  # experts 1 and 2 of the fused weight
    assert torch.equal(block, params[fused].detach()[1:3])
    # a sharded stack's block reads those experts' tensors alone (gate and up of each)
    assert len(reads) == 4 and all(".experts.1." in n or ".experts.2." in n for n in reads), reads


def test_a_dense_architecture_is_read_as_stored(random_world):
    """A Llama checkpoint needs no conversion: the checkpoint object itself is used."""
    base = open_checkpoint(random_world["base"])
    model = transformers.AutoModelForCausalLM.from_pretrained(random_world["base"])
    assert plan_conversions(model, base.tensors) == {}
    opened, _, _ = open_experts(random_world["base"], random_world["experts"])
    assert opened._conversions is None and set(opened.tensors) == set(base.tensors)


def _recipe(world: dict, tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_tree(world, tmp_path / "run")))
    recipe, _ = resolve_recipe(load_recipe(path), lambda _m: None)
    return recipe


def test_one_hot_weights_give_each_expert_its_own_logits(moe_world, tmp_path):
    """The fit's model (each layer merging as it runs, fused expert weights included) at a one-hot
    mixture against from_pretrained of that expert."""
    model, stack, _, _ = load_merge(_recipe(moe_world, tmp_path), progress=False)
    assert any(a.dim() == 3 for a in stack.anchor.values()), "the fused expert weights are stacked"
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    for i, name in enumerate(stack.expert_names):
        expert = transformers.AutoModelForCausalLM.from_pretrained(moe_world["experts"][name]).eval()
        with torch.no_grad():
            want = expert(ids).logits
            got = functional_call(
                model, stack.mix_params(torch.eye(len(stack.expert_names))[i]), (ids,)
            ).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_written_merge_loads_back_with_the_in_memory_logits(moe_world, tmp_path):
    """`mergeopt merge` of a mixture-of-experts model: transformers writes the fused weights per
    expert again and reads them back to the merge the fit scores."""
    from mergeopt.errors import run_cli
    from mergeopt.export import merge as merge_cli

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_tree(moe_world, tmp_path / "run")))
    out = tmp_path / "merged"
    assert (
        run_cli(
            merge_cli.main,
            [str(recipe_path), "--weights", "alpha=0.2,beta=0.5,gamma=0.3", "--out", str(out), "--quiet"],
        )
        == 0
    )
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    model, stack, _, _ = load_merge(_recipe(moe_world, tmp_path), progress=False)
    w = torch.tensor(
        [{"alpha": 0.2, "beta": 0.5, "gamma": 0.3}[n] for n in stack.expert_names], dtype=torch.float64
    )
    written = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            written(ids).logits, functional_call(model, stack.mix_params(w), (ids,)).logits, atol=1e-5, rtol=0
        )


def test_the_plan_counts_the_model_tensors(moe_world, tmp_path):
    """`mergeopt plan` describes the fused parameters the fit stacks, not the stored per-expert ones."""
    from mergeopt.memory.dry_run import read_inventory

    inventory, dims = read_inventory(_recipe(moe_world, tmp_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_world["base"])
    assert inventory.shapes == {n: tuple(p.shape) for n, p in _held(model).items()}
    assert dims.model_type == moe_world["arch"]


def test_a_checkpoint_short_of_an_expert_is_one_line(moe_world, tmp_path):
    """An expert checkpoint missing one expert's tensor: named in one line before any weight is read."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    source = Path(moe_world["experts"]["alpha"])
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(source / "model.safetensors"))
    stored, _ = STORED[moe_world["arch"]]
    del state[stored]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    from mergeopt.errors import UserError

    with pytest.raises(UserError, match=f"tensor {stored} is missing from the expert"):
        open_experts(moe_world["base"], {**moe_world["experts"], "alpha": str(broken)})
    assert json.loads((broken / "config.json").read_text())["model_type"] == moe_world["arch"]


def test_lora_experts_on_the_attention_of_a_mixture_of_experts(moe_world, tmp_path):
    """PEFT LoRA adapters on the attention of a mixture-of-experts base, beside a dense expert:
    each one-hot mixture gives PEFT's own model's logits (the adapter) or the expert's. LoRA on the
    fused experts and routers (PEFT's target_parameters): tests/test_lora_parameters.py."""
    import peft

    adapters = {}
    for i, name in enumerate(("alpha", "beta")):
        torch.manual_seed(10 + i)
        model = transformers.AutoModelForCausalLM.from_pretrained(moe_world["base"]).eval()
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        peft.get_peft_model(model, config).save_pretrained(tmp_path / name)
        adapters[name] = str(tmp_path / name)
    world = {**moe_world, "experts": {**adapters, "gamma": moe_world["experts"]["gamma"]}}
    model, stack, _, _ = load_merge(_recipe(world, tmp_path), progress=False)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    for i, name in enumerate(stack.expert_names):
        reference = transformers.AutoModelForCausalLM.from_pretrained(moe_world["base"]).eval()
        if name in adapters:
            reference = peft.PeftModel.from_pretrained(reference, adapters[name]).eval()
        else:
            reference = transformers.AutoModelForCausalLM.from_pretrained(world["experts"][name]).eval()
        with torch.no_grad():
            want = reference(ids).logits
            got = functional_call(model, stack.mix_params(torch.eye(3)[i]), (ids,)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)


def test_an_expert_saved_fused_beside_a_base_saved_per_expert(moe_world, tmp_path):
    """An expert written as the model holds it (its fused state dict, as a training loop's own
    save may write it) beside checkpoints stored one tensor per expert: compared and read under
    the model's names, its one-hot mixture gives its own logits."""
    from safetensors.torch import save_file

    source = Path(moe_world["experts"]["gamma"])
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (fused_dir / f.name).write_bytes(f.read_bytes())
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    state = {n: t.contiguous() for n, t in _held(model).items()}
    save_file(state, str(fused_dir / "model.safetensors"), metadata={"format": "pt"})
    _, fused = STORED[moe_world["arch"]]
    assert fused in _stored_names(str(fused_dir))
    world = {**moe_world, "experts": {**moe_world["experts"], "gamma": str(fused_dir)}}
    from mergeopt.memory.dry_run import read_inventory

    inventory, _ = read_inventory(_recipe(world, tmp_path))  # `mergeopt plan` compares it so too
    assert fused in inventory.shapes
    merged, stack, _, _ = load_merge(_recipe(world, tmp_path), progress=False)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    i = stack.expert_names.index("gamma")
    with torch.no_grad():
        got = functional_call(merged, stack.mix_params(torch.eye(3)[i]), (ids,)).logits
        torch.testing.assert_close(got, model(ids).logits, atol=1e-5, rtol=0)


def test_a_conversion_that_cannot_be_formed_is_one_line(moe_world):
    """Expert tensors transformers cannot join (one expert's stored with another shape than its
    header promised the base's): a one-line error naming the fused parameter, not a traceback."""
    from mergeopt.errors import UserError
    from mergeopt.loading.conversions import Conversion

    stored, fused = STORED[moe_world["arch"]]
    _, dense, _ = open_experts(moe_world["base"], moe_world["experts"])
    conversion = dense["alpha"]._conversions[fused]
    shapes = {n: dense["alpha"]._stored.tensors[n].shape for n, _ in conversion.sources}

    def read(name):  # the first expert's tensor a row short
        value = torch.zeros(shapes[name])
        return value[:-1] if name == conversion.sources[0][0] else value

    broken = Conversion(conversion.converter, conversion.sources, conversion.first_target)
    with pytest.raises(UserError, match=f"cannot form {fused}"):
        broken.convert(read)
