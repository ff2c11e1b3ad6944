"""``mergeopt plan --json``: the same plan as the printed table, as one JSON document on stdout, for
scripts that sweep recipes (tests/test_plan.py checks the plan's numbers themselves)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from mergeopt.config import load_recipe
from mergeopt.memory import dry_run, plan_table
from mergeopt.memory.plan_document import SCHEMA_VERSION, PlanDocument
from mergeopt.memory.sizes import GIB
from tests.conftest import REPO, run_in_process
from tests.test_plan import EXPERTS_8B, LLAMA_8B


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    """Llama-3.1-8B's config.json alone (no weights) and the overrides pointing recipes/8b.yaml at it."""
    path = tmp_path_factory.mktemp("llama8b-json")
    LlamaConfig(**LLAMA_8B).save_pretrained(path)
    return [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]


def _plan_json(*args: str) -> tuple[dict, str]:
    result = run_in_process("plan", "recipes/8b.yaml", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_the_document_holds_the_tables_rows_and_verdict(llama_8b):
    """The rows, peak and verdict of the printed table, in bytes: held rows plus the largest phase
    make the peak; an 80 GB GPU fits it with the spare the table prints."""
    doc, _ = _plan_json(*llama_8b, "--device-memory", "79")
    recipe = load_recipe(REPO / "recipes" / "8b.yaml", llama_8b)
    plan, inventory, _ = dry_run.make_plan(recipe, None, 79)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["recipe"] == "recipes/8b.yaml"
    assert doc["parameters"] == plan.parameters == 8_030_261_248
    assert doc["experts"] == 4 and doc["world_size"] == 1 and doc["shard"] == "none"
    assert doc["overrides"] == llama_8b
    assert [(r["label"], r["bytes"]) for r in doc["held"]] == [(r.label, r.bytes) for r in plan.held]
    assert [(r["label"], r["bytes"]) for r in doc["phases"]] == [(r.label, r.bytes) for r in plan.phases]
    assert doc["peak"] == sum(r["bytes"] for r in doc["held"]) + max(r["bytes"] for r in doc["phases"])
    assert doc["peak"] == plan.peak and doc["peak_gib"] == pytest.approx(plan.peak / GIB, abs=1e-4)
    assert doc["fits"] is True and doc["spare"] == doc["device"]["free"] - doc["peak"]
    assert doc["device"] == {"name": "cuda", "description": "as given by --device-memory"} | {
        "total": int(79 * GIB),
        "free": int(79 * GIB),
    }
    assert doc["notes"] == list(inventory.notes) and doc["suggestions"] == [] and doc["placement"] == []
    table = run_in_process("plan", "recipes/8b.yaml", *llama_8b, "--device-memory", "79").stdout
    assert f"fits ({plan_table.gib(doc['spare'])} GiB to spare on cuda)" in table


def test_a_plan_that_does_not_fit_lists_each_override_with_its_saving(llama_8b):
    doc, _ = _plan_json(*llama_8b, "--device-memory", "40")
    assert doc["fits"] is False and doc["spare"] < 0
    overrides = {s["override"]: s["saves"] for s in doc["suggestions"]}
    assert overrides["model.stack_dtype=int8"] > 0
    assert doc["peak_with_suggestions"] < doc["peak"]


def test_per_rank_plans_and_unknown_devices(llama_8b):
    """Under --world-size 8 with the stack sharded the rows are per rank; planned for a GPU this
    machine does not have, whether it fits is not known (null), as the table says "not checked"."""
    doc, _ = _plan_json(*llama_8b, "--world-size", "8", "model.shard=fsdp", "device=cuda")
    assert doc["world_size"] == 8 and doc["shard"] == "fsdp"
    single, _ = _plan_json(*llama_8b, "device=cuda")
    assert doc["peak"] < single["peak"] / 4
    if doc["device"]["free"] is None:  # no CUDA here
        assert doc["fits"] is None and doc["spare"] is None


def test_stdout_is_the_document_alone_and_a_mistake_is_one_line(llama_8b, tmp_path):
    """Warnings about inputs the plan does not read stay on stderr, so stdout parses; a user's
    mistake is one line on stderr, exit code 2, and no document."""
    doc, stderr = _plan_json(*llama_8b, "data.dev.0.path=/not/here.jsonl")
    assert PlanDocument.model_validate(doc).schema_version == SCHEMA_VERSION  # it reads back
    assert "the fit would refuse this recipe" in stderr
    bad = run_in_process("plan", "recipes/8b.yaml", *llama_8b, "model.stack_dtype=int3", "--json")
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "model.stack_dtype" in bad.stderr


def test_fit_dry_run_json_is_mergeopt_plan_json(llama_8b):
    """`mergeopt fit --dry-run --json` prints the document `mergeopt plan --json` prints."""
    via_fit = run_in_process(
        "fit", "recipes/8b.yaml", *llama_8b, "--dry-run", "--json", "--device-memory", "79"
    )
    assert via_fit.returncode == 0, via_fit.stderr
    assert json.loads(via_fit.stdout) == _plan_json(*llama_8b, "--device-memory", "79")[0]
