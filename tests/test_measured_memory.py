"""The fit's measured peak of GPU memory beside the plan's (mergeopt.memory.measured): the planned
peak is the plan's, the line and the tracker's values say both, and nothing is measured off CUDA."""

from __future__ import annotations

import pytest
import torch

from mergeopt.config import load_recipe, recipe_from_dict
from mergeopt.fit import fit
from mergeopt.memory import dry_run, measured
from mergeopt.memory.sizes import GIB
from mergeopt.reporting import tracking
from tests.conftest import REPO, recipe_tree


def _resolved_tiny(tiny_world):
    from mergeopt import worlds

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"world.cache_dir={tiny_world.parent}"])
    return worlds.resolve_recipe(recipe, lambda _m: None)[0]


def test_the_planned_peak_is_the_plans(tiny_world):
    """For the recipe as the fit resolves it (worlds built), the peak `mergeopt plan` prints."""
    resolved = _resolved_tiny(tiny_world)
    plan, _, _ = dry_run.make_plan(resolved)
    assert measured.planned_peak(resolved, torch.device("cpu"), 1) == plan.peak > 0


def test_the_line_says_the_measured_peak_against_the_plan(tiny_world, monkeypatch):
    """On a GPU (its counter stood in for here): the largest max_memory_allocated against the plan's
    per-rank peak, as a ratio, in one line and as tracker values."""
    resolved = _resolved_tiny(tiny_world)
    planned = measured.planned_peak(resolved, torch.device("cuda"), 1)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: planned // 2)
    line, metrics = measured.peak_report(resolved, torch.nn.Linear(2, 2), torch.device("cuda", 0))
    assert line == (
        f"memory: peak {planned / 2 / GIB:,.2f} GiB allocated (cuda:0, torch.cuda.max_memory_allocated); "
        f"the plan said {planned / GIB:,.2f} GiB per rank (0.50x)"
    )
    assert metrics["memory/peak_over_plan"] == pytest.approx(0.5, abs=1e-9)
    assert metrics["memory/planned_peak_gib"] == pytest.approx(planned / GIB)


def test_no_measurement_off_cuda(tiny_world, random_world, tmp_path, monkeypatch):
    """A CPU fit neither resets nor reads CUDA's counters and logs no memory line."""

    def touched(*_a, **_k):
        raise AssertionError("a CPU fit read CUDA's memory counters")

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", touched)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", touched)
    assert (
        measured.peak_report(_resolved_tiny(tiny_world), torch.nn.Linear(2, 2), torch.device("cpu")) is None
    )
    lines: list[str] = []
    tree = recipe_tree(random_world, tmp_path / "out")
    fit(recipe_from_dict(tree), progress=False, log=lines.append)
    assert not [line for line in lines if line.startswith("memory:")]


def test_the_tracker_gets_the_memory_values():
    class Recording:
        name, run_id = "recording", None

        def __init__(self):
            self.summary = None

        def finish(self, summary, step, mixture):
            self.summary = dict(summary)

    recording = Recording()
    mixture = {
        "weights": {"a": 0.5, "b": 0.5},
        "dev_loss": 1.0,
        "heldout_loss": 1.1,
        "uniform_dev_loss": 1.2,
        "uniform_heldout_loss": 1.3,
        "expert_dev_loss": {"a": 1.4, "b": 1.5},
        "search": {"steps": 3},
    }
    tracking.Tracker([recording]).finish(mixture, {"memory/peak_allocated_gib": 52.5})
    assert recording.summary[tracking.metric_name("memory/peak_allocated_gib")] == 52.5


def test_a_plan_that_fails_after_the_fit_is_a_warning(tiny_world, monkeypatch, capsys):
    """The closing line comes after the fit's work: a failure to plan is one warning, not a crash."""
    from mergeopt.memory import dry_run as planner

    def broken(_recipe):
        raise OSError("headers unreadable")

    monkeypatch.setattr(planner, "read_inventory", broken)
    assert measured.planned_peak(_resolved_tiny(tiny_world), torch.device("cuda"), 1) is None
    assert (
        "memory plan for the closing memory line failed (OSError: headers unreadable)"
        in capsys.readouterr().err
    )
