"""LoRA adapters as experts end to end: fit, merge and errors, against the same experts made dense.

Each adapter is also merged by PEFT (merge_and_unload) into a dense checkpoint; a fit over the
adapters (kept low-rank) must find the mixture a fit over the dense checkpoints finds, with the
same losses, and the written merge must have the same logits. Mixed dense + LoRA runs and TIES
(which densifies the adapters) are checked the same way.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.fit import fit
from mergeopt.loading.lora import read_adapter
from mergeopt.loading.problem import load_problem
from tests.conftest import EXPERTS, recipe_tree, run_in_process, save_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_experts(random_world, root, targets, tame=0.05, **save) -> tuple[dict, dict]:
    """Three trained PEFT LoRA experts of the world's base on ``targets``, saved under ``root`` with
    ``save`` (save_pretrained's options), and PEFT's merge of each: ({name: adapter}, {name: dense})."""
    base = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.float32).eval()
    adapters, dense = {}, {}
    for i, name in enumerate(EXPERTS):
        torch.manual_seed(200 + i)
        config = LoraConfig(r=2 + 2 * i, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():  # PEFT's random init is large for a tiny model: tame it
            for p_name, p in peft_model.named_parameters():
                if "lora_B" in p_name:
                    p.mul_(tame)
        peft_model.save_pretrained(root / f"{name}-adapter", **save)
        cfg_file = root / f"{name}-adapter" / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = random_world["base"]
        cfg_file.write_text(json.dumps(cfg))
        adapters[name] = str(root / f"{name}-adapter")
        dense[name] = str(save_checkpoint(peft_model.merge_and_unload(), root / f"{name}-dense"))
    return adapters, dense


@pytest.fixture(scope="module")
def lora_world(random_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_world")
    adapters, dense = save_experts(random_world, root, TARGETS)
    return {"world": random_world, "adapters": adapters, "dense": dense, "root": root}


def _fit(lora_world, experts, out, model=None, **sections):
    tree = recipe_tree(lora_world["world"], out, **sections)
    tree["model"]["experts"] = experts
    tree["model"].update(model or {})
    return fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)


def _close(a, b, tol):
    assert a["weights"] == pytest.approx(b["weights"], abs=tol)
    assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=tol)
    for name in a["expert_dev_loss"]:
        assert a["expert_dev_loss"][name] == pytest.approx(b["expert_dev_loss"][name], rel=tol)


def test_lowrank_fit_finds_the_dense_fit(lora_world, tmp_path):
    low = _fit(lora_world, lora_world["adapters"], tmp_path / "low")
    full = _fit(lora_world, lora_world["dense"], tmp_path / "dense")
    _close(low, full, 1e-4)
    assert low["stack"]["lowrank_modules"] == 14 and low["stack"]["tensors"] == 0
    assert low["stack"]["bytes"] < full["stack"]["bytes"] / 4


def test_mixed_dense_and_lora_experts(lora_world, tmp_path):
    mixed = dict(lora_world["adapters"], alpha=lora_world["dense"]["alpha"])
    _close(
        _fit(lora_world, mixed, tmp_path / "mixed"),
        _fit(lora_world, lora_world["dense"], tmp_path / "d"),
        1e-4,
    )


@pytest.mark.parametrize("saved", [False, True], ids=["factors", "factors+weight"])
def test_a_lora_on_the_output_layer_stays_low_rank_and_reaches_the_chunked_loss(
    random_world, tmp_path, saved
):
    """``lm_head`` adapted by LoRA stays low-rank, whether the adapter holds the layer's own weight
    too (PEFT's default: ``save_embedding_layers``, θ0 here, so no dense row) or not. The chunked
    loss, which reads the output weight instead of calling the layer, adds its update: the fit must
    find what the fit over PEFT's merged checkpoints finds (it missed the update once), and the plan
    must count what the stack holds."""
    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    adapters, dense = save_experts(
        random_world, tmp_path, ["q_proj", "lm_head"], tame=0.5, save_embedding_layers=saved
    )
    world = {"world": random_world}
    low = _fit(world, adapters, tmp_path / "low")
    assert low["stack"]["tensors"] == 0 and low["stack"]["lowrank_modules"] == 3  # 2 q_proj + lm_head
    _close(low, _fit(world, dense, tmp_path / "dense"), 1e-5)
    tree = recipe_tree(random_world, tmp_path / "plan")
    tree["model"]["experts"] = adapters
    recipe = recipe_from_dict(tree)
    p = plan.plan_memory(recipe, *dry_run.read_inventory(recipe), DeviceMemory("cpu", "t", 2**40, 2**40))
    stack = load_problem(recipe, progress=False).stack
    assert p.row("LoRA factors of") == stack.lowrank.nbytes() and p.stacked_parameters == 0


def test_a_saved_output_weight_that_is_not_the_base_is_stacked(random_world, tmp_path):
    """A saved ``lm_head`` weight that differs from θ0 is the expert's starting point: the stack
    holds its dense rows (with the factors low-rank over it), the one-hot merge is that copy plus
    s·B·A, and the plan, which compares the copy with the base, counts the rows."""
    from safetensors.torch import load_file, save_file

    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    adapters, _ = save_experts(random_world, tmp_path, ["q_proj", "lm_head"], tame=0.5)
    file = tmp_path / "beta-adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, file)
    tree = recipe_tree(random_world, tmp_path / "plan")
    tree["model"]["experts"] = adapters
    recipe = recipe_from_dict(tree)
    p = plan.plan_memory(recipe, *dry_run.read_inventory(recipe), DeviceMemory("cpu", "t", 2**40, 2**40))
    problem = load_problem(recipe, progress=False)
    stack = problem.stack
    assert list(stack.deltas) == ["lm_head.weight"] and p.stacked_parameters == stack.num_stacked_parameters()
    assert p.row("stack anchor") + p.row("stack differences") == stack.nbytes() - stack.lowrank.nbytes()
    base = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.float32)
    adapter = read_adapter(adapters["beta"], {n: tuple(t.shape) for n, t in base.named_parameters()})
    with torch.no_grad(), stack.at(torch.tensor([0.0, 1.0, 0.0])) as merged:
        head = merged.get_output_embeddings()
        x = torch.randn(3, head.in_features, generator=torch.Generator().manual_seed(0))
        want = x @ (tensors[key] + adapter.factors["lm_head.weight"].delta(torch.float32)).T
        torch.testing.assert_close(head(x), want, atol=1e-5, rtol=1e-5)


def test_ties_densifies_adapters_and_matches_dense_experts(lora_world, tmp_path):
    merge = {"method": "ties", "density": 0.5, "scale": 2.0}
    low = _fit(lora_world, lora_world["adapters"], tmp_path / "low", merge=merge)
    full = _fit(lora_world, lora_world["dense"], tmp_path / "dense", merge=merge)
    _close(low, full, 1e-4)


@pytest.mark.parametrize("targets", ["linear", "embedding+lm_head"])
def test_written_merge_of_lora_experts_has_the_in_memory_logits(lora_world, tmp_path, targets):
    """``mergeopt merge`` over LoRA experts (kept low-rank, the update made dense only to write it)
    writes the checkpoint whose logits are the merge of PEFT's merged experts at w."""
    adapters, dense = lora_world["adapters"], lora_world["dense"]
    if targets != "linear":
        adapters, dense = save_experts(
            lora_world["world"], tmp_path / "e", [*TARGETS, "embed_tokens", "lm_head"]
        )
    tree = recipe_tree(lora_world["world"], tmp_path / "run")
    tree["model"]["experts"] = adapters
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tree))
    result = run_in_process(
        "merge", str(recipe_path), "--weights", "alpha=0.5,beta=0.3,gamma=0.2", "--out", str(tmp_path / "m")
    )
    assert result.returncode == 0, result.stderr
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    tree["model"]["experts"] = dense
    problem = load_problem(recipe_from_dict(tree), progress=False)
    tokens = torch.randint(4, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), problem.stack.at(torch.tensor([0.5, 0.3, 0.2])) as merged:
        torch.testing.assert_close(
            written(input_ids=tokens).logits, merged(input_ids=tokens).logits, atol=1e-5, rtol=1e-5
        )


def _cli(lora_world, tmp_path, experts, *overrides):
    tree = recipe_tree(lora_world["world"], tmp_path / "out")
    tree["model"]["experts"] = experts
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return run_in_process("fit", str(path), *overrides, "--quiet")


def _one_line(result, culprit, tmp_path):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_trained_on_another_local_base_is_refused(lora_world, tmp_path):
    other = tmp_path / "other-adapter"
    other.mkdir()
    src = lora_world["adapters"]["beta"]
    for f in ("adapter_model.safetensors",):
        (other / f).write_bytes((lora_world["root"] / "beta-adapter" / f).read_bytes())
    cfg = json.loads((lora_world["root"] / "beta-adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = lora_world["dense"]["alpha"]  # a real directory, not the base
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    assert src != str(other)
    result = _cli(lora_world, tmp_path, dict(lora_world["adapters"], beta=str(other)))
    _one_line(result, "is a LoRA adapter trained on", tmp_path)


def test_a_relative_base_name_is_compared_only_where_a_checkpoint_is(random_world, tmp_path, monkeypatch):
    """PEFT writes base_model_name_or_path as the trainer named it: "base" is relative to the
    trainer's directory, not to ours. An unrelated ./base here without a checkpoint refused the
    adapter; it is skipped now. A checkpoint there that is not the base is refused, saying where
    the name was read from."""
    from mergeopt.loading.adapter_base import check_adapter_base

    base = Path(random_world["base"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    check_adapter_base("base", tmp_path / "adapter", base, "beta")
    shutil.rmtree(tmp_path / "base")
    shutil.copytree(random_world["experts"]["alpha"], tmp_path / "base")
    with pytest.raises(
        UserError, match=rf"trained on base \({tmp_path / 'base'}, read from the current directory\)"
    ):
        check_adapter_base("base", tmp_path / "adapter", base, "beta")
    shutil.rmtree(tmp_path / "base")
    shutil.copytree(base, tmp_path / "base")  # a copy of the base is the base
    check_adapter_base("base", tmp_path / "adapter", base, "beta")


def test_a_copy_of_the_adapters_base_is_its_base(lora_world, tmp_path):
    """The base copied to another disk: adapters naming the original are fitted and planned on the
    copy, with the mixture the original gives; a directory differing in one weight byte or in
    config.json is not a copy."""
    from mergeopt.loading.adapter_base import is_copy

    original = Path(lora_world["world"]["base"])
    copy_ = tmp_path / "base-on-nvme"
    shutil.copytree(original, copy_)
    assert is_copy(original, copy_)
    on_copy = _fit(lora_world, lora_world["adapters"], tmp_path / "copy", {"base": str(copy_)})
    on_original = _fit(lora_world, lora_world["adapters"], tmp_path / "original")
    assert on_copy["weights"] == on_original["weights"] and on_copy["dev_loss"] == on_original["dev_loss"]
    tree = recipe_tree(lora_world["world"], tmp_path / "plan")
    tree["model"].update(base=str(copy_), experts=lora_world["adapters"])
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(tree))
    planned = run_in_process("plan", str(tmp_path / "plan.yaml"))
    assert planned.returncode == 0, planned.stderr

    weights = next(copy_.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the weights
    weights.write_bytes(bytes(data))
    assert not is_copy(original, copy_)
    shutil.copy(original / weights.name, weights)
    config = json.loads((copy_ / "config.json").read_text())
    (copy_ / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-3}))
    assert not is_copy(original, copy_)
    result = _cli(lora_world, tmp_path, dict(lora_world["adapters"]), f"model.base={copy_}")
    _one_line(result, "not a copy of it", tmp_path)


def _named(lora_world, root, named) -> dict:
    """The world's adapters copied under ``root``, each naming ``named`` as its base."""
    experts = {}
    for name, path in lora_world["adapters"].items():
        shutil.copytree(path, root / name)
        cfg_file = root / name / "adapter_config.json"
        cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"base_model_name_or_path": named}))
        experts[name] = str(root / name)
    return experts


def test_a_hub_name_is_checked_against_a_base_in_the_hub_cache(lora_world, tmp_path):
    """A base given as a snapshot of the Hugging Face cache says which repository it is: adapters
    naming that repository are planned, adapters naming another (an -Instruct of the same shapes)
    are refused in one line by plan and fit; outside the cache a hub name is not checked."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(lora_world["world"]["base"], snapshot)
    right = _named(lora_world, tmp_path / "right", "acme/tiny-llama")
    wrong = _named(lora_world, tmp_path / "wrong", "acme/tiny-llama-Instruct")
    for experts, base, ok in ((right, snapshot, True), (wrong, snapshot, False), (wrong, None, True)):
        tree = recipe_tree(lora_world["world"], tmp_path / "out")
        tree["model"]["experts"] = experts
        if base is not None:
            tree["model"]["base"] = str(base)
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(tree))
        planned = run_in_process("plan", str(tmp_path / "plan.yaml"))
        if ok:
            assert planned.returncode == 0, planned.stderr
        else:
            culprit = "trained on acme/tiny-llama-Instruct, not on the base"
            _one_line(planned, culprit, tmp_path)
            _one_line(_cli(lora_world, tmp_path, wrong, f"model.base={snapshot}"), culprit, tmp_path)
            assert "a snapshot of acme/tiny-llama in the Hugging Face cache" in planned.stderr


def test_pickled_checkpoints_need_allow_pickle(lora_world, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "alpha-bin"
    pickled.mkdir()
    dense = lora_world["root"] / "alpha-dense"
    for f in dense.iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(dense / "model.safetensors"), pickled / "pytorch_model.bin")
    experts = dict(lora_world["dense"], alpha=str(pickled))
    _one_line(_cli(lora_world, tmp_path, experts), "set model.allow_pickle: true", tmp_path)
    allowed = _fit(lora_world, experts, tmp_path / "allowed", model={"allow_pickle": True})
    _close(allowed, _fit(lora_world, lora_world["dense"], tmp_path / "ref"), 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mixed", [False, True], ids=["lora", "lora+dense"])
def test_dry_run_plans_lora_experts_exactly(lora_world, tmp_path, dtype, mixed):
    """The plan's stack rows equal the bytes of the stack a fit builds, factors and dense rows."""
    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    experts = dict(lora_world["adapters"])
    if mixed:
        experts["alpha"] = lora_world["dense"]["alpha"]
    tree = recipe_tree(lora_world["world"], tmp_path / "out")
    tree["model"].update(experts=experts, stack_dtype=dtype)
    recipe = recipe_from_dict(tree)
    inventory, dims = dry_run.read_inventory(recipe)
    memory = DeviceMemory("cpu", "test", 2**40, 2**40)
    p = plan.plan_memory(recipe, inventory, dims, memory)
    problem = load_problem(recipe, progress=False)
    stack = problem.stack
    assert p.row("LoRA factors of") == stack.lowrank.nbytes()
    dense_rows = sum(r.bytes for r in p.held if r.label.startswith(("stack anchor", "stack differences")))
    if mixed:  # exact but for the tensors equal in every expert, which no header can reveal
        model = dict(problem.model.named_parameters())
        equal = sum(model[n].numel() for n in stack.unchanged)
        size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        per_element = size + (len(experts) - 1) * size  # the anchor is stored in the stack dtype too
        assert dense_rows == stack.nbytes() - stack.lowrank.nbytes() + per_element * equal
    else:
        assert dense_rows == 0 and p.stacked_parameters == stack.num_stacked_parameters() == 0
    result = _cli(lora_world, tmp_path, experts, "--dry-run", f"model.stack_dtype={dtype}")
    assert result.returncode == 0, result.stderr
    assert f"{2 if mixed else 3} LoRA expert(s)" in result.stdout
    assert "LoRA factors of" in result.stdout and not (tmp_path / "out").exists()
    assert ("stack anchor" in result.stdout) == mixed  # adapters alone stack nothing densely: no 0.00 rows


def merge_as_adapter(world, tmp_path, experts, *flags, merge=None):
    """``mergeopt merge --as-adapter`` at (0.5, 0.3, 0.2) over ``experts``: (the result, its recipe tree)."""
    tree = recipe_tree(world, tmp_path / "run")
    tree["model"]["experts"] = experts
    if merge:
        tree["merge"] = merge
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tree))
    weights = "alpha=0.5,beta=0.3,gamma=0.2"
    out = str(tmp_path / "out")
    return run_in_process(
        "merge", str(recipe_path), "--weights", weights, "--out", out, "--as-adapter", *flags
    ), tree


@pytest.mark.parametrize("targets", ["linear", "embedding+lm_head"])
def test_merge_as_adapter_is_the_merge_peft_loads(lora_world, tmp_path, targets):
    """--as-adapter: one LoRA adapter of rank Σ r_i per module, B scaled by λ w_i s_i (an
    embedding's factors written as PEFT's lora_embedding_A / _B); PEFT loads it over the base and
    gives the logits of the merge fit scores."""
    from peft import PeftModel

    experts = lora_world["adapters"]
    if targets != "linear":  # PEFT saves both layers' own weights too (θ0): nothing dense
        experts = save_experts(lora_world["world"], tmp_path / "e", [*TARGETS, "embed_tokens", "lm_head"])[0]
    result, tree = merge_as_adapter(lora_world["world"], tmp_path, experts, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    written = {p.name for p in out.iterdir()}
    assert written == {"adapter_config.json", "adapter_model.safetensors", "mergeopt_merge.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 2 + 4 + 6  # the experts' ranks
    assert ("model.embed_tokens" in config["target_modules"]) == (targets != "linear")
    base = AutoModelForCausalLM.from_pretrained(lora_world["world"]["base"], dtype=torch.float32).eval()
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    problem = load_problem(recipe_from_dict(tree), progress=False)
    tokens = torch.randint(4, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), problem.stack.at(torch.tensor([0.5, 0.3, 0.2])) as merged:
        torch.testing.assert_close(
            loaded(input_ids=tokens).logits, merged(input_ids=tokens).logits, atol=1e-5, rtol=1e-5
        )
    # and mergeopt reads it back as an expert: rank Σ r_i, scaling 1
    again = read_adapter(out, shapes)
    q = again.factors["model.layers.0.self_attn.q_proj.weight"]
    assert (q.rank, q.scaling) == (12, 1.0)


@pytest.mark.parametrize("case", ["dense expert", "dense experts", "ties"])
def test_merge_as_adapter_refuses_what_no_adapter_carries(lora_world, tmp_path, case):
    experts = dict(lora_world["adapters"])
    if case.startswith("dense"):
        experts["alpha"] = lora_world["dense"]["alpha"]
    if case == "dense experts":
        experts["beta"] = lora_world["dense"]["beta"]
    merge = {"method": "ties", "density": 0.5} if case == "ties" else None
    result, _ = merge_as_adapter(lora_world["world"], tmp_path, experts, merge=merge)
    said = {
        "dense expert": "'alpha' is a dense checkpoint (",
        "dense experts": "'alpha', 'beta' are dense checkpoints (",
        "ties": "needs merge.method linear",
    }
    _one_line(result, said[case], tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_reading_a_lora_adapter_prints_no_lines_of_torchao(tmp_path):
    """Where torchao is installed (axolotl and torchtune pull it in; the README's install has it),
    importing PEFT imports it, and it logged that its CUDA kernels do not load and, through torch,
    that it registers enums the old way: five lines under every LoRA fit. mergeopt's reading of an
    adapter imports PEFT with them quiet; a plain import still says them (the test can fail)."""
    plain = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True)
    assert "torchao" in plain.stderr or "_pytree" in plain.stderr, "torchao no longer logs at import"
    quiet = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mergeopt.loading.lora_parameters import _peft_conversion_api\n"
            "assert _peft_conversion_api() is not None\n"
            "from mergeopt.runtime.quiet_imports import quiet_backends\n"
            "import logging\n"
            "assert logging.getLogger('torchao').level == logging.NOTSET\n",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
