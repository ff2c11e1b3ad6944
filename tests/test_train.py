"""mergeopt.worlds.train on a small random world: every run is trained once, at the same budget, the grid
table is complete, LoRA runs save an adapter whose merge equals the dense model written beside it."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mergeopt.cli import main
from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.evaluation.proxy import check_grid_unit
from mergeopt.worlds import toy
from mergeopt.worlds.run_records import RUN_MARKER, drawn_differently, grid_run_records
from mergeopt.worlds.train import train
from tests.conftest import recipe_tree, write_jsonl

DOMAINS = {"alpha": "arith", "beta": "reverse", "gamma": "markov"}


def train_tree(world: dict, tmp_path, method: str = "full") -> dict:
    samplers = toy.domain_samplers(0)
    rng = random.Random(1)
    data = {}
    for name, domain in DOMAINS.items():
        data[name] = str(
            write_jsonl(tmp_path / f"train_{name}.jsonl", [samplers[domain](rng) for _ in range(40)])
        )
    tree = recipe_tree(world, tmp_path / "fit")
    tree["model"]["experts"] = {n: str(tmp_path / "experts" / n) for n in DOMAINS}
    tree["train"] = {
        "data": data,
        "output_dir": str(tmp_path / "grid"),
        "method": method,
        "steps": 4,
        "batch_tokens": 96,
        "lr": 1e-3,
        "max_length": 48,
        "mixtures": {"kind": "lattice", "divisions": 2},
    }
    return tree


@pytest.fixture(scope="module")
def trained(random_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    tree = train_tree(random_world, tmp)
    grid = train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    return tree, tmp, grid


def test_grid_has_one_row_per_lattice_point_and_every_dev_loss(trained):
    _, tmp, grid = trained
    table = pd.read_csv(grid)
    assert list(table.columns) == [
        "run",
        "path",
        "w_alpha",
        "w_beta",
        "w_gamma",
        "loss_arith",
        "loss_markov",
        "tokens",
    ]
    assert len(table) == 6  # C(2 + 2, 2) lattice points
    assert ((table[["w_alpha", "w_beta", "w_gamma"]].sum(axis=1) - 1).abs() < 1e-9).all()
    vertices = table[(table[["w_alpha", "w_beta", "w_gamma"]] == 1.0).any(axis=1)]
    assert sorted(vertices["path"]) == sorted(str(tmp / "experts" / n) for n in DOMAINS)  # not retrained
    assert table[["loss_arith", "loss_markov"]].notna().all().all()


def test_every_run_has_the_same_budget(trained):
    table = pd.read_csv(trained[2])
    # batches are filled to 96 tokens; an example is at most 48 tokens long
    assert table["tokens"].between(4 * 96, 4 * (96 + 48)).all()


def test_finished_runs_are_never_retrained(trained):
    tree, tmp, _ = trained
    markers = {p: p.stat().st_mtime_ns for p in tmp.rglob(RUN_MARKER)}
    assert len(markers) == 6
    train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert {p: p.stat().st_mtime_ns for p in tmp.rglob(RUN_MARKER)} == markers


def test_a_changed_recipe_does_not_reuse_old_runs(trained):
    tree, _, _ = trained
    changed = json.loads(json.dumps(tree))
    changed["train"]["lr"] = 5e-4
    was = json.dumps(tree["train"]["lr"])
    # the setting that changed is named (run.json keeps what it was trained with)
    with pytest.raises(
        UserError, match=rf"was trained with a different recipe \(train.lr 0.0005 now, {was} then\)"
    ):
        train(recipe_from_dict(changed), progress=False, log=lambda _m: None)


def test_the_changed_setting_is_named_and_an_older_run_json_gets_the_general_phrase(trained):
    """changed_setting reads run.json's trained_with; a run.json written before it kept the settings
    (only their hash) still gets the general phrase, and a new key is shown as unset then."""
    from mergeopt.worlds.run_records import changed_setting, trained_with

    tree, _, _ = trained
    recipe = recipe_from_dict(tree)
    settings = trained_with(recipe)
    assert changed_setting({}, settings) == "base, data, budget or optimizer changed"
    assert (
        changed_setting({"trained_with": {**settings, "seed": 7}}, settings)
        == f"seed {recipe.seed} now, 7 then"
    )
    older = {k: v for k, v in settings.items() if k != "train.max_length"}
    assert changed_setting({"trained_with": older}, settings).startswith("train.max_length ")
    assert changed_setting({"trained_with": older}, settings).endswith(" now, unset then")


def test_a_grids_runs_are_found_beside_it_and_the_ones_found_nowhere_are_named(
    trained, tmp_path, monkeypatch, capsys
):
    """train writes each run's path as given (relative to where it ran). Ranked from another
    directory those paths named nothing and the unit and recipe checks were skipped without a word;
    a path is now also read from the grid's directory, and runs found nowhere get one warning."""
    _, _, grid = trained
    table = pd.read_csv(grid)
    beside = table.assign(path=[os.path.relpath(p, grid.parent) for p in table["path"]])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    found = grid_run_records(beside, grid)
    assert [(row, path.resolve()) for row, path, _ in found] == [
        (row, Path(p).resolve()) for row, p in enumerate(table["path"])
    ]
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match=r"was mixed in token shares, and weights.unit is samples"):
        check_grid_unit(found, grid, "samples")

    gone = beside.assign(path=[f"gone/{i:03d}" for i in range(len(table))])
    assert grid_run_records(gone, grid) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{len(table)} of {len(table)} runs in its path column are not on this disk (gone/000, " in err[0]
    assert err[0].endswith("their weights.unit and training-recipe checks are skipped")


def test_a_changed_mixture_set_does_not_reuse_old_runs(trained):
    tree, _, _ = trained
    changed = json.loads(json.dumps(tree))
    # the second mixture of the set lands in mixtures/001, which holds the lattice's (0, 0.5, 0.5)
    changed["train"]["mixtures"] = {
        "kind": "list",
        "weights": [{"alpha": 1.0, "beta": 0.0, "gamma": 0.0}, {"alpha": 0.2, "beta": 0.3, "gamma": 0.5}],
    }
    with pytest.raises(UserError, match="holds a run of mixture"):
        train(recipe_from_dict(changed), progress=False, log=lambda _m: None)


def test_run_json_records_the_unit_and_the_tokens_each_domain_trained_on(trained):
    table = pd.read_csv(trained[2])
    for path, *weights in table[["path", "w_alpha", "w_beta", "w_gamma"]].itertuples(index=False):
        info = json.loads((Path(path) / RUN_MARKER).read_text())
        assert info["unit"] == "tokens"  # the default weights.unit
        held = info["domain_tokens"]
        assert sum(held.values()) == info["tokens"]
        # a domain trained on exactly when it has weight: 4 steps of 96 tokens draw every one of them
        assert [held[n] > 0 for n in DOMAINS] == [w > 0 for w in weights]


def test_a_changed_unit_keeps_the_experts_and_refuses_the_mixtures(trained):
    tree, tmp, _ = trained
    changed = json.loads(json.dumps(tree))
    changed["weights"] = {"unit": "samples"}
    with pytest.raises(UserError, match="in token shares, and weights.unit is samples") as err:
        train(recipe_from_dict(changed), progress=False, log=lambda _m: None)
    assert str(tmp / "grid" / "mixtures") in str(err.value)  # the experts, checked first, passed


def test_a_grid_mixed_in_another_unit_is_refused_before_ranking(trained, tmp_path, capsys):
    tree, tmp, grid = trained
    table = pd.read_csv(grid)

    def check(frame, unit):
        check_grid_unit(grid_run_records(frame, grid), grid, unit)

    check(table, "tokens")  # the unit its runs were trained in
    with pytest.raises(UserError, match=r"was mixed in token shares, and weights.unit is samples"):
        check(table, "samples")
    vertices = table[(table[["w_alpha", "w_beta", "w_gamma"]] == 1.0).any(axis=1)]
    check(vertices.reset_index(drop=True), "samples")  # an expert is either unit's
    check(table.drop(columns="path"), "samples")  # a grid made elsewhere: unchecked

    ranked = json.loads(json.dumps(tree)) | {"rank": {"grid": str(grid)}, "weights": {"unit": "samples"}}
    ranked["output_dir"] = str(tmp_path / "ranked")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(ranked))
    assert main(["rank", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was mixed in token shares, and weights.unit is samples" in err[0]
    assert not (tmp_path / "ranked").exists()


@pytest.mark.parametrize(
    "record, unit, differs",
    [
        ({}, "samples", False),  # runs from before weights.unit drew sample shares
        ({}, "tokens", True),
        ({"unit": "tokens"}, "tokens", False),
        ({"unit": "samples"}, "tokens", True),
    ],
)
def test_a_mixture_drawn_in_another_unit_is_another_run(record, unit, differs):
    mixed = {"weights": {"a": 0.5, "b": 0.5}, "unit": unit}
    assert drawn_differently(record, mixed) is differs
    one_hot = {"weights": {"a": 1.0, "b": 0.0}, "unit": unit}
    assert drawn_differently(record, one_hot) is False  # an expert is the same run in either unit


def test_expert_is_trained_on_its_own_domain_only(trained):
    tree, tmp, _ = trained
    info = json.loads((tmp / "experts" / "beta" / RUN_MARKER).read_text())
    assert info["weights"] == {"alpha": 0.0, "beta": 1.0, "gamma": 0.0}
    base = AutoModelForCausalLM.from_pretrained(tree["model"]["base"])
    expert = AutoModelForCausalLM.from_pretrained(tmp / "experts" / "beta")
    moved = sum((a - b).abs().sum().item() for a, b in zip(base.parameters(), expert.parameters()))
    assert moved > 0


def test_lora_runs_save_the_adapter_and_its_exact_merge(random_world, tmp_path):
    from peft import PeftModel

    tree = train_tree(random_world, tmp_path, method="lora")
    tree["train"]["mixtures"] = {"kind": "list", "weights": [{"alpha": 0.5, "beta": 0.25, "gamma": 0.25}]}
    tree["train"]["lr"] = 5e-2  # large enough that the adapters move
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    # peft 0.21 reads transformers 5.25's deprecated is_gradient_checkpointing: not shown to the user
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    run = tmp_path / "grid" / "mixtures" / "000"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    dense = AutoModelForCausalLM.from_pretrained(run).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tree["model"]["base"]), run / "adapter"
    ).eval()
    ids = torch.randint(4, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=0)
        base_logits = AutoModelForCausalLM.from_pretrained(tree["model"]["base"])(input_ids=ids).logits
    assert (dense(input_ids=ids).logits - base_logits).abs().max() > 1e-4  # the adapter did something


def test_no_train_section(random_world, tmp_path):
    with pytest.raises(UserError, match="no train section"):
        train(recipe_from_dict(recipe_tree(random_world, tmp_path)), progress=False, log=lambda _m: None)


def test_rerunning_without_a_metric_term_keeps_its_scores(trained):
    """Scores measured earlier stay in grid.csv when a later recipe does not name their term."""
    tree, _, grid = trained
    frame = pd.read_csv(grid)
    frame.insert(len(frame.columns) - 1, "score_exact_match:arith", [0.25 * i for i in range(len(frame))])
    frame.to_csv(grid, index=False)
    train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    again = pd.read_csv(grid)
    assert list(again.columns) == list(frame.columns)
    assert again["score_exact_match:arith"].tolist() == [0.25 * i for i in range(len(frame))]
    pd.testing.assert_frame_equal(
        again.drop(columns="score_exact_match:arith"), frame.drop(columns="score_exact_match:arith")
    )


def test_a_metric_returning_nan_on_a_run_is_refused_naming_the_run(trained, monkeypatch):
    """grid.csv is the truth every rank check reads: a NaN score is named with its run, nothing is written."""
    import sys
    import types

    tree, _, grid = trained
    before = grid.read_bytes()
    module = types.ModuleType("nan_on_the_third_run_pkg")
    calls = []

    def score(model, tokenizer, records):
        calls.append(1)
        return float("nan") if len(calls) == 3 else 0.5

    module.score = score
    monkeypatch.setitem(sys.modules, module.__name__, module)
    tree = {
        **tree,
        "objective": {"terms": [{"kind": "custom", "dev": "arith", "function": f"{module.__name__}:score"}]},
        "search": {"strategy": "grid"},
    }
    with pytest.raises(UserError) as err:
        train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert "returned nan on run " in str(err.value) and "not a finite number" in str(err.value)
    assert "\n" not in str(err.value) and len(calls) == 3
    assert grid.read_bytes() == before


def test_an_interior_lattice_without_a_point_is_refused(random_world, tmp_path):
    """divisions 2 over 3 experts has no interior point: refused, not an empty grid.csv over the old one."""
    tree = train_tree(random_world, tmp_path)
    tree["train"]["mixtures"] = {"kind": "lattice", "divisions": 2, "interior_only": True}
    with pytest.raises(
        UserError, match="interior_only lattice of divisions 2 over 3 experts holds no mixture"
    ):
        recipe_from_dict(tree)
    tree["train"]["mixtures"]["divisions"] = 3  # the one point (1/3, 1/3, 1/3)
    assert recipe_from_dict(tree).train.mixtures.divisions == 3


def test_an_expert_at_a_mixture_runs_path_is_refused_before_training(random_world, tmp_path):
    """The expert was replaced by mixture 1's run and grid.csv gave that run's losses as the expert's."""
    tree = train_tree(random_world, tmp_path)
    tree["model"]["experts"]["alpha"] = str(tmp_path / "grid" / "mixtures" / "001")  # (0, 1/2, 1/2)
    with pytest.raises(UserError, match=r"model.experts.alpha \(.*\) is the run of train.mixtures 001"):
        train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert not (tmp_path / "grid").exists() and not (tmp_path / "experts").exists()


def test_a_mixture_the_budget_draws_no_example_of_is_refused_before_training(random_world, tmp_path):
    """One step of 8 tokens holds one example: the 5% domains would get none, yet the grid row gave them 5%."""
    tree = train_tree(random_world, tmp_path)
    tree["train"].update(steps=1, batch_tokens=8)
    tree["train"]["mixtures"] = {"kind": "list", "weights": [{"alpha": 0.05, "beta": 0.05, "gamma": 0.9}]}
    with pytest.raises(UserError, match=r"would train on no example of (alpha|beta) in train.steps x train"):
        train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert not (tmp_path / "grid").exists() and not (tmp_path / "experts").exists()


def test_a_signal_while_the_runs_are_evaluated_says_that_no_run_is_in_progress(
    trained, tmp_path, monkeypatch, capsys
):
    """SIGTERM once every run is trained, while they are evaluated for grid.csv: no run is in
    progress and nothing is checkpointed, so the line says what the rerun does (evaluate them), not
    "the run in progress is checkpointed"; grid.csv is left as it was, and the rerun writes it whole."""
    import signal

    from mergeopt.worlds import grid_table

    tree, _, grid = trained
    before = grid.read_bytes()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    load_run = grid_table.load_run
    loaded = []

    def signalled(run_path, device):  # the signal arrives as the second run is loaded
        loaded.append(run_path)
        if len(loaded) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # through the command's own handler
        return load_run(run_path, device)

    monkeypatch.setattr(grid_table, "load_run", signalled)
    assert main(["train", str(path), "--quiet"]) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"mergeopt: interrupted (SIGTERM at the evaluation of run {Path(loaded[1]).name}); every run is trained "
        "and kept; grid.csv is written once they are all evaluated. Rerun the same command to evaluate them "
        "(no run is trained again)."
    )
    assert grid.read_bytes() == before
    monkeypatch.setattr(grid_table, "load_run", load_run)
    assert main(["train", str(path), "--quiet"]) == 0
    assert grid.read_bytes() == before


def test_a_signal_before_any_run_trains_says_that_no_run_is_in_progress(tmp_path):
    """SIGINT while train builds the tiny world, before any run trains: the line said "finished runs
    are kept and the run in progress is checkpointed", of no run and no checkpoint. A new interpreter,
    as the world build's own test runs it (OpenMP in a forked child)."""
    from tests.conftest import REPO, run_module

    out = tmp_path / "grid"
    result = run_module(
        "train",
        str(REPO / "recipes" / "tiny_grid.yaml"),
        f"train.output_dir={out}",
        f"world.cache_dir={tmp_path / 'cache'}",
        "device=cpu",
        "--quiet",
        fault="sigint@world:2",
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "mergeopt: interrupted (SIGINT at the world build, step 2); no run was training yet; what earlier "
        "commands trained is kept. Rerun the same command to continue."
    )
    assert not out.exists()


def _copied_elsewhere(trained, random_world, tmp_path) -> tuple[Path, dict]:
    """The trained grid, its experts and training data copied to ``tmp_path/copy`` and the base to
    ``tmp_path/base`` (another cluster's disk): the copy and the recipe tree naming it."""
    import shutil

    tree, tmp, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(tmp, copy)
    shutil.copytree(random_world["base"], tmp_path / "base")
    moved = json.loads(json.dumps(tree).replace(str(tmp), str(copy)))
    moved["model"]["base"] = str(tmp_path / "base")
    return copy, moved


def test_runs_copied_with_their_inputs_elsewhere_are_recognised(trained, random_world, tmp_path):
    """A grid trained on one disk and copied with its base and data to another (a world cache moved,
    another cluster) was refused as 'trained with a different recipe (model.base ... now, ... then)',
    with the advice to delete every run: the fingerprint hashes the paths. The same files at new
    paths are the same runs: none is retrained. A moved file whose content changed too is still
    refused, named as changed."""
    copy, moved = _copied_elsewhere(trained, random_world, tmp_path)
    assert moved["train"]["data"]["alpha"].startswith(str(copy))
    markers = {p: p.stat().st_mtime_ns for p in copy.rglob(RUN_MARKER)}
    assert len(markers) == 6
    train(recipe_from_dict(moved), progress=False, log=lambda _m: None)
    assert {p: p.stat().st_mtime_ns for p in copy.rglob(RUN_MARKER)} == markers
    with open(moved["train"]["data"]["beta"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "one more record"}) + "\n")
    with pytest.raises(UserError, match=r"was trained on other data: .*train_beta.jsonl changed since"):
        train(recipe_from_dict(moved), progress=False, log=lambda _m: None)


def test_a_moved_input_that_no_setting_names_is_followed_by_its_content(tmp_path):
    """The chat template is an input of every run but not a training setting: moved with the same
    content it is the same run; moved and changed, the old path is named as changed."""
    from mergeopt.runtime.fingerprint import fingerprints
    from mergeopt.worlds.run_records import check_inputs, relocated

    (tmp_path / "base.txt").write_text("base")
    for folder, text in (
        ("a", "{{ messages }}"),
        ("b", "{{ messages }}"),
        ("c", "{{ messages }}"),
        ("d", "other"),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "chat.jinja").write_text(text)
    base, settings = str(tmp_path / "base.txt"), {"model.base": str(tmp_path / "base.txt"), "seed": 0}

    def identity(template: str) -> dict:
        return {
            "fingerprint": "f",
            "trained_with": settings,
            "inputs": fingerprints([base, tmp_path / template]),
        }

    record = identity("a/chat.jinja")
    (tmp_path / "a" / "chat.jinja").unlink()  # moved to b/
    moved = identity("b/chat.jinja")
    assert relocated(record, moved)["inputs"] == moved["inputs"]
    check_inputs(relocated(record, moved), moved, "x", "y")
    changed = identity("d/chat.jinja")
    assert relocated(record, changed) is record
    with pytest.raises(UserError, match="a/chat.jinja changed since"):
        check_inputs(relocated(record, changed), changed, "x", "y")
    # two new files with its content: which one it became cannot be told, and it is not guessed
    two = {**moved, "inputs": {**moved["inputs"], **fingerprints([tmp_path / "c" / "chat.jinja"])}}
    assert relocated(record, two) is record


def test_a_run_trained_after_the_move_is_of_the_moved_experts_recipe(trained, random_world, tmp_path):
    """Runs copied with their base and data to another disk keep their run.json, naming the old
    paths; a mixture trained there afterwards records the new ones, so another fingerprint than
    the experts'. calibrate refused the grid: "its run was trained by another recipe ... than the
    recipe's experts", of the very recipe. The same settings on the same files at other paths are
    the same recipe; another setting or another file's content is still refused."""

    from mergeopt.evaluation.calibrate_inputs import check_provenance
    from mergeopt.worlds.run_records import input_digests, run_identity

    copy, moved = _copied_elsewhere(trained, random_world, tmp_path)
    experts = moved["model"]["experts"]

    def trained_here(tree: dict) -> list:
        recipe = recipe_from_dict(tree)
        record = run_identity(recipe, {"alpha": 0.5, "beta": 0.25, "gamma": 0.25}, input_digests(recipe))
        return [(6, copy / "mixtures" / "006", record)]

    check_provenance(trained_here(moved), copy / "grid.csv", experts)
    other = {**moved, "train": {**moved["train"], "lr": moved["train"]["lr"] * 2}}
    with pytest.raises(UserError, match="its run was trained by another recipe"):
        check_provenance(trained_here(other), copy / "grid.csv", experts)
    with open(moved["train"]["data"]["beta"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "one more record"}) + "\n")
    with pytest.raises(UserError, match="its run was trained by another recipe"):
        check_provenance(trained_here(moved), copy / "grid.csv", experts)


def test_a_chat_template_set_unset_or_switched_is_another_run(tmp_path):
    """The chat template renders every conversation a run trains on, and no training setting names
    it: switched to another file while the old one stays on disk, set where the runs had none, or
    unset, the runs were taken as finished (only the inputs recorded then were checked, and they had
    not changed). Each is now refused, naming the template."""
    from mergeopt.runtime.fingerprint import fingerprints
    from mergeopt.worlds.run_records import check_inputs, relocated

    (tmp_path / "base.txt").write_text("base")
    (tmp_path / "a.jinja").write_text("{{ messages }}")
    (tmp_path / "d.jinja").write_text("other")
    settings = {"model.base": str(tmp_path / "base.txt"), "seed": 0}

    def identity(*template) -> dict:
        inputs = fingerprints([tmp_path / "base.txt", *template])
        return {"fingerprint": "f", "trained_with": settings, "inputs": inputs}

    for then, now, named in (
        (
            (tmp_path / "a.jinja",),
            (tmp_path / "d.jinja",),
            "did not read .*d.jinja, which the recipe now names",
        ),
        ((), (tmp_path / "d.jinja",), "did not read .*d.jinja"),
        ((tmp_path / "a.jinja",), (), "it read .*a.jinja, which the recipe no longer names"),
    ):
        record, current = identity(*then), identity(*now)
        with pytest.raises(UserError, match=named):
            check_inputs(relocated(record, current), current, "x", "y")
    check_inputs(identity(tmp_path / "a.jinja"), identity(tmp_path / "a.jinja"), "x", "y")


def test_a_training_set_pointed_at_another_domains_data_is_another_recipe(tmp_path):
    """train.data's alpha pointed at beta's file ({alpha: a, beta: b} -> {alpha: b, beta: b}) was
    taken for alpha's data moved to b: the record's digests were carried to the new paths, b's own
    matched, and every run trained on a was reused as finished. Swapped ({alpha: b, beta: a}) it
    was refused as 'b changed since; restore it', of a file nobody changed. Neither moved anything:
    both are another recipe, naming train.data."""
    from mergeopt.runtime.fingerprint import fingerprints
    from mergeopt.worlds.run_records import changed_setting, relocated

    (tmp_path / "base.txt").write_text("base")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    Path(a).write_text('{"text": "alpha"}\n')
    Path(b).write_text('{"text": "beta"}\n')

    def identity(data: dict) -> dict:
        settings = {"model.base": str(tmp_path / "base.txt"), "seed": 0, "train.data": data}
        inputs = fingerprints([settings["model.base"], *data.values()])
        return {"fingerprint": json.dumps(data), "trained_with": settings, "inputs": inputs}

    record = identity({"alpha": a, "beta": b})
    for data in ({"alpha": b, "beta": b}, {"alpha": b, "beta": a}):
        now = identity(data)
        assert relocated(record, now) is None
        assert changed_setting(record, now["trained_with"]).startswith("train.data ")
    # one file for two domains, then two: not a move either
    shared = identity({"alpha": a, "beta": a})
    assert relocated(shared, identity({"alpha": a, "beta": b})) is None
