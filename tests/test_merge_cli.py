"""mergeopt.export.merge: the checkpoint it writes, loaded back by transformers, against the in-memory merge.

The truth for every written checkpoint is fit's own merge of the same recipe: the logits of
``functional_call(model, stack.mix_params(w))`` (each layer merging as it runs), compared with those of
``AutoModelForCausalLM.from_pretrained(DIR)`` on one batch of token ids (linear, TIES, DARE with
mixup, sharded). A linear merge is also checked tensor by tensor against Σ w_i θ_i read straight from
the experts, one-hot weights against the expert's own logits, and a tiny-world fit's mixture.json
against the dev losses that fit recorded for it. Each user mistake is one line, exit code 2, and
leaves nothing on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt.config import MergeSection, load_recipe
from mergeopt.errors import UserError, run_cli
from mergeopt.export import merge as merge_cli
from mergeopt.export.fitted_mixture import check_same_merge
from mergeopt.fit import fit
from mergeopt.loading.checkpoints import open_checkpoint
from mergeopt.loading.problem import load_merge
from mergeopt.merging.stack import describe
from mergeopt.run_files import read_finished_mixture
from mergeopt.worlds import resolve_recipe
from tests.conftest import EXPERTS, recipe_tree, run_in_process, run_module, save_checkpoint

REPO = Path(__file__).parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
WEIGHTS = {"alpha": 0.2, "beta": 0.5, "gamma": 0.3}
MERGES = {
    "linear": {},
    "ties": {"method": "ties", "density": 0.5, "scale": 1.5},
    "dare_linear+mixup": {"method": "dare_linear", "density": 0.6, "mixup_alpha": 2.0},
}


def write_recipe(tmp_path: Path, world: dict, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_tree(world, tmp_path / "run", **sections)))
    return path


def as_arg(weights: dict) -> str:
    return ",".join(f"{n}={w!r}" for n, w in weights.items())


def merge(*args: str) -> int:
    """The command line in this process (a subprocess costs seconds of imports per call)."""
    return run_cli(merge_cli.main, [*args, "--quiet"])


def token_batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab_size, (3, 17), generator=torch.Generator().manual_seed(seed))


def in_memory_logits(recipe_path: Path, weights: dict, ids: torch.Tensor, overrides=()) -> torch.Tensor:
    """fit's merge: the model whose layers merge as they run, with w handed to functional_call."""
    recipe, _ = resolve_recipe(load_recipe(recipe_path, overrides), lambda _m: None)
    model, stack, _, _ = load_merge(recipe, progress=False)
    w = torch.tensor([weights[n] for n in stack.expert_names], dtype=torch.float64)
    with torch.no_grad():
        return functional_call(model, stack.mix_params(w), (ids,)).logits


def written_logits(path: Path | str, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def manifest(out: Path) -> dict:
    return json.loads((out / merge_cli.MANIFEST).read_text())


# ----------------------------------------------------------------------------- the written model


@pytest.mark.parametrize("method", sorted(MERGES))
def test_written_checkpoint_gives_the_in_memory_logits(method, random_world, tmp_path):
    recipe = write_recipe(tmp_path, random_world, merge=MERGES[method])
    out = tmp_path / "merged"
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(out)) == 0
    ids = token_batch(54)
    expected = in_memory_logits(recipe, WEIGHTS, ids)
    torch.testing.assert_close(written_logits(out, ids), expected, rtol=0, atol=1e-6)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", merge_cli.MANIFEST} <= names
    assert not any(n.endswith(".bin") for n in names)
    info = manifest(out)
    assert info["weights"] == WEIGHTS and info["dtype"] == "float32"
    assert info["method"] == json.loads(json.dumps(describe(load_recipe(recipe).merge, 3, 0)))
    assert info["recipe"] == str(recipe) and info["mergeopt_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging left


def test_the_manifest_names_its_sources_absolutely(random_world, tmp_path, monkeypatch):
    """Run from the recipe's directory with relative paths, the manifest still says where the merge
    came from once the checkpoint is copied elsewhere: recipe, base and experts as absolute paths."""
    tree = recipe_tree(random_world, tmp_path / "run")
    root = Path(random_world["base"]).parent
    tree["model"]["base"] = os.path.relpath(random_world["base"], tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(tmp_path)
    assert merge("recipe.yaml", "--weights", as_arg(WEIGHTS), "--out", "merged") == 0
    info = manifest(tmp_path / "merged")
    assert info["recipe"] == str(tmp_path / "recipe.yaml") and info["mixture"] is None
    assert info["base"] == str(root / "base")
    assert info["experts"] == {n: str(p) for n, p in random_world["experts"].items()}


def test_linear_checkpoint_is_the_weighted_sum_of_the_experts(random_world, tmp_path):
    out = tmp_path / "merged"
    assert (
        merge(str(write_recipe(tmp_path, random_world)), "--weights", as_arg(WEIGHTS), "--out", str(out)) == 0
    )
    written = load_file(out / "model.safetensors")
    experts = {n: load_file(Path(random_world["experts"][n]) / "model.safetensors") for n in EXPERTS}
    assert set(written) == set(experts["alpha"])
    for name, tensor in written.items():
        expected = sum(WEIGHTS[n] * experts[n][name].double() for n in EXPERTS)
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)


def test_one_hot_weights_write_the_expert(random_world, tmp_path):
    recipe = write_recipe(tmp_path, random_world)
    ids = token_batch(54, seed=1)
    for k, name in enumerate(EXPERTS):
        out = tmp_path / name
        one_hot = {n: float(n == name) for n in EXPERTS}
        assert merge(str(recipe), "--weights", as_arg(one_hot), "--out", str(out)) == 0
        mine, theirs = written_logits(out, ids), written_logits(random_world["experts"][name], ids)
        if k == 0:  # the anchor θ_1 itself: bit for bit
            assert torch.equal(mine, theirs)
        else:  # θ_1 + (θ_k − θ_1) rounds once in float32
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_mixture_from_a_fit_run(random_world, tmp_path):
    recipe = write_recipe(tmp_path, random_world, merge=MERGES["ties"])
    fitted = fit(load_recipe(recipe), progress=False, log=lambda _m: None)
    out = tmp_path / "merged"
    assert merge(str(recipe), "--mixture", str(tmp_path / "run" / "mixture.json"), "--out", str(out)) == 0
    assert manifest(out)["weights"] == fitted["weights"]
    assert manifest(out)["mixture"] == str(tmp_path / "run" / "mixture.json")
    ids = token_batch(54, seed=2)
    expected = in_memory_logits(recipe, fitted["weights"], ids)
    torch.testing.assert_close(written_logits(out, ids), expected, rtol=0, atol=1e-6)


def test_tiny_world_checkpoint_scores_what_fit_scored(tiny_world, tmp_path):
    """The real CLI on the real world: the written merge has the dev losses fit recorded for it."""
    from mergeopt.objectives.data import evaluation_batches
    from mergeopt.objectives.loss import per_set_loss_sums
    from mergeopt.objectives.term_scores import load_dev_sets

    overrides = [f"output_dir={tmp_path / 'run'}", f"world.cache_dir={tiny_world.parent}", "optim.steps=20"]
    recipe = load_recipe(TINY, overrides)
    mixture = fit(recipe, progress=False, log=lambda _m: None)
    out = tmp_path / "merged"
    result = run_in_process(
        "merge", str(TINY), *overrides, "--mixture", str(tmp_path / "run" / "mixture.json"), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert manifest(out)["weights"] == mixture["weights"]
    ids = token_batch(54, seed=3)
    expected = in_memory_logits(TINY, mixture["weights"], ids, overrides)
    torch.testing.assert_close(written_logits(out, ids), expected, rtol=0, atol=1e-6)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    resolved = resolve_recipe(recipe, lambda _m: None)[0]
    sets = load_dev_sets(resolved.data, resolved.seed, tokenizer)
    sums, counts = torch.zeros(len(sets), dtype=torch.float64), torch.zeros(len(sets), dtype=torch.float64)
    with torch.no_grad():
        for batch in evaluation_batches(sets, "all", 128, tokenizer.pad_token_id):
            s, c = per_set_loss_sums(model, dict(model.named_parameters()), batch, len(sets))
            sums, counts = sums + s, counts + c
    for s, loss in zip(sets, (sums / counts).tolist()):
        assert loss == pytest.approx(mixture["per_set_dev_loss"]["fitted"][s.name], rel=1e-5), s.name


def test_sharded_checkpoint_loads_back(random_world, tmp_path):
    recipe = write_recipe(tmp_path, random_world)
    out = tmp_path / "merged"
    assert (
        merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(out), "--max-shard-size", "20KB") == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    ids = token_batch(54, seed=4)
    torch.testing.assert_close(
        written_logits(out, ids), in_memory_logits(recipe, WEIGHTS, ids), rtol=0, atol=1e-6
    )
    # mergeopt itself reads the sharded checkpoint: it can be the base or an expert of a later recipe
    assert set(open_checkpoint(out).tensors) == set(index["weight_map"])


@pytest.mark.parametrize("size", ["20KiB", "20kib", "20480"])
def test_shard_sizes_in_binary_units_are_bytes(size, random_world, tmp_path):
    """--max-shard-size 20KiB is 20480 bytes. Handed to transformers as written, huggingface_hub
    (KB to TB only) stopped the command with a traceback after the whole merge."""
    recipe = write_recipe(tmp_path, random_world)
    out = tmp_path / "merged"
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(out), "--max-shard-size", size) == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and merge_cli._shard_size(size) == 20480
    # each shard holds at most 20480 bytes of tensors, unless one tensor alone is larger
    for shard in shards:
        tensors = load_file(shard).values()
        assert sum(t.numel() * t.element_size() for t in tensors) <= 20480 or len(tensors) == 1


def test_shard_size_units_read_as_huggingface_hub_reads_them():
    assert merge_cli._shard_size("5GB") == merge_cli._shard_size("5gb") == 5 * 10**9
    assert merge_cli._shard_size("200MB") == 200 * 10**6 and merge_cli._shard_size("3GiB") == 3 * 2**30


def test_dtype_option_and_default(random_world, tmp_path):
    recipe = write_recipe(tmp_path, random_world)
    full, half = tmp_path / "full", tmp_path / "half"
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(full)) == 0
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(half), "--dtype", "bfloat16") == 0
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    full_t, half_t = load_file(full / "model.safetensors"), load_file(half / "model.safetensors")
    for name, tensor in half_t.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, full_t[name].to(torch.bfloat16)), name
    # with no --dtype, the base's own dtype: a bfloat16 base gives a bfloat16 merge
    base = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.bfloat16)
    tree = recipe_tree(random_world, tmp_path / "run")
    tree["model"]["base"] = str(save_checkpoint(base, tmp_path / "bf16_base"))
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump(tree))
    out = tmp_path / "default"
    assert merge(str(tmp_path / "bf16.yaml"), "--weights", as_arg(WEIGHTS), "--out", str(out)) == 0
    assert manifest(out)["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_a_narrower_default_dtype_than_fit_scored_is_said(random_world, tmp_path, capsys):
    """A bfloat16 base's merge is written in bfloat16 by default, but fit scored it in float32: the
    written model's logits are not the scored ones, and one warning line says so and how to get them."""
    base = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.bfloat16)
    tree = recipe_tree(random_world, tmp_path / "run")
    tree["model"]["base"] = str(save_checkpoint(base, tmp_path / "bf16_base"))
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    ids = token_batch(54, seed=4)
    scored = in_memory_logits(recipe, WEIGHTS, ids)
    capsys.readouterr()
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(tmp_path / "default")) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "mergeopt: warning: writing bfloat16, the base's dtype, but fit scored the merge in float32: the "
        "rounding moves its losses away from mixture.json's; --dtype float32 writes the model fit scored"
    ]
    assert (written_logits(tmp_path / "default", ids).float() - scored).abs().max() > 1e-3
    out = tmp_path / "full"
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(out), "--dtype", "float32") == 0
    assert capsys.readouterr().err == ""  # the dtype asked for: nothing to say
    torch.testing.assert_close(written_logits(out, ids), scored, rtol=0, atol=1e-6)


def test_the_dtype_warning_of_an_adapter_names_the_base_too(capsys):
    """An adapter is added to a base the user loads: --dtype float32 alone gives the scored model
    only over a float32 base. Nothing is said when the written dtype is as wide as the scored one."""
    merge_cli.warn_narrower_than_scored("bfloat16", torch.float32, adapter=True)
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--dtype float32, with the base loaded in float32 too, gives the model fit scored")
    )
    merge_cli.warn_narrower_than_scored("float32", torch.float32, adapter=True)
    merge_cli.warn_narrower_than_scored("bfloat16", torch.bfloat16)
    assert capsys.readouterr().err == ""


def test_normalize_rescales_the_weights(random_world, tmp_path):
    recipe = write_recipe(tmp_path, random_world)
    out = tmp_path / "merged"
    assert merge(str(recipe), "--weights", "alpha=1,beta=3,gamma=0", "--normalize", "--out", str(out)) == 0
    assert manifest(out)["weights"] == {"alpha": 0.25, "beta": 0.75, "gamma": 0.0}
    ids = token_batch(54, seed=5)
    expected = in_memory_logits(recipe, manifest(out)["weights"], ids)
    torch.testing.assert_close(written_logits(out, ids), expected, rtol=0, atol=1e-6)


def test_overwrite_replaces_a_non_empty_out(random_world, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    recipe = write_recipe(tmp_path, random_world)
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(out), "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recipe.yaml"]  # old copy removed
    # an empty directory is not "existing": no --overwrite needed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(empty)) == 0
    assert (empty / "config.json").is_file()


def test_a_failure_while_writing_leaves_nothing(random_world, tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", broken)
    recipe = write_recipe(tmp_path, random_world)
    with pytest.raises(OSError, match="disk full"):
        merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(tmp_path / "merged"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    # over an existing directory, the old content survives
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("keep")
    with pytest.raises(OSError, match="disk full"):
        merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(old), "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "recipe.yaml"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------- user mistakes


def _mixture_file(tmp_path: Path, weights: dict, **fields) -> str:
    run = tmp_path / "fitted"
    run.mkdir(exist_ok=True)
    record = {"status": "complete", "weights": weights, "method": {"name": "linear", "scale": 1.0}, **fields}
    (run / "mixture.json").write_text(json.dumps(record))
    return str(run / "mixture.json")


def _bad_json(tmp_path: Path) -> str:
    (tmp_path / "broken.json").write_text('{"weights": {"alpha": 0.5,')
    return str(tmp_path / "broken.json")


def _dare_mixture_in_another_order(tmp_path: Path) -> str:
    method = describe(MergeSection(**MERGES["dare_linear+mixup"]), 3, 0)
    return _mixture_file(tmp_path, {"beta": 0.2, "alpha": 0.5, "gamma": 0.3}, method=method)


def _run_excluded_norms(tmp_path: Path) -> str:
    path = _mixture_file(tmp_path, WEIGHTS)
    (tmp_path / "fitted" / "recipe.yaml").write_text(yaml.safe_dump({"model": {"exclude": ["norm"]}}))
    return path


BAD_WEIGHTS = {
    "unknown name": ("alpha=0.2,beta=0.5,delta=0.3", "--weights names 'delta', which is not an expert"),
    "missing name": ("alpha=0.5,beta=0.5", "--weights gives no weight for expert 'gamma'"),
    "negative": ("alpha=-0.2,beta=0.7,gamma=0.5", "the weight of 'alpha' is negative"),
    "sum not 1": ("alpha=0.2,beta=0.2,gamma=0.2", "the weights sum to 0.6, not 1"),
    "twice": ("alpha=0.5,alpha=0.2,beta=0.3", "names expert 'alpha' twice"),
    "not name=w": ("alpha:0.5,beta=0.5", "'alpha:0.5' is not of the form name=weight"),
    "nan": ("alpha=nan,beta=0.5,gamma=0.5", "the weight of 'alpha' is nan, not a finite number"),
}
BAD_MIXTURES = {
    "off simplex": (lambda t: _mixture_file(t, {"alpha": 0.5, "beta": 0.2, "gamma": 0.2}), "sum to 0.9"),
    "other names": (lambda t: _mixture_file(t, {"alpha": 0.5, "beta": 0.5, "code": 0.0}), "names 'code'"),
    "missing file": (lambda t: str(t / "nowhere.json"), "does not exist"),
    "malformed": (_bad_json, "not valid JSON (line 1"),
    "no weights": (lambda t: _mixture_file(t, None), "weights: Input should be a valid dictionary"),
    "unfinished": (lambda t: _mixture_file(t, WEIGHTS, status="running"), "did not finish"),
    "other method": (
        lambda t: _mixture_file(t, WEIGHTS, method={"name": "ties", "scale": 1.0}),
        "different merge than the recipe describes (merge.method: 'ties' in the mixture, 'linear' in the recipe)",
    ),
    "other exclude": (_run_excluded_norms, "model.exclude ['norm'] but the recipe has []"),
    # the same names, other checkpoints: fitted on LoRA adapters, the recipe names dense experts
    "other experts": (
        lambda t: _mixture_file(
            t, WEIGHTS, stack={"tensors": 0, "lowrank_modules": 12, "unchanged": 21, "excluded": 0}
        ),
        "fitted on other experts than the recipe names (0 stacked tensors, 12 low-rank modules, "
        "21 unchanged there, 21 stacked tensors, 0 low-rank modules, 0 unchanged here)",
    ),
}


def assert_one_line_error(code: int, stderr: str, fragment: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeopt: error: "), stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_weights(case, random_world, tmp_path, capsys):
    recipe = write_recipe(tmp_path, random_world)
    weights, fragment = BAD_WEIGHTS[case]
    code = merge(str(recipe), "--weights", weights, "--out", str(tmp_path / "merged"))
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("case", sorted(BAD_MIXTURES))
def test_bad_mixture(case, random_world, tmp_path, capsys):
    make, fragment = BAD_MIXTURES[case]
    recipe = write_recipe(tmp_path, random_world)
    mixture = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = merge(str(recipe), "--mixture", mixture, "--out", str(tmp_path / "merged"))
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _run_with_experts(tmp_path: Path, world: dict, experts: dict) -> str:
    """A finished mixture.json beside the run's recipe.yaml that read ``experts``."""
    path = _mixture_file(tmp_path, WEIGHTS)
    run = recipe_tree({**world, "experts": experts}, tmp_path / "fitted")
    (tmp_path / "fitted" / "recipe.yaml").write_text(yaml.safe_dump(run))
    return path


def test_a_mixture_fitted_on_other_checkpoints_under_the_same_names_is_refused(
    random_world, tmp_path, capsys
):
    """The weights belong to the checkpoints, not the names: a recipe that swaps two experts'
    directories wrote, silently, a merge fit never scored."""
    experts = dict(random_world["experts"])
    swapped = {**experts, "alpha": experts["beta"], "beta": experts["alpha"]}
    mixture = _run_with_experts(tmp_path, random_world, swapped)
    recipe = write_recipe(tmp_path, random_world)
    code = merge(str(recipe), "--mixture", mixture, "--out", str(tmp_path / "merged"))
    assert_one_line_error(
        code, capsys.readouterr().err, f"read expert 'alpha' from {experts['beta']}, but the recipe names"
    )
    assert not (tmp_path / "merged").exists()


EXPERTS_OF_THE_WORLD = {"a": "tiny://experts/arith", "b": "tiny://experts/reverse"}


def _world_recipe(path: Path, **model) -> dict:
    """A recipe tree over the tiny world's paths (nothing is built: the checks come first)."""
    tree = recipe_tree(
        {
            "base": "tiny://base",
            "experts": EXPERTS_OF_THE_WORLD,
            "dev": {"a": "tiny://dev/arith.jsonl"},
        },
        path / "run",
    )
    tree["model"].update(model)
    return tree


@pytest.mark.parametrize(
    ("fitted", "ours", "fragment"),
    [
        ({"world": {"seed": 0}}, {"world": {"seed": 1}}, "built its world checkpoints with world.seed 0"),
        (
            {"model": {"gguf_file": "base-Q8_0.gguf"}},
            {"model": {"gguf_file": "base-Q4_K_M.gguf"}},
            "GGUF file",
        ),
    ],
)
def test_the_same_paths_over_other_weights_are_refused(fitted, ours, fragment, tmp_path):
    """The path is not all a name reads: world.seed builds another tiny world under the same
    ``tiny://`` names, and one GGUF repository holds several quantizations of the base. Both
    passed the checkpoint check and wrote a merge the fit never scored."""
    run, here = (
        _world_recipe(tmp_path, **fitted.get("model", {})),
        _world_recipe(tmp_path, **ours.get("model", {})),
    )
    run |= {k: v for k, v in fitted.items() if k != "model"}
    here |= {k: v for k, v in ours.items() if k != "model"}
    mixture = Path(_mixture_file(tmp_path, {"a": 0.5, "b": 0.5}))
    (mixture.parent / "recipe.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(here))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    with pytest.raises(UserError, match=fragment):
        check_same_merge(read_finished_mixture(mixture), mixture, recipe)
    (mixture.parent / "recipe.yaml").write_text(yaml.safe_dump(here))  # the run's own: passes
    check_same_merge(read_finished_mixture(mixture), mixture, recipe)


@pytest.mark.parametrize(("copied", "refused"), [("arith", False), ("reverse", True)])
def test_a_local_checkpoint_and_a_world_path_are_compared_as_the_worlds_place(
    copied, refused, tiny_world, tmp_path
):
    """The run read expert a from a local directory (the tiny grid trains its own experts); the
    recipe names ``tiny://experts/arith``. Compared as the world cache's directory: a copy of the
    world's arith expert is the same checkpoint, another expert under the name is refused. Before,
    a world path against a local one always passed."""
    import shutil

    local = shutil.copytree(tiny_world / "experts" / copied, tmp_path / f"{copied}-copy")
    world = {"world": {"cache_dir": str(tiny_world.parent)}}
    run = _world_recipe(tmp_path) | world
    run["model"]["experts"] = {**EXPERTS_OF_THE_WORLD, "a": str(local)}
    here = _world_recipe(tmp_path) | world
    mixture = Path(_mixture_file(tmp_path, {"a": 0.5, "b": 0.5}))
    (mixture.parent / "recipe.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(here))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    if refused:
        with pytest.raises(UserError, match=f"read expert 'a' from {local}, but the recipe names tiny://"):
            check_same_merge(read_finished_mixture(mixture), mixture, recipe)
    else:
        check_same_merge(read_finished_mixture(mixture), mixture, recipe)


def test_a_copy_of_the_fitted_checkpoint_is_the_same_expert(random_world, tmp_path):
    """A checkpoint copied elsewhere (equal contents) is the one the mixture was fitted on."""
    import shutil

    copy = shutil.copytree(random_world["experts"]["alpha"], tmp_path / "alpha-copy")
    mixture = _run_with_experts(tmp_path, random_world, random_world["experts"])
    moved = {**random_world, "experts": {**random_world["experts"], "alpha": str(copy)}}
    recipe = write_recipe(tmp_path, moved)
    assert merge(str(recipe), "--mixture", mixture, "--out", str(tmp_path / "merged")) == 0


def test_expert_order_must_match_for_dare(random_world, tmp_path, capsys):
    recipe = write_recipe(tmp_path, random_world, merge=MERGES["dare_linear+mixup"])
    code = merge(
        str(recipe), "--mixture", _dare_mixture_in_another_order(tmp_path), "--out", str(tmp_path / "m")
    )
    assert_one_line_error(code, capsys.readouterr().err, "lists the experts as beta, alpha, gamma")
    assert not (tmp_path / "m").exists()


def test_existing_out_is_refused(random_world, tmp_path, capsys):
    recipe = write_recipe(tmp_path, random_world)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    code = merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(out))
    assert_one_line_error(code, capsys.readouterr().err, "exists and is not empty (pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # --overwrite never deletes an input: here the expert directory itself
    code = merge(
        str(recipe), "--weights", as_arg(WEIGHTS), "--out", random_world["experts"]["beta"], "--overwrite"
    )
    assert_one_line_error(code, capsys.readouterr().err, "holds the input")
    assert (Path(random_world["experts"]["beta"]) / "model.safetensors").is_file()


def test_an_out_that_appears_while_merging_is_not_overwritten(random_world, tmp_path, capsys, monkeypatch):
    """--out is checked again just before the checkpoint is written: a directory that another job
    filled while the experts were merged is refused in one line and keeps its files."""
    import mergeopt.loading.problem as problem

    out = tmp_path / "merged"
    real_load_merge = problem.load_merge

    def load_then_someone_writes(*args, **kwargs):
        loaded = real_load_merge(*args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return loaded

    monkeypatch.setattr(problem, "load_merge", load_then_someone_writes)
    recipe = write_recipe(tmp_path, random_world)
    code = merge(str(recipe), "--weights", as_arg(WEIGHTS), "--out", str(out))
    assert_one_line_error(code, capsys.readouterr().err, "exists and is not empty (pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recipe.yaml"]  # no staging left


def test_cli_error_is_one_line_with_exit_code_2(random_world, tmp_path):
    result: subprocess.CompletedProcess = run_module(
        "merge",
        str(write_recipe(tmp_path, random_world)),
        "--weights",
        "alpha=1",
        "--out",
        str(tmp_path / "m"),
    )
    assert_one_line_error(result.returncode, result.stderr, "no weight for expert 'beta'")
    assert "Traceback" not in result.stderr and not (tmp_path / "m").exists()
    assert os.listdir(tmp_path) == ["recipe.yaml"]
