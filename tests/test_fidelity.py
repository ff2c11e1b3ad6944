"""The fidelity pipeline on the real tiny world: train the experts, fit, rank the merged proxy against
models trained on a lattice of mixtures. The rank thresholds come from the measured values (seed 0:
Spearman 0.841, Kendall 0.663, fitted-mixture regret 0.031), with margin.

The lattice's 20 trained runs are the committed ``benchmarks/results/tiny_grid/grid.csv`` (what
``mergeopt train recipes/tiny_grid.yaml`` writes): training all of them takes minutes, so the test
trains the four experts and one interior mixture and checks that they reproduce their committed
rows, then ranks the proxy against the committed table.

Training is chaotic enough that the thread count shows in the third decimal of a loss (a CPU kernel
splits its reductions by thread), so the test trains with the 2 torch threads the committed table
was trained with, whatever the test process's own count (and the world itself is built with
:data:`mergeopt.worlds.BUILD_THREADS`, whoever builds it). The CPU's kernels show as much: torch's
vectorised kernels follow the CPU's capability (AVX2, AVX-512) and MKL's matrix products its vendor,
and from the tiny world's pretraining on the runs differ by a tenth in loss. Two AVX-512 Xeons of
different generations differ as well. So the rows a machine must reproduce bit for bit are keyed by
that signature, CPU family and model included (:func:`numerics`):
``tests/data/fidelity/SIGNATURE.csv`` (the five runs trained here, written by
``MERGEOPT_WRITE_GOLDEN=1``) for each CPU model the project has run on, and must match there. Older
recordings and the committed table name no CPU model: where one of them is all a CPU has, rows that
differ from it skip the check, saying how to record that CPU's rows. Everything else
the module checks holds on any CPU: the vertices against the experts trained in the same run, and
the rank statistics against the committed table with margin."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mergeopt.config import recipe_from_dict
from mergeopt.fit import fit
from mergeopt.worlds import resolve_recipe
from mergeopt.worlds.train import train
from tests.conftest import run_in_process

REPO = Path(__file__).parent.parent


COMMITTED_GRID = REPO / "benchmarks" / "results" / "tiny_grid" / "grid.csv"
GOLDEN = REPO / "tests" / "data" / "fidelity"  # the same runs trained on other CPUs, by signature
RETRAINED_MIXTURE = {"arith": 0.0, "reverse": 0.0, "brackets": 1 / 3, "markov": 2 / 3}  # a lattice point
GRID_THREADS = 2  # torch threads of the run that wrote the committed table


@contextlib.contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def numerics(exact: bool = True) -> str:
    """What a run's bits depend on besides the code and the threads: torch's version, the CPU
    capability its kernels dispatch to, the CPU's vendor (MKL picks its code path by it) and, with
    ``exact``, the CPU's family and model (two AVX-512 Xeons of different generations differ too)."""
    fields = {"vendor_id": platform.machine()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().split("\n\n", 1)[0].splitlines():  # the first processor's
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    capability = torch.backends.cpu.get_cpu_capability()
    signature = f"torch-{torch.__version__}-{capability}-{fields['vendor_id']}"
    if exact and "cpu family" in fields and "model" in fields:
        signature += f"-{fields['cpu family']}-{fields['model']}"
    return signature.lower().replace("+", "-")


def _reference_rows() -> tuple[pd.DataFrame, str, bool]:
    """The rows this machine must reproduce, where they come from, and whether they were recorded on
    this CPU model (older recordings and the committed table name no model)."""
    for golden, exact in ((GOLDEN / f"{numerics()}.csv", True), (GOLDEN / f"{numerics(False)}.csv", False)):
        if golden.is_file():
            return pd.read_csv(golden), str(golden.relative_to(REPO)), exact
    return pd.read_csv(COMMITTED_GRID), str(COMMITTED_GRID.relative_to(REPO)), False


@pytest.fixture(scope="module")
def fidelity_run(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    tree = yaml.safe_load((REPO / "recipes" / "tiny_grid.yaml").read_text())
    tree["model"]["experts"] = {n: str(tmp / "experts" / n) for n in tree["model"]["experts"]}
    tree["train"]["output_dir"] = str(tmp / "trained")
    names = list(tree["model"]["experts"])
    vertices = [{n: float(n == name) for n in names} for name in names]  # the experts' own rows
    tree["train"]["mixtures"] = {"kind": "list", "weights": [*vertices, RETRAINED_MIXTURE]}
    shutil.copy(COMMITTED_GRID, tmp / "grid.csv")
    tree["rank"]["grid"] = str(tmp / "grid.csv")
    tree["output_dir"] = str(tmp / "fit")
    tree["world"] = {"cache_dir": str(tiny_world.parent)}
    tree["device"] = "cpu"
    recipe = recipe_from_dict(tree)
    with _torch_threads(GRID_THREADS):
        train(recipe, progress=False, log=lambda _m: None)
    mixture = fit(recipe, progress=False, log=lambda _m: None)
    return tree, tmp, mixture


def test_training_reproduces_the_committed_grid(fidelity_run):
    """The experts and the interior mixture trained here give their committed rows' dev losses (the
    committed table's, or this CPU's recorded rows: see the module's docstring)."""
    _, tmp, _ = fidelity_run
    trained = pd.read_csv(tmp / "trained" / "grid.csv")
    if os.environ.get("MERGEOPT_WRITE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        trained.drop(columns=["path"]).to_csv(GOLDEN / f"{numerics()}.csv", index=False, float_format="%.17g")
    committed, source, exact = _reference_rows()
    weights = [c for c in committed.columns if c.startswith("w_")]
    losses = [c for c in committed.columns if c.startswith("loss_")]
    assert len(trained) == 5  # four experts, one mixture
    for _, row in trained.iterrows():
        same = committed[(committed[weights] - row[weights].to_numpy(float)).abs().max(axis=1) < 1e-9]
        assert len(same) == 1, f"{row['path']}: no row with its weights in {source}"
        assert int(same["tokens"].iloc[0]) == int(row["tokens"])
        if not exact and same[losses].to_numpy(float)[0] != pytest.approx(
            row[losses].to_numpy(float), abs=1e-5
        ):
            pytest.skip(
                f"{source} was trained on another CPU model than this one ({numerics()}), whose bits "
                "differ; MERGEOPT_WRITE_GOLDEN=1 records this CPU's rows under tests/data/fidelity"
            )
        assert same[losses].to_numpy(float)[0] == pytest.approx(
            row[losses].to_numpy(float), abs=1e-5, rel=0
        ), f"{row['path']} against {source} ({numerics()})"


def test_merged_proxy_ranks_the_trained_mixtures(fidelity_run):
    _, tmp, mixture = fidelity_run
    rank = mixture["rank"]
    assert rank["n_mixtures"] == 20  # the step-1/3 lattice over 4 experts
    assert rank["spearman"] >= 0.7
    assert rank["kendall"] >= 0.5
    assert rank["fitted_regret"] <= 0.15
    report = json.loads((tmp / "fit" / "rank_report.json").read_text())
    assert set(report["metrics"]) == {"arith", "reverse", "brackets", "markov", "target"}


def test_at_the_grid_vertices_proxy_and_truth_are_the_same_expert(fidelity_run, tiny_world):
    """w = e_i merges to expert i, and the grid's row for e_i is that very expert: equal losses.
    (The rows of the experts trained in this run, so the check holds on any CPU.)"""
    tree, tmp, _ = fidelity_run
    from dataclasses import replace

    from mergeopt.evaluation.proxy import proxy_losses, read_grid
    from mergeopt.loading.problem import load_problem
    from mergeopt.objectives.objective import Objective

    recipe, _ = resolve_recipe(recipe_from_dict(tree), log=lambda _m: None)
    grid = read_grid(tmp / "trained" / "grid.csv", recipe.expert_names)
    vertices = grid[(grid[[f"w_{n}" for n in recipe.expert_names]] == 1.0).any(axis=1)]
    assert len(vertices) == 4
    objective = replace(Objective.from_recipe(recipe), batch_size=128)
    proxy = proxy_losses(load_problem(recipe, progress=False), objective, vertices, progress=False)
    for column in proxy.columns:
        pd.testing.assert_series_equal(proxy[column], vertices[column], atol=1e-5, rtol=0, check_names=False)


def test_rank_cli_reports_the_same_numbers(fidelity_run):
    tree, tmp, mixture = fidelity_run
    recipe_file = tmp / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tree))
    out = tmp / "rank_cli"
    result = run_in_process("rank", str(recipe_file), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rank_report.json").read_text())
    assert report["metrics"]["target"]["spearman"] == pytest.approx(mixture["rank"]["spearman"], abs=1e-12)
    assert report["fitted_mixture"]["regret"] == pytest.approx(mixture["rank"]["fitted_regret"], abs=1e-12)
    assert "**target**" in result.stdout
