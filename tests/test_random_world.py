"""The random:// world: configs read from disk, seeded bases and lazy experts at task-vector scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergeopt.errors import UserError
from mergeopt.worlds.random_world import (
    RandomExpert,
    base_parameter,
    build_base,
    config_shapes,
    is_random,
    random_experts,
    read_config,
)

CONFIGS = Path(__file__).parent / "data" / "configs"

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def write_config(directory: Path, fields: dict, name: str = "config.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(fields))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    return read_config(f"random://{write_config(tmp_path / 'tiny', TINY_LLAMA).parent}")


def relative_norm(tau: torch.Tensor, base: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tau) / torch.linalg.vector_norm(base.float()))


def test_scheme_is_recognised():
    """is_random accepts random:// paths and rejects other worlds' and plain paths."""
    assert is_random("random://tests/data/configs/llama-3.1-8b.json")
    assert not is_random("tiny://base")
    assert not is_random("tests/data/configs/llama-3.1-8b.json")


def test_llama_8b_shapes_count_its_published_parameters():
    """config_shapes of the shipped Llama-3.1-8B config sum to the published 8,030,261,248 parameters."""
    config = read_config(f"random://{CONFIGS / 'llama-3.1-8b.json'}")
    shapes = config_shapes(config)
    assert sum(math.prod(shape) for shape in shapes.values()) == 8_030_261_248
    assert shapes["model.embed_tokens.weight"] == (128256, 4096)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)


def test_smollm2_shapes_count_tied_embeddings_once():
    """config_shapes of the shipped SmolLM2-135M config (tied) sum to its 134,515,008 parameters, lm_head not counted."""
    shapes = config_shapes(read_config(f"random://{CONFIGS / 'smollm2-135m.json'}"))
    assert sum(math.prod(shape) for shape in shapes.values()) == 134_515_008
    assert "lm_head.weight" not in shapes


def test_relative_path_resolves_against_current_directory(tmp_path, monkeypatch):
    """A relative random:// path to a directory reads the same config as the absolute file path."""
    write_config(tmp_path / "cfg", TINY_LLAMA)
    monkeypatch.chdir(tmp_path)
    relative = read_config("random://cfg")
    absolute = read_config(f"random://{tmp_path / 'cfg' / 'config.json'}")
    assert relative.to_dict() == absolute.to_dict()
    assert relative.hidden_size == 32


@pytest.mark.parametrize(
    "contents",
    [
        None,
        "{not json",
        json.dumps({"hidden_size": 32}),
        json.dumps({**TINY_LLAMA, "model_type": "no-such-arch"}),
    ],
    ids=["missing", "bad-json", "no-model-type", "unknown-model-type"],
)
def test_bad_config_paths_raise_user_error_naming_the_path(tmp_path, contents):
    """Each bad config gives a one-line UserError whose message contains the random:// path given."""
    path = tmp_path / "bad" / "config.json"
    if contents is not None:
        path.parent.mkdir()
        path.write_text(contents)
    given = f"random://{path}"
    with pytest.raises(UserError) as raised:
        read_config(given)
    assert given in str(raised.value)
    assert "\n" not in str(raised.value)


def test_model_without_causal_lm_raises_user_error(tmp_path):
    """A config transformers knows but has no causal LM for (t5) is refused with a UserError naming the path."""
    path = write_config(tmp_path, {"model_type": "t5"})
    with pytest.raises(UserError, match="causal language model") as raised:
        read_config(f"random://{path}")
    assert str(path) in str(raised.value)


def test_same_seed_same_base_and_different_seed_different(tiny_config):
    """Two tiny bases with seed 0 are bit-identical parameter by parameter; seed 1 differs in every matrix."""
    first, again, other = (build_base(tiny_config, "cpu", torch.float32, seed) for seed in (0, 0, 1))
    assert not first.training
    for (name, a), b, c in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        if a.dim() == 2:
            assert not torch.equal(a, c), name
    weight = first.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert abs(float(weight.detach().std()) - 0.02) < 0.003
    assert torch.equal(first.get_parameter("model.norm.weight"), torch.ones(32))


def test_base_parameter_regenerates_build_base(tiny_config):
    """base_parameter(name) equals, bit for bit, what build_base put in the model (bfloat16 too)."""
    model = build_base(tiny_config, "cpu", torch.bfloat16, seed=3)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.bfloat16
        again = base_parameter(tiny_config, name, parameter.shape, "cpu", torch.bfloat16, seed=3)
        assert torch.equal(again, parameter), name


def test_tied_embeddings_stay_tied(tmp_path):
    """With tie_word_embeddings the built model's output embedding is the input embedding tensor."""
    config = read_config(f"random://{write_config(tmp_path, {**TINY_LLAMA, 'tie_word_embeddings': True})}")
    model = build_base(config, "cpu", torch.float32, seed=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert float(model.get_input_embeddings().weight.detach().std()) > 0.01
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_untied_embeddings_differ(tiny_config):
    """Without tying, lm_head and the input embedding are separate, differently drawn tensors."""
    model = build_base(tiny_config, "cpu", torch.float32, seed=0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)


@pytest.fixture
def fixed_base():
    generator = torch.Generator().manual_seed(0)
    values = {
        "w": torch.randn(64, 64, generator=generator) * 0.02,
        "wide": torch.randn(16, 200, generator=generator) * 0.02,
        "norm": torch.ones(64),
        "bias": torch.zeros(64),
        "experts": torch.randn(4, 48, 32, generator=generator) * 0.02,  # a fused MoE weight
    }
    return values


def test_expert_is_deterministic_per_seed_and_index(fixed_base):
    """Experts with equal (seed, index) give identical tensors; another index or seed gives different ones."""
    names = list(fixed_base)
    expert = RandomExpert(fixed_base.__getitem__, names, expert_index=0, seed=7)
    same = RandomExpert(fixed_base.__getitem__, names, expert_index=0, seed=7)
    other_index = RandomExpert(fixed_base.__getitem__, names, expert_index=1, seed=7)
    other_seed = RandomExpert(fixed_base.__getitem__, names, expert_index=0, seed=8)
    for name in names:
        assert expert[name].dtype == torch.float32
        assert torch.equal(expert[name], same[name]), name
        assert not torch.equal(expert[name], other_index[name]), name
        assert not torch.equal(expert[name], other_seed[name]), name
    assert expert["w"] is not expert["w"]


def test_expert_perturbation_has_task_vector_scale(fixed_base):
    """‖θ_i − θ0‖_F / ‖θ0‖_F is within [0.5e-3, 2e-3] for 3-, 2- and 1-D tensors (a zero bias gets RMS 1e-3)."""
    expert = RandomExpert(fixed_base.__getitem__, list(fixed_base), expert_index=2, seed=0)
    for name in ("w", "wide", "norm", "experts"):
        tau = expert[name] - fixed_base[name]
        assert 0.5e-3 <= relative_norm(tau, fixed_base[name]) <= 2e-3, name
        assert torch.allclose(tau, expert.task_vector(name), atol=1e-7), name
    bias_rms = float(expert["bias"].pow(2).mean().sqrt())
    assert 0.5e-3 <= bias_rms <= 2e-3


def test_expert_perturbation_has_a_visible_low_rank_part(fixed_base):
    """The top-8 singular values of a 64x64 weight's perturbation carry more than 40% of its energy,
    and of each expert's matrix of a fused mixture-of-experts weight more than 65%."""
    expert = RandomExpert(fixed_base.__getitem__, list(fixed_base), expert_index=0, seed=0, rank=8)
    singular = torch.linalg.svdvals((expert["w"] - fixed_base["w"]).double())
    energy = singular.pow(2)
    assert float(energy[:8].sum() / energy.sum()) > 0.4
    # a fused (experts, out, in) weight: each expert's 48 x 32 matrix has its own rank-8 part
    # (measured 0.68 to 0.73; a rank-8 draw over the flattened experts leaves each 0.54 to 0.57)
    per_expert = torch.linalg.svdvals((expert["experts"] - fixed_base["experts"]).double()).pow(2)
    assert per_expert.shape == (4, 32)
    assert bool((per_expert[:, :8].sum(1) / per_expert.sum(1) > 0.65).all())


def test_expert_mapping_interface(fixed_base):
    """The expert iterates the names it was given, in order, and raises KeyError for any other name."""
    calls = []

    def base_value(name):
        calls.append(name)
        return fixed_base[name]

    expert = RandomExpert(base_value, ["w", "norm"], expert_index=0, seed=0)
    assert list(expert) == ["w", "norm"] and len(expert) == 2
    assert "w" in expert and "bias" not in expert and not calls
    with pytest.raises(KeyError):
        expert["bias"]
    assert expert["norm"].shape == (64,) and calls == ["norm"]


def test_random_experts_regenerate_the_base_after_it_is_overwritten(tiny_config):
    """random_experts' θ0 is the seeded base even after the model's weights are zeroed: θ_i − θ0 stays tiny."""
    model = build_base(tiny_config, "cpu", torch.float32, seed=5)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    experts = random_experts(model, tiny_config, ["code", "math"], seed=5, device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    assert list(experts) == ["code", "math"]
    assert experts["code"].expert_index == 0 and experts["math"].expert_index == 1
    name = "model.layers.1.self_attn.q_proj.weight"
    assert list(experts["code"]) == list(original)
    for expert in experts.values():
        assert 0.5e-3 <= relative_norm(expert[name] - original[name], original[name]) <= 2e-3
    assert not torch.equal(experts["code"][name], experts["math"][name])


# -- the recipe's side: fit and dry run without any checkpoint ------------------------------------


def _random_recipe(tmp_path: Path, **optim):
    from mergeopt.config import recipe_from_dict

    path = "random://" + str(write_config(tmp_path, TINY_LLAMA))
    tree = {
        "device": "cpu",
        "output_dir": str(tmp_path / "run"),
        "model": {"base": path, "experts": {n: path for n in ("a", "b", "c")}, "stack_dtype": "int8"},
        "data": {
            "dev": [{"name": "x", "path": "random://x"}, {"name": "y", "path": "random://y"}],
            "max_length": 16,
        },
        "optim": {"steps": 4, "batch_size": 2, "eval_every": 2, "eval_batch_size": 8, **optim},
    }
    return recipe_from_dict(tree)


def test_fit_on_a_random_world_runs_end_to_end_and_is_repeatable(tmp_path):
    """A random:// base and experts: the stack is built from seeds, dev sets are seeded tokens, the
    fit writes its run; the same recipe gives the same mixture.json."""
    from mergeopt.fit import fit
    from mergeopt.loading.problem import load_problem

    recipe = _random_recipe(tmp_path, activation_checkpointing=True)
    problem = load_problem(recipe, progress=False)
    assert problem.stack.scales and problem.loss_chunk == recipe.optim.loss_chunk_tokens
    assert [len(s.fit) + len(s.heldout) for s in problem.sets] == [64, 64]
    first = fit(recipe, progress=False, log=lambda _m: None)
    again = fit(
        recipe.model_copy(update={"output_dir": str(tmp_path / "again")}), progress=False, log=lambda _m: None
    )
    assert first["weights"] == again["weights"] and first["dev_loss"] == again["dev_loss"]
    assert (tmp_path / "run" / "mixture.json").is_file()


def test_dry_run_of_a_random_world_reads_the_config_only(tmp_path):
    from mergeopt.memory import dry_run

    recipe = _random_recipe(tmp_path)
    text = dry_run.dry_run(recipe, "random.yaml")
    shapes = config_shapes(read_config(recipe.model.base))
    assert f"parameters: {sum(math.prod(s) for s in shapes.values()):,}" in text
    assert "random weights" in text and "2 x int8 with per-row scales" in text


def test_a_random_base_with_a_checkpoint_expert_is_refused(tmp_path):
    from mergeopt.loading.problem import load_problem

    recipe = _random_recipe(tmp_path)
    experts = {**recipe.model.experts, "c": str(tmp_path)}
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"experts": experts})})
    with pytest.raises(UserError, match="expert 'c': a random:// base takes random:// experts"):
        load_problem(recipe, progress=False)


def _random_tree(tmp_path: Path) -> dict:
    path = "random://" + str(write_config(tmp_path, TINY_LLAMA))
    return {
        "device": "cpu",
        "output_dir": str(tmp_path / "run"),
        "model": {"base": path, "experts": {n: path for n in ("a", "b", "c")}},
        "data": {
            "dev": [{"name": "x", "path": "random://x"}, {"name": "y", "path": "random://y"}],
            "max_length": 16,
        },
        "optim": {"steps": 2, "batch_size": 2, "eval_batch_size": 8},
    }


def _with_text_dev_set(tree: dict, tmp_path: Path) -> list[str]:
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    tree["data"]["dev"][0]["path"] = str(tmp_path / "x.jsonl")
    return ["fit"]


def _with_exact_match(tree: dict, tmp_path: Path) -> list[str]:
    tree["objective"] = {"terms": [{"kind": "exact_match", "dev": "x"}]}
    tree["search"] = {"strategy": "grid", "grid": {"divisions": 2}}
    return ["fit"]


def _merged(tree: dict, tmp_path: Path) -> list[str]:
    return ["merge", "--weights", "a=0.5,b=0.5,c=0", "--out", str(tmp_path / "merged")]


def _expert_of_another_shape(tree: dict, tmp_path: Path) -> list[str]:
    (tmp_path / "wide").mkdir()
    wide = write_config(tmp_path / "wide", {**TINY_LLAMA, "hidden_size": 64})
    tree["model"]["experts"]["c"] = "random://" + str(wide)
    return ["fit"]


def _architecture_unknown(tree: dict, tmp_path: Path) -> list[str]:
    (tmp_path / "odd").mkdir()
    odd = write_config(tmp_path / "odd", {**TINY_LLAMA, "architectures": ["LlamaForTelepathy"]})
    tree["model"]["base"] = "random://" + str(odd)
    tree["model"]["experts"] = {n: "random://" + str(odd) for n in ("a", "b", "c")}
    return ["fit"]


def _not_a_causal_lm(tree: dict, tmp_path: Path) -> list[str]:
    (tmp_path / "vit").mkdir()
    vit = write_config(tmp_path / "vit", {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2})
    tree["model"]["base"] = "random://" + str(vit)
    tree["model"]["experts"] = {n: "random://" + str(vit) for n in ("a", "b", "c")}
    return ["fit"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_with_text_dev_set, r"dev set 'x': a random:// base takes random:// dev sets, not .*x.jsonl"),
        (_with_exact_match, r"a random:// world has no text: its objective can only be dev losses"),
        (_merged, r"a random:// world has no tokenizer or checkpoint to write: merge real experts"),
        (
            _expert_of_another_shape,
            r"expert 'c': random://.*wide/config.json is not the architecture of the base",
        ),
        (_architecture_unknown, r"architecture 'LlamaForTelepathy' is not a transformers class"),
        (_not_a_causal_lm, r"transformers has no causal language model for model_type 'vit'"),
    ],
)
def test_what_a_random_world_cannot_do_is_one_line_exit_2(change, message, tmp_path, capsys):
    """A random:// world has seeded weights and token ids, nothing else: text dev sets, generated
    answers and a merged checkpoint are refused in one line, with nothing written; so are experts
    of another architecture and configs transformers cannot build a causal LM from."""
    import re

    import yaml

    from mergeopt.cli import main

    tree = _random_tree(tmp_path)
    verb, *extra = change(tree, tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    assert main([verb, str(tmp_path / "recipe.yaml"), *extra, "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


def test_a_random_worlds_fit_exports_data_configs_but_not_a_mergekit_merge(tmp_path, capsys):
    """Its mixture is a mixture like any other: a training framework's config is written; mergekit's
    needs checkpoints on disk, so that export is refused in one line, with nothing written."""
    import yaml

    from mergeopt.cli import main

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_random_tree(tmp_path)))
    assert main(["fit", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    run = str(tmp_path / "run")
    assert main(["export", run, "--to", "llamafactory", "--out", str(tmp_path / "llamafactory")]) == 0
    capsys.readouterr()
    assert main(["export", run, "--to", "mergekit", "--out", str(tmp_path / "mergekit.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mergekit merges checkpoints on disk" in lines[0] and "random://" in lines[0]
    assert not (tmp_path / "mergekit.yaml").exists()
