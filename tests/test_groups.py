"""Hierarchical mixtures (weights.groups): w_i = group share × share within the group.

What is compared with what:
- the two-level parametrisation with singleton groups against softmax, bit for bit, and its
  gradient through the merged model against central finite differences (both levels);
- a fit with singleton groups against the same fit without groups, through ``mergeopt fit`` on the
  random world (gradient and dirichlet): mixture.json equal but for the ``groups`` record, and the
  same trace or evaluations, bit for bit;
- the hierarchical Dirichlet draws against ``draw_mixtures`` at each level with the same generator;
- the two levels of every record (mixture.json, report.md, each export's header) against the ones
  recomputed from the weights; a grouped gradient fit learns within a group (its logits move);
- a grouped gradient fit killed and resumed against the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import csv
import json
import signal

import numpy as np
import pytest
import torch
import yaml

from mergeopt.config import recipe_from_dict
from mergeopt.errors import run_cli
from mergeopt.export.command import main as export_main
from mergeopt.export.formats import FORMATS
from mergeopt.fit import fit
from mergeopt.merging.groups import Groups
from mergeopt.objectives.loss import dev_loss
from mergeopt.run_files import MixtureFile
from mergeopt.search.dirichlet import draw_hierarchical, draw_mixtures
from mergeopt.worlds import toy
from tests.conftest import recipe_tree, run_forked, run_in_process
from tests.test_gradients import problem64  # noqa: F401  (the fixture)

NAMES = ("python", "gsm", "js", "algebra", "web")
SPEC = {"code": ["python", "js"], "math": ["gsm", "algebra"]}  # web: a group of its own
SINGLETONS = {n: [n] for n in ("alpha", "beta", "gamma")}
PAIRED = {"ab": ["alpha", "gamma"]}  # beta alone; the group's experts are not adjacent
SEARCHES = {
    "gradient": {"strategy": "gradient"},
    "dirichlet": {"strategy": "dirichlet", "dirichlet": {"samples": 8}},
}


# ----------------------------------------------------------------------------- the parametrisation


def test_groups_are_ordered_by_their_first_expert_and_unnamed_experts_are_singletons():
    groups = Groups.build(NAMES, SPEC)
    assert groups.labels == ("code", "math", "web")
    assert groups.members == {"code": ["python", "js"], "math": ["gsm", "algebra"], "web": ["web"]}
    assert groups.size == 3 + 5


def test_singleton_groups_are_softmax_bit_for_bit():
    groups = Groups.build(NAMES, {})
    z = torch.randn(groups.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(groups.weights(z), torch.softmax(z[:5], dim=-1))
    assert torch.equal(groups.flat_logits(z), z[:5])
    w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    from mergeopt.merging.weights import logits_for

    assert torch.equal(
        groups.initial_logits(w), torch.cat([logits_for(w), torch.zeros(5, dtype=torch.float64)])
    )
    assert torch.equal(groups.initial_logits(None), torch.zeros(10, dtype=torch.float64))


def test_both_levels_are_recomputed_from_the_weights():
    groups = Groups.build(NAMES, SPEC)
    z = torch.randn(groups.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = groups.weights(z)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    u, v = z[:3], z[3:]
    share = torch.softmax(u, 0)
    code = torch.softmax(v[[0, 2]], 0)  # python, js
    assert float(w[0]) == pytest.approx(float(share[0] * code[0]), rel=1e-14)
    assert float(w[2]) == pytest.approx(float(share[0] * code[1]), rel=1e-14)
    assert float(w[4]) == pytest.approx(float(share[2]), rel=1e-14)  # web alone
    torch.testing.assert_close(torch.softmax(groups.flat_logits(z), 0), w, rtol=1e-14, atol=1e-16)
    record = groups.record(w.numpy(), z)
    assert record["code"]["share"] == pytest.approx(float(w[0] + w[2]), rel=1e-14)
    assert record["code"]["within"]["js"] == pytest.approx(float(w[2] / (w[0] + w[2])), rel=1e-14)
    assert record["math"]["logit"] == float(u[1]) and record["web"]["within"] == {"web": 1.0}
    target = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4], dtype=torch.float64)  # algebra 0: floored
    torch.testing.assert_close(groups.weights(groups.initial_logits(target)), target, rtol=0, atol=1e-7)
    zero = groups.record([0.5, 0.0, 0.5, 0.0, 0.0])
    assert zero["math"] == {"share": 0.0, "within": {"gsm": None, "algebra": None}}


def test_the_gradient_through_both_levels_matches_finite_differences(problem64):  # noqa: F811
    """The float64 model and far experts of tests/test_gradients.py, groups {ac: [a, c]} and b alone."""
    model, stack, batch = problem64
    groups = Groups.build(stack.expert_names, {"ac": ["a", "c"]})
    set_weights = torch.tensor([0.7, 0.3], dtype=torch.float64)
    z = torch.tensor([0.3, -0.2, 0.5, -0.4, 0.1], dtype=torch.float64, requires_grad=True)

    def loss(x):
        return dev_loss(model, stack, x, batch, set_weights, to_weights=groups.weights)

    (grad,) = torch.autograd.grad(loss(z), z)
    eps = 1e-3
    numeric = torch.zeros(groups.size, dtype=torch.float64)
    with torch.no_grad():
        for i in range(groups.size):
            step = torch.zeros(groups.size, dtype=torch.float64)
            step[i] = eps
            numeric[i] = (loss(z + step) - loss(z - step)) / (2 * eps)
    assert grad[[0, 1, 2, 4]].abs().min() > 1e-5, "a level's gradient vanished: the check would be vacuous"
    torch.testing.assert_close(grad, numeric, rtol=1e-3, atol=1e-6)
    assert float(grad[3]) == 0.0  # b's logit within its singleton group: its share within is 1


# ----------------------------------------------------------------------------- the Dirichlet draws


def test_hierarchical_draws_are_a_dirichlet_over_groups_times_dirichlets_within():
    groups = Groups.build(NAMES, SPEC)
    draws = draw_hierarchical(np.random.default_rng(3), groups, 0.7, 50)
    rng = np.random.default_rng(3)
    shares = draw_mixtures(rng, 3, 0.7, 50)
    code, math_ = draw_mixtures(rng, 2, 0.7, 50), draw_mixtures(rng, 2, 0.7, 50)
    np.testing.assert_allclose(draws[:, [0, 2]], shares[:, [0]] * code, rtol=1e-15)
    np.testing.assert_allclose(draws[:, [1, 3]], shares[:, [1]] * math_, rtol=1e-15)
    np.testing.assert_array_equal(draws[:, 4], shares[:, 2])
    np.testing.assert_allclose(draws.sum(axis=1), 1.0, rtol=1e-14)
    singletons = Groups.build(NAMES, {})
    np.testing.assert_array_equal(
        draw_hierarchical(np.random.default_rng(3), singletons, 0.7, 50),
        draw_mixtures(np.random.default_rng(3), 5, 0.7, 50),
    )


# ----------------------------------------------------------------------------- through fit


def _fit(world, out, search, groups=None):
    tree = recipe_tree(world, out, search=search, **({"weights": {"groups": groups}} if groups else {}))
    return fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)


def _log(out, strategy) -> list[dict]:
    rows = csv.DictReader((out / ("trace.csv" if strategy == "gradient" else "evaluations.csv")).open())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("strategy", sorted(SEARCHES))
def test_singleton_groups_give_the_flat_fit_bit_for_bit(strategy, random_world, tmp_path):
    flat = _fit(random_world, tmp_path / "flat", SEARCHES[strategy])
    grouped = _fit(random_world, tmp_path / "grouped", SEARCHES[strategy], SINGLETONS)
    record = grouped.pop("groups")
    assert "groups" not in flat and grouped == flat
    assert _log(tmp_path / "flat", strategy) == _log(tmp_path / "grouped", strategy)
    assert {label: g["share"] for label, g in record.items()} == flat["weights"]
    assert all(g["within"] == {label: 1.0} for label, g in record.items())


@pytest.mark.parametrize("strategy", sorted(SEARCHES))
def test_a_grouped_fit_reports_consistent_levels_everywhere(strategy, random_world, tmp_path, capsys):
    out = tmp_path / "run"
    mixture = _fit(random_world, out, SEARCHES[strategy], PAIRED)
    w, record = mixture["weights"], mixture["groups"]
    assert list(record) == ["ab", "beta"]  # ordered by the first expert: alpha, beta, gamma
    assert record["ab"]["share"] == pytest.approx(w["alpha"] + w["gamma"], rel=1e-14)
    assert record["ab"]["share"] * record["ab"]["within"]["gamma"] == pytest.approx(w["gamma"], rel=1e-14)
    assert record["beta"] == {**record["beta"], "share": w["beta"], "within": {"beta": 1.0}}
    assert MixtureFile.model_validate(json.loads((out / "mixture.json").read_text())).groups is not None
    if strategy == "gradient":  # both levels learnt: the logits within ab moved off their start 0
        assert record["ab"]["within_logits"]["alpha"] != 0.0
        assert record["beta"]["within_logits"] == {"beta": 0.0}  # a singleton's never moves
        logits = torch.tensor(list(mixture["logits"].values()), dtype=torch.float64)
        np.testing.assert_allclose(torch.softmax(logits, 0).numpy(), list(w.values()), rtol=1e-12)
    report = (out / "report.md").read_text()
    assert "### Both levels of the hierarchical mixture" in report
    assert f"| gamma | ab | {record['ab']['share']:.4f} | {record['ab']['within']['gamma']:.4f} |" in report
    assert run_cli(export_main, [str(out), "--to", "mergekit", "--out", str(tmp_path / "m.yaml")]) == 0
    share = f"ab {record['ab']['share']:.6g} (alpha {record['ab']['within']['alpha']:.6g}"
    assert share in (tmp_path / "m.yaml").read_text()


def test_groups_compose_with_constraints_under_the_grid(random_world, tmp_path):
    """The grid's candidates come from the feasible set; the groups only describe the mixture found."""
    tree = recipe_tree(
        random_world,
        tmp_path,
        search={"strategy": "grid", "grid": {"divisions": 4}},
        weights={"groups": PAIRED, "bounds": {"gamma": [0.0, 0.3]}},
    )
    mixture = fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    w, record = mixture["weights"], mixture["groups"]
    assert w["gamma"] <= 0.3 + 1e-12 and mixture["constraints"]["upper_from"]["gamma"] == "bound"
    assert record["ab"]["share"] == pytest.approx(w["alpha"] + w["gamma"], rel=1e-14)
    MixtureFile.model_validate(json.loads((tmp_path / "mixture.json").read_text()))


def test_every_export_states_both_levels(tmp_path):
    root = tmp_path
    toy.build_tokenizer().save_pretrained(root / "tokenizer")
    weights = {"python": 0.3, "js": 0.1, "gsm": 0.6}
    groups = {
        "code": {"share": 0.4, "within": {"python": 0.75, "js": 0.25}},
        "gsm": {"share": 0.6, "within": {"gsm": 1.0}},
    }
    mixture = {"status": "complete", "weights": weights, "groups": groups, "seed": 0}
    (root / "mixture.json").write_text(json.dumps(mixture))
    datasets = []
    for name in weights:
        path = root / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"prompt": f"{name}{i}", "completion": "xy"}) + "\n" for i in range(10))
        )
        datasets.append(f"{name}={path}")
    line = "groups (share of the mixture, then shares within the group, as fitted): "
    line += "code 0.4 (python 0.75, js 0.25); gsm 0.6 (gsm 1)"
    for name, fmt in FORMATS.items():
        if name == "mergekit":  # needs the run's recipe: checked on a real run above
            continue
        out = root / fmt.filename
        argv = [
            str(root / "mixture.json"),
            "--to",
            name,
            "--out",
            str(out),
            "--tokenizer",
            str(root / "tokenizer"),
        ]
        assert run_cli(export_main, [*argv, "--datasets", *datasets]) == 0, name
        text = out.read_text()
        if name == "doremi":
            document = json.loads(text)
            assert document["mergeopt"]["groups"] == groups
            assert document["train_domain_weights"] == weights  # the flat weights stay what trainers read
        else:
            assert line in text, name


def test_a_record_that_disagrees_with_the_weights_is_refused():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    good = {
        "ab": {"share": 0.8, "within": {"a": 0.625, "b": 0.375}},
        "c": {"share": 0.2, "within": {"c": 1.0}},
    }
    MixtureFile.model_validate({"status": "complete", "weights": weights, "groups": good})
    bad_share = {**good, "ab": {"share": 0.7, "within": {"a": 0.625, "b": 0.375}}}
    with pytest.raises(ValueError, match="group 'ab' has share 0.7 but its weights sum to 0.8"):
        MixtureFile.model_validate({"status": "complete", "weights": weights, "groups": bad_share})
    missing = {"ab": good["ab"]}
    with pytest.raises(ValueError, match="groups hold"):
        MixtureFile.model_validate({"status": "complete", "weights": weights, "groups": missing})


def test_a_grouped_gradient_fit_resumed_after_kill_9_is_bit_identical(random_world, tmp_path):
    def recipe(out):
        tree = recipe_tree(random_world, out, weights={"groups": PAIRED})
        tree["optim"].update(steps=12, checkpoint_every=2, patience=100)
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    whole = run_in_process("fit", recipe(tmp_path / "whole"), "--quiet")
    assert whole.returncode == 0, whole.stderr
    killed_recipe = recipe(tmp_path / "killed")
    killed = run_forked("fit", killed_recipe, "--quiet", fault="sigkill@step:7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_in_process("fit", killed_recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("mixture.json", "trace.csv"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_calibrates_mixture_files_carry_both_levels():
    from mergeopt.evaluation.calibration_report import mixture_record

    groups = Groups.build(["alpha", "beta", "gamma"], PAIRED)
    weights = {"alpha": 0.2, "beta": 0.5, "gamma": 0.3}
    content = {"grid": "grid.csv", "metric": "loss", "runs": 4}
    record = mixture_record(weights, "pick", {"weights": weights}, content, {"seed": 0}, groups)
    checked = MixtureFile.model_validate(record)
    assert checked.groups["ab"].share == pytest.approx(0.5) and checked.groups["ab"].within[
        "gamma"
    ] == pytest.approx(0.6)
