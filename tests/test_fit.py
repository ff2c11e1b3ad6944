"""fit end to end: the CLI on the real tiny world, its outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mergeopt.config import load_recipe, recipe_from_dict
from mergeopt.fit import fit
from mergeopt.reporting.fit_outputs import GRADIENT_FILES
from tests.conftest import recipe_tree, run_in_process, save_checkpoint, tiny_config

REPO = Path(__file__).parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_in_process("fit", *args)


@pytest.fixture(scope="module")
def tiny_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    result = run_cli(str(TINY), f"output_dir={out}", f"world.cache_dir={tiny_world.parent}", "--quiet")
    assert result.returncode == 0, result.stderr
    return out, result


def test_cli_writes_every_output(tiny_run):
    out, result = tiny_run
    assert {p.name for p in out.iterdir()} == set(GRADIENT_FILES)
    assert set(GRADIENT_FILES) == {
        "mixture.json",
        "trace.csv",
        "recipe.yaml",
        "loss_curve.png",
        "simplex.png",
        "report.md",
    }
    mixture = json.loads((out / "mixture.json").read_text())
    assert mixture["status"] == "complete"
    assert set(mixture["weights"]) == {"arith", "reverse", "brackets", "markov"}
    assert abs(sum(mixture["weights"].values()) - 1) <= 1e-6
    assert all(w >= 0 for w in mixture["weights"].values())
    rows = list(csv.DictReader((out / "trace.csv").open()))
    assert list(rows[0]) == ["step", "loss", "heldout_loss", "w_arith", "w_reverse", "w_brackets", "w_markov"]
    assert int(rows[-1]["step"]) == mixture["search"]["steps"]
    for row in rows:
        assert abs(sum(float(row[f"w_{n}"]) for n in mixture["weights"]) - 1) < 1e-6
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved recipe is the resolved one: it reloads to the recipe the run used
    saved = load_recipe(out / "recipe.yaml")
    assert saved.output_dir == str(out) and saved.optim == load_recipe(TINY).optim
    assert mixture["unit"] == "tokens"  # recipes/tiny.yaml sets no weights.unit: the default
    assert "Recommended mixture in token shares" in result.stdout and "uniform mixture" in result.stdout
    assert "The weights are shares of training tokens" in (out / "report.md").read_text()


def test_fitted_mixture_beats_uniform_and_every_single_expert(tiny_run):
    mixture = json.loads((tiny_run[0] / "mixture.json").read_text())
    assert mixture["dev_loss"] < mixture["uniform_dev_loss"]
    for name, loss in mixture["expert_dev_loss"].items():
        assert mixture["dev_loss"] < loss, name
    assert mixture["heldout_loss"] < mixture["uniform_heldout_loss"]
    # the per-set table is consistent with the target: the equal-weight mean of the four sets
    per_set = mixture["per_set_dev_loss"]["fitted"]
    assert mixture["dev_loss"] == pytest.approx(sum(per_set.values()) / 4, rel=1e-9)


def test_trace_starts_uniform_and_the_reported_w_is_the_best_heldout_one(tiny_run):
    out, _ = tiny_run
    mixture = json.loads((out / "mixture.json").read_text())
    rows = list(csv.DictReader((out / "trace.csv").open()))
    assert all(float(rows[0][f"w_{n}"]) == pytest.approx(0.25) for n in mixture["weights"])
    # the rule of early stopping: a held-out loss is the new best only when it beats the best so far
    # by more than optim.min_delta (so the best is not simply the smallest: on one CPU step 120
    # came 3e-5 below step 90's)
    min_delta = yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["min_delta"]  # as resolved
    best = None
    for row in (r for r in rows if r["heldout_loss"]):
        if best is None or float(row["heldout_loss"]) < float(best["heldout_loss"]) - min_delta:
            best = row
    assert int(best["step"]) == mixture["search"]["best_step"]
    for name, w in mixture["weights"].items():
        assert float(best[f"w_{name}"]) == pytest.approx(w, abs=1e-9)


def test_same_recipe_and_seed_give_the_same_mixture(random_world, tmp_path):
    results = [
        fit(
            recipe_from_dict(recipe_tree(random_world, tmp_path / f"r{i}")),
            progress=False,
            log=lambda _m: None,
        )
        for i in range(2)
    ]
    assert results[0]["weights"] == results[1]["weights"]
    assert (tmp_path / "r0" / "trace.csv").read_text() == (tmp_path / "r1" / "trace.csv").read_text()


def test_single_domain_target(random_world, tmp_path):
    tree = recipe_tree(random_world, tmp_path / "one")
    tree["data"]["target"] = "markov"
    mixture = fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert mixture["target"] == "markov"
    assert mixture["dev_loss"] == pytest.approx(mixture["per_set_dev_loss"]["fitted"]["markov"], rel=1e-9)


@pytest.mark.parametrize(
    ("merge", "said"),
    [
        ({"density": 0.3, "scale": 2.0}, ["merge.density 0.3 is not read by merge.method linear"]),
        ({"method": "dare_linear", "majority_sign": "frequency"}, ["merge.majority_sign frequency"]),
        ({"method": "ties", "density": 0.3, "majority_sign": "frequency"}, []),
        ({"density": 0.5}, []),  # the default, as every written recipe.yaml carries it
    ],
)
def test_a_merge_option_the_method_does_not_read_is_a_warning(random_world, tmp_path, capsys, merge, said):
    """merge-methods.md's ``merge.density=0.3 merge.scale=2`` without ``merge.method=ties`` scored a
    linear merge at scale 2, silently. Not refused (diagnose reads merge.density with a linear merge
    for its sign conflicts): the fit warns, and its weights are the same as without the option."""
    tree = recipe_tree(random_world, tmp_path / "out") | {"merge": merge}
    fitted = fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    lines = [x for x in capsys.readouterr().err.splitlines() if "is not read by merge.method" in x]
    assert len(lines) == len(said) and all(s in line for s, line in zip(said, lines)), lines
    if said:
        plain = {k: v for k, v in merge.items() if k not in ("density", "majority_sign")}
        again = recipe_tree(random_world, tmp_path / "plain") | {"merge": plain}
        assert (
            fit(recipe_from_dict(again), progress=False, log=lambda _m: None)["weights"] == fitted["weights"]
        )


@pytest.mark.parametrize(
    ("search", "said"),
    [
        ({"grid": {"divisions": 4}}, ["search.grid.divisions 4 is not read by search.strategy gradient"]),
        ({"cmaes": {"sigma": 0.5}, "spsa": {"lr": 2.0}}, ["search.cmaes.sigma 0.5", "search.spsa.lr 2.0"]),
        ({"grid": {"divisions": 10}}, []),  # the default, as every written recipe.yaml carries it
    ],
)
def test_an_option_of_another_strategy_is_a_warning(random_world, tmp_path, capsys, search, said):
    """``search.grid.divisions=4`` without ``search.strategy=grid`` ran the gradient strategy and read
    nothing of it, silently. Not refused (a recipe may keep several strategies' settings and pick one
    with ``search.strategy``): the fit warns."""
    tree = recipe_tree(random_world, tmp_path / "out") | {"search": search}
    fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    lines = [x for x in capsys.readouterr().err.splitlines() if "is not read by search.strategy" in x]
    assert len(lines) == len(said) and all(s in line for s, line in zip(said, lines)), lines


def test_a_tracker_option_without_its_backend_is_a_warning(random_world, tmp_path, capsys):
    """``logging.mlflow_tracking_uri`` without mlflow in ``logging.backends`` logged nothing anywhere,
    silently; an option some chosen backend reads, or left at its default, is not warned of."""
    from mergeopt.config.tracking import LoggingSection

    assert LoggingSection(backends=("tensorboard",), dir="logs", project="p").unused_options() == [
        "logging.project p is read by the mlflow or wandb backend, not in logging.backends"
    ]
    assert (
        LoggingSection(
            backends=("mlflow",), project="p", mlflow_tracking_uri="sqlite:///x.db"
        ).unused_options()
        == []
    )
    assert LoggingSection(wandb_mode="offline").unused_options() == []  # the default
    logging = {"mlflow_tracking_uri": "sqlite:///x.db", "wandb_mode": "online"}
    tree = recipe_tree(random_world, tmp_path / "out") | {"logging": logging}
    fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    lines = [x for x in capsys.readouterr().err.splitlines() if "not in logging.backends" in x]
    assert lines == [
        "mergeopt: warning: logging.mlflow_tracking_uri sqlite:///x.db is read by the mlflow backend, not in "
        "logging.backends: nothing is logged there (add it to logging.backends)",
        "mergeopt: warning: logging.wandb_mode online is read by the wandb backend, not in logging.backends: "
        "nothing is logged there (add it to logging.backends)",
    ], lines


# ----------------------------------------------------------------------------- user mistakes


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mergeopt: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def write_recipe(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_unknown_recipe_key(random_world, tmp_path):
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["optim"]["learning_rate"] = 0.1
    result = run_cli(str(write_recipe(tmp_path, tree)))
    assert_user_error(result, "recipe.yaml: optim.learning_rate: unknown key")
    assert not (tmp_path / "out").exists()


def test_mismatched_expert_shapes(random_world, tmp_path):
    from transformers import LlamaForCausalLM

    wide = save_checkpoint(LlamaForCausalLM(tiny_config(hidden_size=48)), tmp_path / "wide")
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["model"]["experts"]["wide"] = str(wide)
    result = run_cli(str(write_recipe(tmp_path, tree)))
    assert_user_error(result, "has shape", str(wide), random_world["base"])
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_line(random_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken}\n')
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["data"]["dev"].append({"name": "bad", "path": str(bad)})
    result = run_cli(str(write_recipe(tmp_path, tree)))
    assert_user_error(result, f"{bad}:3: not valid JSON")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(random_world, tmp_path):
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["optim"]["learning_rate"] = 0.1
    result = run_cli(str(write_recipe(tmp_path, tree)), "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_bad_override_on_the_command_line(tmp_path):
    result = run_cli(str(TINY), "optim.lr=fast")
    assert_user_error(result, "optim.lr", "(set on the command line)")


def test_the_stack_line_says_when_its_counts_are_one_ranks():
    """Under model.shard: fsdp each rank holds 1/N of every matrix: the line says its numbers are
    this rank's, not the model's (they read as half the model's with 2 ranks)."""
    from types import SimpleNamespace

    from mergeopt.fit import _stack_line
    from mergeopt.merging.stack import TaskVectorStack

    def line(shard):
        stack = TaskVectorStack(
            ["a", "b"], {"w": torch.zeros(4, 8)}, {"w": torch.zeros(1, 4, 8)}, shard=shard
        )
        return _stack_line(SimpleNamespace(stack=stack, device=torch.device("cpu")))

    assert line(None).startswith("stacked 1 tensors (32 parameters x 2 experts, 0.0 MiB) on cpu; 0 excluded")
    assert line((1, 2)).startswith(
        "stacked 1 tensors (32 parameters x 2 experts, 0.0 MiB) on this rank (cpu), which holds 1/2 of each matrix;"
    )


def test_the_run_recipe_names_the_files_it_read_from_anywhere(random_world, tmp_path, monkeypatch):
    """A recipe with paths relative to the directory the fit ran in: the run's recipe.yaml names
    them absolutely (output_dir too), so merge, export and a rerun read the same files from any
    directory; mergekit's exported config names experts that exist from elsewhere."""
    from mergeopt.errors import run_cli as run_command
    from mergeopt.export.command import main as export_main

    root = Path(random_world["base"]).parent
    monkeypatch.chdir(root)
    tree = recipe_tree(random_world, Path("runs") / "relative")
    tree["model"] = {"base": "base", "experts": {n: Path(p).name for n, p in random_world["experts"].items()}}
    tree["data"]["dev"] = [{"name": n, "path": Path(p).name} for n, p in random_world["dev"].items()]
    tree["optim"]["steps"] = 2
    out = root / "runs" / "relative"
    try:
        fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
        monkeypatch.chdir(tmp_path)
        written = yaml.safe_load((out / "recipe.yaml").read_text())
        assert written["output_dir"] == str(out)
        assert written["model"]["base"] == str(root / "base")
        assert all(Path(p).is_absolute() and Path(p).is_dir() for p in written["model"]["experts"].values())
        assert all(Path(d["path"]).is_file() for d in written["data"]["dev"])
        assert load_recipe(out / "recipe.yaml").model.base == str(root / "base")
        config = tmp_path / "mergekit.yaml"
        assert (
            run_command(export_main, [str(out / "mixture.json"), "--to", "mergekit", "--out", str(config)])
            == 0
        )
        models = yaml.safe_load(config.read_text())["models"]
        assert models and all(Path(m["model"]).is_dir() for m in models)
    finally:
        import shutil

        shutil.rmtree(root / "runs", ignore_errors=True)  # the world is shared by the module's tests


def _gradient_mixture(objective: dict, **extra) -> dict:
    """A gradient fit's mixture.json, as far as the summary reads it."""
    return {
        "strategy": "gradient",
        "target": "all",
        "weights": {"a": 0.6, "b": 0.4},
        "search": {"steps": 150, "stopped_early": False, "best_step": 140},
        "dev_loss": 0.94481,
        "uniform_dev_loss": 0.944805,
        "expert_dev_loss": {"a": 1.2, "b": 1.3},
        "objective": objective,
        **extra,
    }


def test_the_summary_says_the_best_step_and_signs_tiny_gaps_plainly():
    """The weights are the best evaluated step's whether or not the fit stopped early, so the header
    names that step; a gap below the last printed digit reads +0.0000, never -0.0000; a score table
    without held-out parts is labelled (fit) alone."""
    from mergeopt.reporting.report import summary

    terms = [{"kind": "loss", "label": "loss"}, {"kind": "exact_match", "label": "exact_match:a"}]
    scores = {"fitted mixture": {"fit": {"loss": 1.0, "exact_match:a": 0.5}, "heldout": None}}
    mixture = _gradient_mixture({"terms": terms, "scores": scores}, unit="tokens")
    text = summary(mixture, "runs/x", ["mixture.json"])
    assert "(target: all, gradient, 150 steps, best at step 140)" in text
    uniform = next(line for line in text.splitlines() if line.strip().startswith("uniform mixture"))
    assert uniform.endswith("+0.0000 vs fitted")
    assert "(fit / held-out)" not in text and "(fit)" in text
    mixture["search"]["stopped_early"] = True
    assert "150 steps, early stop, best at step 140)" in summary(mixture, "runs/x", ["mixture.json"])


def test_a_dev_loss_weighed_by_loss_terms_is_called_the_objectives_not_the_targets(tmp_path):
    """With loss terms only, dev_loss weighs the sets as the terms do (reported_set_weights): the
    summary and report.md named it the target's ('all'), sets weighed otherwise."""
    from mergeopt.reporting.report import summary

    terms = [
        {"kind": "loss", "dev": "all", "weight": 1.0, "label": "loss:all"},
        {"kind": "loss", "dev": "b", "weight": 3.0, "label": "loss:b"},
    ]
    mixture = _gradient_mixture({"terms": terms})
    text = summary(mixture, "runs/x", ["mixture.json"])
    assert "(objective: loss:all, loss:b ×3, gradient, 150 steps, best at step 140)" in text
    assert "dev loss (objective)" in text and "dev loss (target)" not in text
    mixture["objective"]["terms"] = terms[:1]  # the target's loss alone: named as before
    text = summary(mixture, "runs/x", ["mixture.json"])
    assert "(target: all, gradient" in text and "dev loss (target)" in text


def test_a_zero_order_fit_of_the_targets_loss_is_headed_as_the_gradient_fit_is():
    """A zero-order fit with no objective terms (the target's loss alone) was headed 'objective:
    loss:all', the gradient fit 'target: all'; loss terms that weigh the sets otherwise, and
    metric terms, are still the objective, each with its weight."""
    from mergeopt.reporting.report import summary

    def headed(terms):
        mixture = _gradient_mixture({"terms": terms}, strategy="cmaes", search={"evaluations": 40})
        return summary(mixture, "runs/x", ["mixture.json"]).splitlines()[1]

    target = {"kind": "loss", "dev": "all", "weight": 1.0, "label": "loss:all"}
    assert headed([target]) == "Recommended mixture (target: all, cmaes search, 40 evaluations)"
    weighed = [target, {"kind": "loss", "dev": "b", "weight": 3.0, "label": "loss:b"}]
    assert "(objective: loss:all, loss:b ×3, cmaes search, 40 evaluations)" in headed(weighed)
    metric = {"kind": "exact_match", "dev": "a", "weight": 2.0, "label": "exact_match:a"}
    assert "(objective: loss:all, exact_match:a ×2, cmaes search" in headed([target, metric])
