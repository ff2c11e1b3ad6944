"""``mergeopt diagnose``: task-vector numbers, edge losses, flags, and the verb's files.

Compared against: a brute-force numpy computation of norms, cosines and TIES sign conflicts from
θ_i − θ0 (every entry visited in a Python loop) on small random stacks (float32, int8, TIES-prepared);
a dense stack against the same experts kept as LoRA factors; the merge of the stack that holds θ0
against the stack without it (for every merge method); the experts' and the base's losses against
the proxy's own path (:func:`mergeopt.evaluation.proxy.proxy_losses`, the base as a one-hot
expert); barrier and convexity on curves whose answer is known.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mergeopt.config import MergeSection, recipe_from_dict
from mergeopt.evaluation import diagnose as diag
from mergeopt.evaluation.proxy import proxy_losses
from mergeopt.loading.lora_updates import LoraAdapter, LoraFactors
from mergeopt.loading.problem import load_problem
from mergeopt.merging.methods import get_method
from mergeopt.merging.mixed_experts import build_expert_stack
from mergeopt.merging.task_vectors import BASE_EXPERT, layer_of, sign_counts, task_vector_stats
from mergeopt.objectives.objective import Objective
from mergeopt.run_files import DiagnoseFile, read_run_file
from tests.conftest import recipe_tree, run_in_process

NAMES = ["a", "b", "c"]
LAYER = {
    "embed.weight": "embed",
    "layers.0.weight": "layers.0",
    "layers.0.bias": "layers.0",
    "layers.1.weight": "layers.1",
    "layers.1.bias": "layers.1",
    "head.weight": "head",
}


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 5)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(5, 6), torch.nn.Linear(6, 5)])
        self.head = torch.nn.Linear(5, 7, bias=False)


def _world(seed: int = 0):
    """θ0 and three experts: b moves three times as far, nobody changes layers.1.bias."""
    torch.manual_seed(seed)
    base = Toy()
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    gen = torch.Generator().manual_seed(seed + 1)
    experts = {}
    for name in NAMES:
        scale = 0.06 if name == "b" else 0.02
        experts[name] = {
            n: v if n == "layers.1.bias" else v + scale * torch.randn(v.shape, generator=gen)
            for n, v in theta0.items()
        }
    return theta0, experts


def _model(theta0):
    model = Toy()
    model.load_state_dict(theta0)
    return model


def _reference(theta0, taus, density):
    """Brute force: per layer Gram and ‖θ0‖², sign conflicts entry by entry (taus: name -> (K, n))."""
    k = len(NAMES)
    layers = list(dict.fromkeys(LAYER.values()))
    gram = {layer: np.zeros((k, k)) for layer in layers}
    base_sq = dict.fromkeys(layers, 0.0)
    contested = conflicting = 0
    both, opposite = np.zeros((k, k)), np.zeros((k, k))
    for name, tau in taus.items():
        layer = LAYER[name]
        base_sq[layer] += float(np.sum(theta0[name].double().numpy() ** 2))
        t = np.asarray(tau, dtype=np.float64)
        gram[layer] += t @ t.T
        keep = int(density * t.shape[1])
        trimmed = np.zeros_like(t)
        for i in range(k):
            top = np.argsort(-np.abs(t[i]), kind="stable")[:keep]
            trimmed[i, top] = t[i, top]
        for p in range(t.shape[1]):
            signs = [np.sign(trimmed[i, p]) for i in range(k) if trimmed[i, p] != 0]
            contested += len(signs) >= 2
            conflicting += len(signs) >= 2 and len(set(signs)) > 1
            for i in range(k):
                for j in range(k):
                    if trimmed[i, p] != 0 and trimmed[j, p] != 0:
                        both[i, j] += 1
                        opposite[i, j] += np.sign(trimmed[i, p]) != np.sign(trimmed[j, p])
    total = sum(gram.values())
    norms = np.sqrt(np.diag(total))
    return {
        "layers": layers,
        "relative": norms / math.sqrt(sum(base_sq.values())),
        "relative_per_layer": np.array([np.sqrt(np.diag(gram[m])) / math.sqrt(base_sq[m]) for m in layers]),
        "cosine": total / np.outer(norms, norms),
        "cosine_layer0": gram["layers.0"] / np.outer(*(2 * [np.sqrt(np.diag(gram["layers.0"]))])),
        "rate": conflicting / contested,
        "contested": contested,
        "pairwise": np.where(np.eye(k, dtype=bool), np.nan, opposite / np.maximum(both, 1)),
    }


def _check(stats, ref, rtol):
    assert stats.layers == ref["layers"]
    np.testing.assert_allclose(stats.relative_norms, ref["relative"], rtol=rtol)
    np.testing.assert_allclose(stats.relative_norms_per_layer, ref["relative_per_layer"], rtol=rtol)
    np.testing.assert_allclose(stats.cosines, ref["cosine"], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(stats.cosines_per_layer[1], ref["cosine_layer0"], rtol=rtol, atol=rtol)


def _stack(theta0, experts, dtype=torch.float32, merge=None, adapters=None):
    dense = experts if adapters is None else {}
    return build_expert_stack(
        _model(theta0),
        NAMES,
        dense,
        adapters or {},
        dtype=dtype,
        progress=False,
        merge=merge,
        base_expert=BASE_EXPERT,
    )


def _taus(theta0, experts):
    return {
        n: torch.stack([experts[e][n] - theta0[n] for e in NAMES]).reshape(3, -1).double() for n in theta0
    }


def test_layer_names_group_a_block_and_keep_other_parameters_apart():
    assert {n: layer_of(n) for n in LAYER} == LAYER
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_of("lm_head.weight") == "lm_head"


def test_sign_counts_match_an_entry_by_entry_count():
    gen = torch.Generator().manual_seed(3)
    tau = torch.randn(4, 40, generator=gen, dtype=torch.float64)
    tau[1, :10] = 0.0  # an expert that leaves entries alone
    for density in (1.0, 0.6, 0.3):
        contested, conflicting, both, opposite = sign_counts(tau, density)
        ref = _reference_one(tau.numpy(), density)
        assert (contested, conflicting) == ref[:2]
        np.testing.assert_array_equal(both, ref[2])
        np.testing.assert_array_equal(opposite, ref[3])


def _reference_one(t, density):
    k, n = t.shape
    keep = int(density * n)
    trimmed = np.zeros_like(t)
    for i in range(k):
        top = np.argsort(-np.abs(t[i]), kind="stable")[:keep]
        trimmed[i, top] = t[i, top]
    both, opposite = np.zeros((k, k), dtype=np.int64), np.zeros((k, k), dtype=np.int64)
    contested = conflicting = 0
    for p in range(n):
        active = [i for i in range(k) if trimmed[i, p] != 0]
        signs = {np.sign(trimmed[i, p]) for i in active}
        contested += len(active) >= 2
        conflicting += len(active) >= 2 and len(signs) == 2
        for i in active:
            for j in active:
                both[i, j] += 1
                opposite[i, j] += np.sign(trimmed[i, p]) != np.sign(trimmed[j, p])
    return contested, conflicting, both, opposite


def test_stats_of_a_float32_stack_match_brute_force():
    theta0, experts = _world()
    stats = task_vector_stats(_stack(theta0, experts), density=0.5)
    ref = _reference(theta0, _taus(theta0, experts), 0.5)
    _check(stats, ref, rtol=1e-5)
    assert stats.conflict_rate == pytest.approx(ref["rate"], abs=1e-12)
    assert sum(stats.contested) == ref["contested"]
    np.testing.assert_allclose(stats.pairwise_conflict_rate, ref["pairwise"], atol=1e-12)
    assert stats.relative_norms[1] > 2.5 * stats.relative_norms[0]  # b moved three times as far
    assert stats.entries == sum(v.numel() for v in theta0.values())  # the unchanged bias counts in ‖θ0‖


def test_stats_of_an_int8_stack_are_the_quantised_vectors_within_their_rounding():
    theta0, experts = _world()
    stats = task_vector_stats(_stack(theta0, experts, dtype=torch.int8), density=0.5)
    _check(stats, _reference(theta0, _taus(theta0, experts), 0.5), rtol=2e-2)


def test_stats_of_a_ties_stack_are_the_prepared_vectors_with_the_scale_divided_out():
    theta0, experts = _world()
    merge = MergeSection(method="ties", density=0.6, scale=2.0)
    stats = task_vector_stats(_stack(theta0, experts, merge=merge), density=1.0)
    prepare = get_method("ties").prepare
    prepared = {}
    for name, tau in _taus(theta0, experts).items():
        shaped = tau.reshape(3, *theta0[name].shape)
        prepared[name] = prepare(shaped, density=0.6, majority_sign="total").reshape(3, -1)
    _check(stats, _reference(theta0, prepared, 1.0), rtol=1e-5)


def test_lora_experts_kept_low_rank_give_the_dense_experts_numbers():
    theta0, _ = _world()
    gen = torch.Generator().manual_seed(5)
    adapters, dense = {}, {}
    for i, name in enumerate(NAMES):
        factors = {}
        for target, (out, inp) in {"layers.0.weight": (6, 5), "head.weight": (7, 5)}.items():
            r = 2 + i % 2
            factors[target] = LoraFactors(
                0.3 * torch.randn(r, inp, generator=gen), 0.3 * torch.randn(out, r, generator=gen), 0.5 + i
            )
        adapters[name] = LoraAdapter(Path(name), {}, factors)
        dense[name] = {n: v + (factors[n].delta() if n in factors else 0) for n, v in theta0.items()}
    lowrank = _stack(theta0, {}, adapters=adapters)
    assert lowrank.lowrank is not None and not lowrank.deltas  # really the low-rank path
    a, b = task_vector_stats(lowrank, 0.5), task_vector_stats(_stack(theta0, dense), 0.5)
    assert a.layers == b.layers
    np.testing.assert_allclose(a.relative_norms_per_layer, b.relative_norms_per_layer, rtol=1e-5)
    np.testing.assert_allclose(a.cosines, b.cosines, rtol=1e-5)
    assert a.contested == b.contested and a.conflicting == b.conflicting


@pytest.mark.parametrize(
    "merge",
    [
        MergeSection(),
        MergeSection(method="ties", density=0.5),
        MergeSection(method="dare_ties", density=0.7),
        MergeSection(method="linear", scale=1.5, mixup_alpha=0.5),
    ],
    ids=["linear", "ties", "dare_ties", "mixup"],
)
def test_stacking_the_base_changes_no_merge_of_the_experts_and_its_one_hot_is_theta0(merge):
    theta0, experts = _world()
    plain = build_expert_stack(_model(theta0), NAMES, experts, {}, progress=False, merge=merge)
    with_base = _stack(theta0, experts, merge=merge)
    assert with_base.method == plain.method  # the same method, draw and seed recorded
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    for name in plain.deltas:
        torch.testing.assert_close(
            with_base.merged_tensor(name, torch.cat([w, torch.zeros(1, dtype=w.dtype)])),
            plain.merged_tensor(name, w),
            rtol=1e-6,
            atol=1e-7,
        )
        base_only = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        torch.testing.assert_close(with_base.merged_tensor(name, base_only), theta0[name], rtol=0, atol=1e-6)


def test_barrier_and_convexity_on_known_curves():
    t = np.linspace(0, 1, 5)
    bowl = 1 + (t - 0.3) ** 2
    assert diag.barrier(t, bowl) == 0.0 and diag.is_convex(bowl)
    bump = 2 + t + 0.5 * np.sin(np.pi * t)  # the chord is 2 + t: the bump is the barrier
    assert diag.barrier(t, bump) == pytest.approx(0.5)
    assert not diag.is_convex(bump)
    np.testing.assert_allclose(diag.second_differences([1.0, 0.0, 1.0, 4.0]), [2.0, 2.0])
    line = 3 - t
    assert diag.barrier(t, line) == pytest.approx(0.0, abs=1e-15) and diag.is_convex(line)


def test_improvement_shares_split_the_positive_gains():
    base = {"target": 2.0, "x": 1.0, "y": 1.0}
    experts = {"p": {"target": 1.5, "x": 0.4, "y": 1.2}, "q": {"target": 1.9, "x": 0.8, "y": 1.1}}
    improvement, share = diag.improvement_shares(base, experts)
    assert improvement["p"] == pytest.approx({"target": 0.5, "x": 0.6, "y": -0.2})
    assert share["p"] == pytest.approx({"target": 0.5 / 0.6, "x": 0.75, "y": None}, nan_ok=True)
    assert share["q"]["x"] == pytest.approx(0.25) and share["q"]["y"] is None


def test_flags_fire_at_their_thresholds_and_not_below():
    names = ["p", "q", "r"]
    cos = [[1.0, -0.3, 0.95], [-0.3, 1.0, 0.0], [0.95, 0.0, 1.0]]
    edge = {"experts": ["p", "q"], "barrier": 0.05, "relative_barrier": 0.05}
    gains = {"p": {"target": 0.1, "x": 0.1}, "q": {"target": -0.1, "x": -0.2}, "r": {"target": 0.0, "x": 0.3}}
    flags = diag.find_flags(names, [0.01, 0.011, 0.05], cos, [edge], gains)
    kinds = {(f["kind"], tuple(f["experts"])) for f in flags}
    assert kinds == {
        ("norm_outlier", ("r",)),
        ("large_barrier", ("p", "q")),
        ("conflicting_task_vectors", ("p", "q")),
        ("redundant_experts", ("p", "r")),
        ("no_gain", ("q",)),
    }
    quiet = diag.find_flags(
        names, [0.01, 0.011, 0.012], np.eye(3).tolist(), [{**edge, "relative_barrier": 0.001}], {}
    )
    assert quiet == []


def _one_hot_grid(names) -> pd.DataFrame:
    return pd.DataFrame(np.eye(len(names)), columns=[f"w_{n}" for n in names])


def test_losses_are_the_proxy_paths_and_the_base_is_theta0(random_world, tmp_path):
    tree = recipe_tree(random_world, tmp_path / "out")
    recipe = recipe_from_dict(tree)
    resolved, problem, objective = diag.load_diagnosed(recipe, log=lambda _m: None)
    record = diag.diagnose(problem, objective, resolved, points=3)
    names = list(random_world["experts"])
    plain = load_problem(recipe, False, Objective.from_recipe(recipe))
    proxy = proxy_losses(plain, objective, _one_hot_grid(names), progress=False)
    for row, name in enumerate(names):
        for s in record.dev_sets:
            assert record.losses.experts[name][s] == pytest.approx(proxy.loc[row, f"loss_{s}"], rel=1e-6)
    middle = pd.DataFrame([[0.5, 0.5, 0.0]], columns=[f"w_{n}" for n in names])
    mid = proxy_losses(plain, objective, middle, progress=False)
    edge = next(e for e in record.edges if e.experts == names[:2])
    for s in record.dev_sets:
        assert edge.per_set[s][0] == record.losses.experts[names[0]][s]
        assert edge.per_set[s][1] == pytest.approx(mid.loc[0, f"loss_{s}"], rel=1e-6)
        assert edge.per_set[s][2] == record.losses.experts[names[1]][s]
    # θ0: the base model itself, loaded alone and scored on the whole dev sets (a recipe naming the
    # base as an expert is refused: an expert equal to the base has no data to weigh)
    from transformers import AutoModelForCausalLM

    from mergeopt.worlds.grid_table import dev_losses

    base_model = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.float32).eval()
    base = dev_losses(base_model, recipe, plain.sets, plain.pad_id, torch.device("cpu"))
    for s, loss in zip(record.dev_sets, base):
        assert record.losses.base[s] == pytest.approx(loss, rel=1e-6)
    assert len(record.edges) == 3 and record.points == 3
    DiagnoseFile.model_validate(json.loads(json.dumps(record.to_json())))  # JSON without NaN


def test_the_cli_on_the_tiny_world_writes_the_files_and_the_report_section(tiny_world, tmp_path):
    out = tmp_path / "run"
    done = run_in_process(
        "diagnose",
        "recipes/tiny.yaml",
        f"world.cache_dir={tiny_world.parent}",
        "device=cpu",
        "--points",
        "3",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "diagnose.json",
        "diagnose.md",
        "diagnose_norms.png",
        "diagnose_cosines.png",
        "diagnose_edges.png",
    ):
        assert (out / name).is_file(), name
    record = read_run_file(DiagnoseFile, out)
    assert record.experts == ["arith", "reverse", "brackets", "markov"]
    assert set(record.to_json()) == set(json.loads((out / "diagnose.json").read_text()))
    assert record.model_extra == {}  # the writer wrote exactly the schema's keys
    assert len(record.edges) == 6 and all(len(e.t) == 3 for e in record.edges)
    assert record.layers[0] == "model.embed_tokens" and "model.layers.0" in record.layers
    report = (out / "report.md").read_text()
    assert "## Diagnostics" in report and "(diagnose.md)" in report
    assert "Wrote diagnose.json" in done.stdout


def test_a_fit_directory_keeps_its_report_and_gains_the_diagnostics(random_world, tmp_path):
    import yaml

    from mergeopt.config import load_recipe
    from mergeopt.fit import fit

    out = tmp_path / "fit"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(recipe_tree(random_world, out, search={"strategy": "grid", "grid": {"divisions": 2}}))
    )
    fit(load_recipe(recipe), progress=False, log=lambda _m: None)
    assert "## Diagnostics" not in (out / "report.md").read_text()
    assert diag.main([str(recipe), "--points", "3", "--quiet"]) == 0  # into output_dir: the fit's
    report = (out / "report.md").read_text()
    assert "## Recommended mixture" in report and "## Diagnostics" in report
    assert read_run_file(DiagnoseFile, out).experts == list(random_world["experts"])


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_diagnose_md_says_why_a_ties_merge_has_no_sign_conflict(random_world, tmp_path, method):
    """Under ties the vectors are measured after the sign election: a rate of 0 that says nothing."""
    from mergeopt.reporting.diagnostics import markdown

    tree = recipe_tree(random_world, tmp_path / "out")
    tree["merge"] = {"method": method, "density": 0.5}
    recipe = recipe_from_dict(tree)
    resolved, problem, objective = diag.load_diagnosed(recipe, log=lambda _m: None)
    record = diag.diagnose(problem, objective, resolved, points=3)
    conflicts = record.task_vectors.sign_conflicts
    told = "nothing conflicts by construction; diagnose with merge.method=linear" in markdown(record)
    if method == "ties":
        assert conflicts.conflicting == 0 and conflicts.contested > 0 and told
    else:
        assert conflicts.conflicting > 0 and not told


def test_a_run_file_diagnose_cannot_read_is_refused_before_the_work(random_world, tmp_path, monkeypatch):
    """--out holds a newer mergeopt's mixture.json: report.md is rewritten from it, so it is refused
    in one line naming it where it is, before any evaluation (it was refused after them all, naming
    a staging directory that is gone)."""
    import yaml

    out = tmp_path / "run"
    out.mkdir()
    (out / "mixture.json").write_text(json.dumps({"schema_version": 99, "status": "complete"}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree(random_world, out)))

    def no_work(*_args, **_kwargs):
        raise AssertionError("the experts were loaded before the run files were read")

    monkeypatch.setattr(diag, "load_diagnosed", no_work)
    done = run_in_process("diagnose", str(recipe), "--points", "3", "--quiet")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"mergeopt: error: {out / 'mixture.json'}: schema_version 99 is newer than")


@pytest.mark.parametrize("command", ["fit", "rank"])
def test_fit_and_rank_refuse_a_kept_run_file_before_the_work(command, random_world, tmp_path):
    """A fit or a grid rank into a directory holding a newer mergeopt's diagnose.json: report.md sums
    it up after the work, so it was refused then, naming a staging directory that is gone. Now it is
    one line naming the file where the user has it, and nothing is written."""
    import yaml

    out = tmp_path / "run"
    out.mkdir()
    (out / "diagnose.json").write_text(json.dumps({"schema_version": 99}))
    tree = recipe_tree(random_world, out)
    names = list(tree["model"]["experts"])
    grid = tmp_path / "grid.csv"
    rows = [[1.0 if i == j else 0.0 for j in range(len(names))] for i in range(len(names))]
    rows.append([1.0 / len(names)] * len(names))
    losses = [[float(i + 1)] * len(tree["data"]["dev"]) for i in range(len(rows))]
    header = [f"w_{n}" for n in names] + [f"loss_{d['name']}" for d in tree["data"]["dev"]]
    grid.write_text(
        "\n".join([",".join(header), *(",".join(map(str, w + v)) for w, v in zip(rows, losses))]) + "\n"
    )
    tree["rank"] = {"grid": str(grid)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    before = sorted(p.name for p in out.iterdir())
    done = run_in_process(command, str(recipe), "--quiet")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"mergeopt: error: {out / 'diagnose.json'}: schema_version 99 is newer than"), line
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_fit_of_other_experts_in_out_is_refused_before_the_work(random_world, tmp_path, monkeypatch):
    """--out holds the fit of another recipe (other experts): report.md set that fit's table beside
    diagnostics of other experts, each with its own "target loss", and exit 0. It is refused in one
    line, as ``mergeopt rank`` refuses that mixture.json, and nothing is written."""
    import yaml

    out = tmp_path / "run"
    out.mkdir()
    names = list(random_world["experts"])
    fit = {"schema_version": 1, "status": "complete", "weights": {n: 1 / (len(names) + 1) for n in names}}
    fit["weights"]["other"] = 1 - sum(fit["weights"].values())
    (out / "mixture.json").write_text(json.dumps(fit))
    (out / "report.md").write_text("the fit's report\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree(random_world, out)))

    def no_work(*_args, **_kwargs):
        raise AssertionError("the experts were loaded before the fit's experts were checked")

    monkeypatch.setattr(diag, "load_diagnosed", no_work)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    done = run_in_process("diagnose", str(recipe), "--points", "3", "--quiet")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"mergeopt: error: {out / 'mixture.json'}: its weights name "), line
    assert "'other'" in line and "give diagnose another --out" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run"]
