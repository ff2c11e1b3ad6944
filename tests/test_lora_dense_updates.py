"""What a LoRA adapter changes besides s·B·A on a linear layer: DoRA, embedding LoRA, modules_to_save,
trained biases and LoRA biases, each against PEFT's own ``merge_and_unload`` of the same adapter.

Reference: PEFT merges the adapter into the base; :meth:`LoraAdapter.expert_value` must give the
same tensor for every base parameter, and exactly the parameters PEFT changes must be the ones the
adapter declares (factors kept low-rank, or dense updates). End to end, a fit over adapters with
these features (low-rank where it can be, the rest stacked densely) must find what a fit over the
merged checkpoints finds, the merge at a one-hot must be that expert's model, and the dry-run plan
must count the dense rows the stack holds.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.loading.lora import read_adapter
from mergeopt.loading.lora_sizes import factor_sizes
from mergeopt.loading.problem import load_problem
from tests.conftest import EXPERTS, recipe_tree, save_checkpoint, tiny_config
from tests.test_layer_merge import tiny_model
from tests.test_lora_experts import _close, _fit

KINDS = {
    "dora": ("llama", dict(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora-rslora-patterns": (
        "llama",
        dict(use_dora=True, use_rslora=True, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    ),
    "modules_to_save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    # PEFT saves lm_head's own weight beside its factors: the factors stay low-rank over that copy
    "lm_head-lora": ("llama", dict(target_modules=["q_proj", "lm_head"])),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding-dora": ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_dora=True)),
    # Qwen2's q, k and v carry biases (Llama's linear layers have none)
    "bias-all": ("qwen2", dict(target_modules=["q_proj"], bias="all")),
    "bias-lora_only": ("qwen2", dict(target_modules=["q_proj", "k_proj"], bias="lora_only")),
    "lora_bias": ("qwen2", dict(target_modules=["q_proj", "v_proj"], lora_bias=True)),
    "trainable-tokens": ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    "trainable-tokens-tied": ("llama-tied", dict(target_modules=["v_proj"], trainable_token_indices=[4, 9])),
    # GPT-2's Conv1D weights are in × out: PEFT sets fan_in_fan_out and transposes B·A
    "fan_in_fan_out": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="all")),
    "fan_in_fan_out-dora": (
        "gpt2",
        dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True),
    ),
}


def _trained_adapter(base, path, seed: int, scale: float = 0.1, **lora):
    """``base`` with a PEFT adapter whose every trainable tensor is moved off its initial value (as
    training would: DoRA magnitudes, embedding factors, saved modules and biases too), saved to
    ``path``; returns PEFT's merge of it."""
    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    model.save_pretrained(path)
    return model.merge_and_unload()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_expert_values_equal_peft_merge_and_unload(kind, tmp_path):
    arch, lora = KINDS[kind]
    torch.manual_seed(0)
    if arch.startswith("llama"):
        base = LlamaForCausalLM(tiny_config(tie_word_embeddings=arch == "llama-tied")).eval()
    else:
        base = tiny_model(arch)
    merged = dict(_trained_adapter(base, tmp_path / "adapter", 1, **lora).named_parameters())
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    adapter = read_adapter(tmp_path / "adapter", shapes)
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, merged[n])}
    assert adapter.dense, "every kind here sets some parameter densely (or saves one)"
    assert set(adapter.factors) | set(adapter.dense) == changed
    copies = set(adapter.factors) & set(adapter.dense)  # a low-rank module's saved weight, nothing else
    assert all(adapter.dense[n].delta is None and adapter.dense[n].magnitude is None for n in copies)
    saved = {"lm_head-lora": {"lm_head.weight"}, "embedding": {"model.embed_tokens.weight"}}
    assert copies == saved.get(kind, set())
    for name, param in base.named_parameters():
        torch.testing.assert_close(
            adapter.expert_value(name, param.detach()), merged[name].detach(), atol=1e-6, rtol=1e-6
        )
    for name in copies:  # read twice (TIES reads each view more than once): the copy is not updated
        first = adapter.expert_value(name, dict(base.named_parameters())[name].detach())
        assert torch.equal(adapter.expert_value(name, dict(base.named_parameters())[name].detach()), first)
    # the plan's reading of the header agrees
    sizes = factor_sizes(tmp_path / "adapter", bool(lora.get("fan_in_fan_out")))
    assert set(sizes.dense) == set(adapter.dense) - copies and set(sizes.copies) == copies
    assert sizes.rank_sum == sum(f.rank for f in adapter.factors.values())
    assert sizes.numel == sum(f.a.numel() + f.b.numel() for f in adapter.factors.values())
    if kind.startswith("dora"):  # a DoRA module is not low-rank: it is stacked densely
        assert not any("q_proj" in n or "v_proj" in n for n in adapter.factors)


def test_a_saved_embedding_of_a_tied_base_is_read_as_peft_serves_it(tmp_path):
    """modules_to_save=[embed_tokens] on a base whose output layer shares the embedding's weight.
    Without ensure_weight_tying PEFT serves the adapter with the output layer at θ0 and its merge
    unties the two, which tied experts cannot hold: refused in one line that says how to train it
    (it was stacked into the shared weight, changing the output layer too: 0.037 nats on a real
    dev set). With it PEFT saves the output layer's copy as well and keeps them tied: read, every
    parameter equals PEFT's merge_and_unload."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    assert "lm_head.weight" not in shapes
    lora = dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    untied = _trained_adapter(base, tmp_path / "untied", 1, **lora)
    assert not untied.config.tie_word_embeddings  # PEFT's merge unties them
    with pytest.raises(
        UserError, match=r"saves model.embed_tokens whole \(modules_to_save\).*ensure_weight_tying=True"
    ):
        read_adapter(tmp_path / "untied", shapes, tied={"lm_head.weight"}, model=base)
    merged = _trained_adapter(base, tmp_path / "tied", 2, ensure_weight_tying=True, **lora)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # served and merged tied
    adapter = read_adapter(tmp_path / "tied", shapes, tied={"lm_head.weight"}, model=base)
    values = dict(merged.named_parameters())
    for name, param in base.named_parameters():
        torch.testing.assert_close(adapter.expert_value(name, param.detach()), values[name].detach())
    assert not torch.equal(values["model.embed_tokens.weight"], base.model.embed_tokens.weight)


def _widened(adapter: str | Path, path: Path, module: str) -> Path:
    """A copy of ``adapter`` at ``path`` as if trained on a wider model: ``module``'s A has 8 more columns."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, path)
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(
        {k: torch.cat([v, v[:, :8]], 1) if f"{module}.lora_A" in k else v for k, v in tensors.items()},
        path / "adapter_model.safetensors",
    )
    return path


def test_plan_and_fit_refuse_the_same_adapters_of_a_tied_base_and_fit_one_kept_tied(random_world, tmp_path):
    """On a base whose output layer shares the embedding's weight: an embedding or an output layer
    saved whole without ensure_weight_tying, and an adapter of a module the base lacks, are one
    line from `mergeopt plan` as from the fit (the plan used to read their sizes only and say
    "fits"), as is an adapter whose factors do not fit the base's shapes, and nothing is written.
    An embedding saved with ensure_weight_tying plans and fits, and its one-hot merge is PEFT's
    merge_and_unload of it."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import run_in_process

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    save_checkpoint(base, tmp_path / "base")

    def adapter(name: str, seed: int, **lora):
        merged = _trained_adapter(base, tmp_path / name, seed, scale=0.02, **lora)
        config_file = tmp_path / name / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(tmp_path / "base")
        config_file.write_text(json.dumps(config))
        return str(tmp_path / name), merged

    kept_tied, peft_merged = adapter(
        "tied", 1, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True
    )
    plain, _ = adapter("plain", 2, target_modules=["q_proj", "v_proj"])
    untied, _ = adapter("untied", 3, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    head, _ = adapter("head", 4, target_modules=["v_proj"], modules_to_save=["lm_head"])
    missing = tmp_path / "missing"  # the plain adapter, its q_proj renamed to a fused qkv_proj
    shutil.copytree(plain, missing)
    tensors = load_file(missing / "adapter_model.safetensors")
    save_file(
        {k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()},
        missing / "adapter_model.safetensors",
    )
    wide = _widened(plain, tmp_path / "wide", "q_proj")  # as if trained on a wider model
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["model"]["base"] = str(tmp_path / "base")
    recipe = tmp_path / "recipe.yaml"
    width = tiny_config().hidden_size
    refusals = {
        str(wide): f"model.layers.0.self_attn.q_proj has lora_A [4, {width + 8}] and lora_B [{width}, 4], "
        f"but the base's model.layers.0.self_attn.q_proj.weight is [{width}, {width}]",
        untied: "saves model.embed_tokens whole (modules_to_save), whose weight the base ties to its output layer",
        head: "saves lm_head whole (modules_to_save), whose weight the base ties to its input embedding",
        str(missing): "adapts model.layers.0.self_attn.qkv_proj, but the base has no parameter",
    }
    for bad, message in refusals.items():
        tree["model"]["experts"] = {"alpha": kept_tied, "beta": bad}
        recipe.write_text(yaml.safe_dump(tree))
        for command, flag in (("plan", "--json"), ("fit", "--quiet")):
            result = run_in_process(command, str(recipe), flag)
            said = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(said) == 1 and f"{bad}: {message}" in said[0], result.stderr
        assert not (tmp_path / "out").exists()
    tree["model"]["experts"] = {"alpha": kept_tied, "beta": plain}
    recipe.write_text(yaml.safe_dump(tree))
    for command, flag in (("plan", "--json"), ("fit", "--quiet")):
        result = run_in_process(command, str(recipe), flag)
        assert result.returncode == 0, result.stderr
    problem = load_problem(recipe_from_dict(tree), progress=False)
    tokens = torch.randint(4, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), problem.stack.at(torch.tensor([1.0, 0.0])) as merged:
        torch.testing.assert_close(
            merged(input_ids=tokens).logits, peft_merged(input_ids=tokens).logits, atol=1e-5, rtol=1e-5
        )


def test_plan_and_fit_refuse_the_same_conv1d_adapter_of_a_wider_model(random_world, tmp_path):
    """GPT-2's Conv1D weights are in × out and its adapters set fan_in_fan_out: the plan checked
    the factors' shapes of linear modules only, and said "fits" to a Conv1D adapter of a wider model
    that the fit refuses. Both refuse it in the same line; the adapter as trained plans and fits."""
    from tests.conftest import run_in_process

    torch.manual_seed(0)
    base = tiny_model("gpt2").eval()
    save_checkpoint(base, tmp_path / "base")
    lora = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    experts = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        _trained_adapter(base, tmp_path / name, seed, scale=0.02, **lora)
        experts[name] = str(tmp_path / name)
    wide = _widened(experts["beta"], tmp_path / "wide", "c_attn")  # as if trained on a wider model
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["model"]["base"] = str(tmp_path / "base")
    tree["data"]["max_length"] = base.config.n_positions
    recipe = tmp_path / "recipe.yaml"
    width = base.config.n_embd
    tree["model"]["experts"] = {"alpha": experts["alpha"], "beta": str(wide)}
    recipe.write_text(yaml.safe_dump(tree))
    message = (
        f"{wide}: transformer.h.0.attn.c_attn has lora_A [4, {width + 8}] and lora_B [{3 * width}, 4], "
        f"but the base's transformer.h.0.attn.c_attn.weight is [{width}, {3 * width}]"
    )
    _plan_and_fit_refuse(recipe, message)
    assert not (tmp_path / "out").exists()
    tree["model"]["experts"] = experts
    recipe.write_text(yaml.safe_dump(tree))
    for command, flag in (("plan", "--json"), ("fit", "--quiet")):
        result = run_in_process(command, str(recipe), flag)
        assert result.returncode == 0, result.stderr


def _plan_and_fit_refuse(recipe: Path, message: str) -> None:
    """``mergeopt plan`` and ``mergeopt fit`` of ``recipe`` each refuse it in one line holding ``message``."""
    from tests.conftest import run_in_process

    for command, flag in (("plan", "--json"), ("fit", "--quiet")):
        result = run_in_process(command, str(recipe), flag)
        said = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(said) == 1 and message in said[0], result.stderr


def test_an_adapter_for_a_resized_vocabulary_is_refused(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    _trained_adapter(base, tmp_path / "adapter", 1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    shapes["lm_head.weight"] = (shapes["lm_head.weight"][0] - 2, shapes["lm_head.weight"][1])
    with pytest.raises(
        UserError, match=r"lm_head.weight is \[\d+, 32\] but the base's lm_head.weight.*resized"
    ):
        read_adapter(tmp_path / "adapter", shapes)


def test_plan_and_fit_refuse_the_same_adapter_of_a_resized_vocabulary(random_world, tmp_path):
    """modules_to_save=[lm_head] trained over a base resized to two new tokens, stacked over the
    base as it was: the fit refuses the saved head's shape, and the plan, which compared the
    factors' shapes only, said "fits". Both refuse it in the same line."""

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    save_checkpoint(base, tmp_path / "base")
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(base.config.vocab_size + 2, mean_resizing=False)
    experts = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        _trained_adapter(
            resized, tmp_path / name, seed, target_modules=["q_proj"], modules_to_save=["lm_head"]
        )
        experts[name] = str(tmp_path / name)
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["model"]["base"] = str(tmp_path / "base")
    tree["model"]["experts"] = experts
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    rows, width = base.config.vocab_size, base.config.hidden_size
    message = (
        f"{experts['alpha']}: base_model.model.lm_head.weight is [{rows + 2}, {width}] but the base's "
        f"lm_head.weight is [{rows}, {width}] (an adapter trained with a resized vocabulary"
    )
    _plan_and_fit_refuse(recipe, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([3, 5, 999], "lists token 999, beyond the base's 54 rows"),
        ([3, 5], r"trainable tokens are \[3, 32\], but trainable_token_indices lists 2 token"),
        ({"lm_head": [3, 5, 7]}, "gives no list of token ids for model.embed_tokens"),
    ],
)
def test_trainable_token_indices_that_do_not_fit_are_named(tmp_path, indices, message):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    _trained_adapter(
        base, tmp_path / "adapter", 1, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]
    )
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "trainable_token_indices": indices}))
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    with pytest.raises(UserError, match=message):
        read_adapter(tmp_path / "adapter", shapes)


def test_a_magnitude_without_factors_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    _trained_adapter(base, tmp_path / "adapter", 1, target_modules=["q_proj"], use_dora=True)
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if "layers.1" not in k or "magnitude" in k}, file)
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    with pytest.raises(UserError, match="lora_magnitude_vector of model.layers.1.self_attn.q_proj without"):
        read_adapter(tmp_path / "adapter", shapes)


# ----------------------------------------------------------------------------- end to end

# one adapter per expert, each with a different mix of features over plain LoRA
WORLD_KINDS = {
    "alpha": dict(target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"]),
    "beta": dict(target_modules=["embed_tokens", "q_proj", "down_proj"]),
    "gamma": dict(target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def updates_world(random_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dense_updates")
    base = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.float32).eval()
    adapters, dense = {}, {}
    for i, name in enumerate(EXPERTS):
        merged = _trained_adapter(base, root / f"{name}-adapter", 300 + i, scale=0.02, **WORLD_KINDS[name])
        config_file = root / f"{name}-adapter" / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = random_world["base"]
        config_file.write_text(json.dumps(config))
        adapters[name] = str(root / f"{name}-adapter")
        dense[name] = str(save_checkpoint(merged, root / f"{name}-dense"))
    return {"world": random_world, "adapters": adapters, "dense": dense}


def _recipe(world, experts, out):
    tree = recipe_tree(world["world"], out)
    tree["model"]["experts"] = experts
    return recipe_from_dict(tree)


def test_fit_over_adapters_with_dense_updates_finds_the_merged_fit(updates_world, tmp_path):
    low = _fit(updates_world, updates_world["adapters"], tmp_path / "low")
    full = _fit(updates_world, updates_world["dense"], tmp_path / "dense")
    _close(low, full, 1e-4)
    # dense rows: the lm_head copies; low-rank: q (alpha's DoRA, beta and gamma), v (alpha's DoRA,
    # mergeopt.merging.dora), down (beta) and up (gamma) in two layers, and beta's embedding (its
    # saved weight is θ0)
    assert low["stack"]["tensors"] == 1 and low["stack"]["lowrank_modules"] == 4 * 2 + 1


def test_ties_densifies_adapters_with_dense_updates(updates_world, tmp_path):
    merge = {"method": "ties", "density": 0.5, "scale": 2.0}
    _close(
        _fit(updates_world, updates_world["adapters"], tmp_path / "low", merge=merge),
        _fit(updates_world, updates_world["dense"], tmp_path / "dense", merge=merge),
        1e-4,
    )


def test_one_hot_merge_is_the_expert_peft_merges(updates_world, tmp_path):
    problem = load_problem(_recipe(updates_world, updates_world["adapters"], tmp_path / "o"), progress=False)
    tokens = torch.randint(4, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    for i, name in enumerate(EXPERTS):
        expert = AutoModelForCausalLM.from_pretrained(
            updates_world["dense"][name], dtype=torch.float32
        ).eval()
        with torch.no_grad(), problem.stack.at(torch.eye(len(EXPERTS))[i]) as merged:
            torch.testing.assert_close(
                merged(input_ids=tokens).logits, expert(input_ids=tokens).logits, atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("exclude", [[], ["embed_tokens"]], ids=["all", "no-embedding"])
def test_dry_run_counts_the_dense_rows(updates_world, tmp_path, exclude):
    """The plan's rows are the stack's bytes: dense rows, and LoRA factors (the embedding's too,
    unless ``model.exclude`` leaves it out of the merge)."""
    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    tree = recipe_tree(updates_world["world"], tmp_path / "out")
    tree["model"].update(experts=updates_world["adapters"], exclude=exclude)
    recipe = recipe_from_dict(tree)
    inventory, dims = dry_run.read_inventory(recipe)
    p = plan.plan_memory(recipe, inventory, dims, DeviceMemory("cpu", "test", 2**40, 2**40))
    stack = load_problem(recipe, progress=False).stack
    assert p.row("LoRA factors of") == stack.lowrank.nbytes()
    assert ("model.embed_tokens" in stack.lowrank.modules) == (not exclude)
    assert p.row("stack anchor") + p.row("stack differences") == stack.nbytes() - stack.lowrank.nbytes()
    assert p.stacked_parameters == stack.num_stacked_parameters() > 0
    assert p.adapters_only and p.excluded_tensors == len(exclude)  # model.embed_tokens.weight, or none
    assert any("stacked as dense rows" in note for note in inventory.notes)
    # alpha's DoRA q and v in both layers: factors and row gains, no dense rows
    dora = {f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"}
    assert {m for m, f in stack.lowrank.modules.items() if f.gain is not None} == dora
    assert any("DoRA updates of 4 linear weight(s) stay low-rank" in note for note in inventory.notes)
    # sharded, DoRA stays low-rank too: its factors in blocks of rows, its gains whole on each rank
    tree["model"]["shard"] = "fsdp"
    sharded = plan.plan_memory(
        recipe_from_dict(tree), inventory, dims, DeviceMemory("cpu", "test", 2**40, 2**40), world_size=2
    )
    assert sharded.stacked_parameters == p.stacked_parameters
    gains = sum(
        f.gain.numel() * 4 + f.gain_owner.numel() * 8
        for f in stack.lowrank.modules.values()
        if f.gain is not None
    )
    assert gains < sharded.row("LoRA factors of") < p.row("LoRA factors of")


def test_untrained_dora_adapter_is_refused_as_the_base(updates_world, tmp_path):
    """DoRA starts at B = 0 and m = ‖W0‖ per row: the expert is θ0, though its magnitudes are saved."""
    base = AutoModelForCausalLM.from_pretrained(updates_world["world"]["base"], dtype=torch.float32).eval()
    untrained = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    untrained.save_pretrained(tmp_path / "untrained")
    experts = dict(updates_world["adapters"], gamma=str(tmp_path / "untrained"))
    with pytest.raises(UserError, match="expert 'gamma' equals the base model"):
        load_problem(_recipe(updates_world, experts, tmp_path / "out"), progress=False)


def test_adapters_differing_only_in_a_saved_module_are_not_identical(updates_world, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    twin = tmp_path / "twin"
    shutil.copytree(updates_world["adapters"]["gamma"], twin)
    experts = dict(updates_world["adapters"], beta=str(twin))
    with pytest.raises(UserError, match="experts 'beta' and 'gamma' are identical"):
        load_problem(_recipe(updates_world, experts, tmp_path / "out"), progress=False)
    file = twin / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] * 1.01
    save_file(tensors, file)
    load_problem(_recipe(updates_world, experts, tmp_path / "out"), progress=False)  # not refused


@pytest.mark.parametrize("w", [[1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
def test_gpt2_adapters_merge_as_their_peft_merges(tmp_path, w):
    """Conv1D LoRA (fan_in_fan_out, plain and DoRA) stacked densely: the merge at w equals the merge
    of PEFT's merged experts, at a one-hot too (GPT-2 is the architecture whose weights are in × out)."""
    from torch.func import functional_call

    from mergeopt.merging.mixed_experts import build_expert_stack
    from mergeopt.merging.stacking import build_stack

    base = tiny_model("gpt2")
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    kinds = [
        dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True),
        dict(target_modules=["c_fc"], fan_in_fan_out=True, bias="all"),
    ]
    adapters, dense = {}, {}
    for i, kind in enumerate(kinds):
        merged = _trained_adapter(base, tmp_path / f"e{i}", 40 + i, scale=0.05, **kind)
        adapters[f"e{i}"] = read_adapter(tmp_path / f"e{i}", shapes)
        dense[f"e{i}"] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    tokens = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    weights = torch.tensor(w)
    logits = []
    for model, build in (
        (copy.deepcopy(base), lambda m: build_expert_stack(m, list(adapters), {}, adapters, progress=False)),
        (copy.deepcopy(base), lambda m: build_stack(m, dense, progress=False)),
    ):
        stack = build(model)
        params = stack.mix_params(weights)
        logits.append(functional_call(model, params, args=(), kwargs={"input_ids": tokens}).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(logits[1], base(input_ids=tokens).logits, atol=1e-3)  # the experts moved it


def test_merge_as_adapter_saves_dense_updates_whole(updates_world, tmp_path):
    """DoRA and saved lm_heads change parameters no LoRA factor can carry: --as-adapter writes those
    modules whole (``modules_to_save``: the merged DoRA q and v with the other experts' low-rank
    update folded in, the merged lm_head), the rest as factors; PEFT loads it with the logits of
    the merge fit scores, and mergeopt reads it back."""
    from peft import PeftModel

    from tests.test_lora_experts import merge_as_adapter

    result, tree = merge_as_adapter(
        updates_world["world"], tmp_path, updates_world["adapters"], "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    dora = [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]
    assert config["modules_to_save"] == sorted([*dora, "lm_head"])
    assert "model.embed_tokens" in config["target_modules"] and not set(dora) & set(config["target_modules"])
    base = AutoModelForCausalLM.from_pretrained(updates_world["world"]["base"], dtype=torch.float32).eval()
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    problem = load_problem(recipe_from_dict(tree), progress=False)
    tokens = torch.randint(4, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), problem.stack.at(torch.tensor([0.5, 0.3, 0.2])) as merged:
        want = merged(input_ids=tokens).logits
        torch.testing.assert_close(loaded(input_ids=tokens).logits, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(want, base(input_ids=tokens).logits, atol=1e-3)
    again = read_adapter(out, shapes)
    assert set(again.dense) == {f"{m}.weight" for m in config["modules_to_save"]}


@pytest.mark.parametrize(
    ("tied", "lora", "message"),
    [
        (
            True,
            dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]),
            "model.embed_tokens, whose weight lm_head",
        ),
        (False, dict(target_modules=["q_proj"], use_dora=True), "nothing of the merge stays low-rank"),
    ],
    ids=["tied-embedding-saved-whole", "all-dense"],
)
def test_merge_as_adapter_refuses_what_peft_cannot_load_as_merged(tmp_path, tied, lora, message):
    """A module saved whole whose weight another shares (PEFT would copy one of the two) and a merge
    with no factor left are refused in one line."""
    from mergeopt.export.adapter import adapter_tensors
    from mergeopt.merging.mixed_experts import build_expert_stack

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(tie_word_embeddings=tied)).eval()
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    adapters = {}
    for i, name in enumerate(EXPERTS):
        _trained_adapter(base, tmp_path / name, 50 + i, **lora)
        adapters[name] = read_adapter(tmp_path / name, shapes)
    stack = build_expert_stack(copy.deepcopy(base), list(EXPERTS), {}, adapters, progress=False)
    with pytest.raises(UserError, match=message):
        adapter_tensors(stack, torch.tensor([0.2, 0.3, 0.5]), torch.float32)


def test_an_adapter_saved_after_resizing_the_vocabulary_is_read_as_peft_serves_it(tmp_path):
    """A token added and the embeddings resized in the training process (TRL's chat-token set-up),
    modules_to_save=[embed_tokens, lm_head]: PEFT's save_embedding_layers then saves each wrapper
    whole, its trained copy X.weight beside X.modules_to_save.weight (the same tensor) and
    X.original_module.weight (the resized base's), and loads X.weight alone. Read over the resized
    base, the adapter is PEFT's merge, by fit and by the plan; the two extra copies were refused."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    base.resize_token_embeddings(base.config.vocab_size + 2, mean_resizing=False)
    lora = dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    merged = dict(_trained_adapter(base, tmp_path / "adapter", 1, **lora).named_parameters())
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        assert any(".original_module." in key for key in handle.keys())  # noqa: SIM118
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    adapter = read_adapter(tmp_path / "adapter", shapes)
    assert set(adapter.dense) == {"model.embed_tokens.weight", "lm_head.weight"}
    for name, param in base.named_parameters():
        torch.testing.assert_close(adapter.expert_value(name, param.detach()), merged[name].detach())
    sizes = factor_sizes(tmp_path / "adapter", False)
    assert set(sizes.dense) | set(sizes.copies) == set(adapter.dense)


def test_the_base_saved_after_adding_tokens_is_the_base_of_an_adapter_trained_over_it(tmp_path):
    """TRL's chat-token set-up: the base loaded from ``base``, tokens added, the embeddings resized,
    a LoRA trained with modules_to_save. PEFT records ``base`` as its base, but only the resized
    model (saved by the user as ``resized``) holds its embeddings: that model.base was refused as
    'not a copy' of ``base``, and ``base`` for the shapes, so no base was accepted. The resized
    base is now taken for the named one (the same tensors and sampled rows, more vocabulary rows);
    one whose other weights differ, or that lost rows, is not."""
    from mergeopt.loading.adapter_base import check_adapter_base, is_resized_copy

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    base.resize_token_embeddings(base.config.vocab_size + 2, mean_resizing=False)
    base.config.pad_token_id = base.config.vocab_size - 1  # a pad token added, as TRL does
    base.save_pretrained(tmp_path / "resized")
    lora = dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    merged = _trained_adapter(base, tmp_path / "adapter", 1, **lora)
    named = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(named) == tmp_path / "base"
    check_adapter_base(named, tmp_path / "adapter", tmp_path / "resized", "alpha")
    assert not is_resized_copy(tmp_path / "resized", tmp_path / "base")  # rows lost, not added
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # a fine-tune of the resized model
    base.save_pretrained(tmp_path / "tuned")
    with pytest.raises(UserError, match="not a copy of it"):
        check_adapter_base(named, tmp_path / "adapter", tmp_path / "tuned", "alpha")
    # fitted over the resized base: the expert at one-hot weights is PEFT's merge
    resized = AutoModelForCausalLM.from_pretrained(tmp_path / "resized").eval()
    shapes = {n: tuple(p.shape) for n, p in resized.named_parameters()}
    adapter = read_adapter(tmp_path / "adapter", shapes)
    for name, param in resized.named_parameters():
        torch.testing.assert_close(
            adapter.expert_value(name, param.detach()), dict(merged.named_parameters())[name].detach()
        )


def test_a_hub_base_resized_and_saved_by_another_transformers_is_its_resized_copy(tmp_path):
    """A base from the hub carries the config.json an older transformers wrote (its version,
    ``torch_dtype``, ``rope_theta``); the user's transformers loads it, resizes and saves the resized
    base with its own version and key names. The resized base was refused as 'not a copy' for the
    version string alone, so an adapter trained over any hub base with added tokens had no base."""
    from mergeopt.loading.adapter_base import is_resized_copy

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["transformers_version"] = "4.44.0"  # as the hub's file has it
    config["torch_dtype"] = config.pop("dtype", "float32")
    config.pop("rope_parameters", None)
    config["rope_theta"] = 10000.0
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    base.resize_token_embeddings(base.config.vocab_size + 2, mean_resizing=False)
    base.save_pretrained(tmp_path / "resized")
    assert is_resized_copy(tmp_path / "base", tmp_path / "resized")
    # a setting both files have that differs is still another model
    config["rms_norm_eps"] = 1e-3
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    assert not is_resized_copy(tmp_path / "base", tmp_path / "resized")


def test_a_config_without_a_vocabulary_size_is_no_resized_copy(tmp_path):
    """``vocab_size: null`` (or a multimodal config keeping it in ``text_config``) ended in a
    TypeError traceback; such a base is not taken for a resized copy, and the refusal names it."""
    from mergeopt.loading.adapter_base import is_resized_copy

    for name, rows in (("named", None), ("base", 70)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"vocab_size": rows}))
    assert not is_resized_copy(tmp_path / "named", tmp_path / "base")


def test_a_resized_copy_is_told_by_the_files_transformers_loads(tmp_path):
    """Mistral's hub repositories ship consolidated.safetensors (their own format, other tensor
    names) beside the transformers weights. Every ``*.safetensors`` was read as the model's, so the
    base resized from such a repository (saved without it) was refused as 'not a copy'; the named
    base's files are its index's shards, else model.safetensors, as transformers loads them. The
    resized base saved in shards is read through its index too."""
    from safetensors.torch import save_file

    from mergeopt.loading.adapter_base import is_resized_copy

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    native = {"tok_embeddings.weight": base.model.embed_tokens.weight.detach().clone()}
    save_file(native, str(tmp_path / "base" / "consolidated.safetensors"))
    base.resize_token_embeddings(base.config.vocab_size + 2, mean_resizing=False)
    base.save_pretrained(tmp_path / "resized")
    base.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert is_resized_copy(tmp_path / "base", tmp_path / "resized")
    assert is_resized_copy(tmp_path / "base", tmp_path / "sharded")


def test_a_resized_copy_opens_each_weight_file_once_per_comparison(tmp_path, monkeypatch):
    """is_resized_copy opened both files for every tensor, each open parsing the whole header
    again: 13 s for 8 shards of 1,000 tensors, minutes per expert for a mixture-of-experts base of
    tens of thousands. Each file is now opened once for its header and once for its rows."""
    import safetensors

    from mergeopt.loading.adapter_base import is_resized_copy

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    base.resize_token_embeddings(base.config.vocab_size + 2, mean_resizing=False)
    base.save_pretrained(tmp_path / "resized")
    opened, safe_open = [], safetensors.safe_open

    def counted(path, *args, **kwargs):
        opened.append(path)
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counted)
    assert is_resized_copy(tmp_path / "base", tmp_path / "resized")
    assert len(opened) == 4, opened  # two files, each for its header and for its rows
