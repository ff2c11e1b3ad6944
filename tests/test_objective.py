"""The Objective read once from the recipe, and the modules below the command layer that receive it.

Checked: the default term and the set weights against values worked out by hand, and, over the
source (ast), that scoring, term_scores, proxy and zero_order neither import the Recipe nor take
a ``recipe`` argument, and that rank's only function taking one is its command entry.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from mergeopt.config import ObjectiveTerm, recipe_from_dict
from mergeopt.objectives.objective import Objective
from tests.conftest import recipe_tree

PACKAGE = Path(__file__).parent.parent / "mergeopt"
BELOW_THE_COMMANDS = [
    "objectives/scoring.py",
    "objectives/term_scores.py",
    "evaluation/proxy.py",
    "search/zero_order.py",
    "search/strategy.py",
]
WORLD = {
    "base": "b",
    "experts": {"alpha": "a", "beta": "c"},
    "dev": {"arith": "x.jsonl", "markov": "y.jsonl"},
}


def _objective(**sections) -> Objective:
    tree = recipe_tree(WORLD, Path("out"), **sections)
    tree["data"]["dev"][1]["weight"] = 3.0
    return Objective.from_recipe(recipe_from_dict(tree))


def test_without_terms_the_objective_is_the_loss_of_the_target():
    objective = _objective()
    assert [(t.kind, t.dev) for t in objective.terms] == [("loss", "all")]
    assert objective.dev_names == ("arith", "markov") and objective.dev_weights == (1.0, 3.0)
    assert objective.batch_size == 16 and objective.normalize == "none" and objective.metric_terms == ()
    assert objective.target == "all"
    torch.testing.assert_close(objective.loss_set_weights(), torch.tensor([0.25, 0.75]))  # d / Σd


def test_set_weights_of_a_target_set_and_of_metric_terms():
    tree = recipe_tree(WORLD, Path("out"))
    tree["data"]["target"] = "markov"
    one = Objective.from_recipe(recipe_from_dict(tree))
    torch.testing.assert_close(one.loss_set_weights(), torch.tensor([0.0, 1.0]))
    metrics = _objective(
        objective={"terms": [{"kind": "exact_match", "dev": "arith"}, {"kind": "loss", "dev": "markov"}]},
        search={"strategy": "grid"},
    )
    assert [t.label for t in metrics.metric_terms] == ["exact_match:arith"]
    with pytest.raises(ValueError, match="loss terms only"):
        metrics.loss_set_weights()
    # the dev loss reported beside the metrics: the data weights of the sets data.target names ('all')
    torch.testing.assert_close(metrics.reported_set_weights(), torch.tensor([1.0, 3.0]))


def _functions_taking_a_recipe(tree: ast.Module) -> list[str]:
    return [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and any(a.arg == "recipe" for a in node.args.args + node.args.kwonlyargs)
    ]


def _imports_the_recipe(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom) and any(alias.name == "Recipe" for alias in node.names)
        for node in ast.walk(tree)
    )


@pytest.mark.parametrize("module", BELOW_THE_COMMANDS)
def test_modules_below_the_commands_receive_parts_not_the_recipe(module):
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    assert not _imports_the_recipe(tree)
    assert _functions_taking_a_recipe(tree) == []


def test_rank_reads_the_recipe_only_in_its_command_entry():
    tree = ast.parse((PACKAGE / "evaluation" / "rank.py").read_text(encoding="utf-8"))
    assert not _imports_the_recipe(tree)
    assert _functions_taking_a_recipe(tree) == ["_grid_run"]
    # the checks see what they look for: the command layer does take the recipe
    fit = ast.parse((PACKAGE / "fit.py").read_text(encoding="utf-8"))
    assert _imports_the_recipe(fit) and "fit" in _functions_taking_a_recipe(fit)


def test_mixture_json_records_each_term_with_the_fields_its_kind_reads():
    """A loss term has no direction and no generation settings; every other kind keeps what it reads."""
    from mergeopt.config.objective import ObjectiveTerm

    records = [
        ObjectiveTerm(kind="loss").record(),
        ObjectiveTerm(kind="exact_match", dev="arith", stop=[]).record(),
        ObjectiveTerm(kind="choice_accuracy", dev="arith", weight=2.0).record(),
        ObjectiveTerm(
            kind="custom", dev="arith", function="m:f", higher_is_better=False, name="lat"
        ).record(),
        ObjectiveTerm(kind="lm_eval", task="hellaswag", metric="acc_norm", limit=5).record(),
    ]
    assert records == [
        {"kind": "loss", "dev": "all", "weight": 1.0, "label": "loss:all"},
        {
            "kind": "exact_match",
            "dev": "arith",
            "weight": 1.0,
            "max_new_tokens": 32,
            "stop": (),
            "label": "exact_match:arith",
        },
        {
            "kind": "choice_accuracy",
            "dev": "arith",
            "weight": 2.0,
            "length_normalize": False,
            "label": "choice_accuracy:arith",
        },
        {
            "kind": "custom",
            "dev": "arith",
            "weight": 1.0,
            "name": "lat",
            "function": "m:f",
            "higher_is_better": False,
            "label": "lat",
        },
        {
            "kind": "lm_eval",
            "weight": 1.0,
            "higher_is_better": True,
            "task": "hellaswag",
            "metric": "acc_norm",
            "limit": 5,
            "label": "lm_eval:hellaswag",
        },
    ]


@pytest.mark.parametrize("function", ["my_metrics.score", "my_metrics/score.py:score", "my_metrics:"])
def test_a_misspelt_custom_function_is_named_not_reported_missing(function):
    """A function that is there but not 'package.module:function' is named as given; the message
    for a missing one ("needs function") sent users looking for a key they had set."""
    with pytest.raises(ValueError, match=f"a custom term's function '{re.escape(function)}' is not"):
        ObjectiveTerm(kind="custom", dev="arith", function=function)
    with pytest.raises(ValueError, match="a custom term needs function"):
        ObjectiveTerm(kind="custom", dev="arith")


@pytest.mark.parametrize(
    ("term", "message"),
    [
        (
            {"kind": "loss", "dev": "arith", "max_new_tokens": 5},
            "max_new_tokens is only for kind 'exact_match', not 'loss'",
        ),
        (
            {"kind": "exact_match", "dev": "arith", "limit": 50},
            "limit is only for kind 'lm_eval', not 'exact_match'",
        ),
        (
            {"kind": "exact_match", "dev": "arith", "length_normalize": True},
            "length_normalize is only for kind 'choice_accuracy'",
        ),
        (
            {"kind": "choice_accuracy", "dev": "arith", "stop": []},
            "stop is only for kind 'exact_match', not 'choice_accuracy'",
        ),
        (
            {"kind": "exact_match", "dev": "arith", "higher_is_better": False},
            "higher_is_better is only for kind 'custom' or 'lm_eval'",
        ),
        (
            {"kind": "custom", "dev": "arith", "function": "m:f", "metric": "acc_norm"},
            "metric is only for kind 'lm_eval', not 'custom'",
        ),
    ],
)
def test_an_option_another_kind_reads_is_refused_not_ignored(term, message):
    """``limit: 50`` on an exact_match term (to generate for fewer records) or ``max_new_tokens`` on
    a loss term did nothing, silently, where ``function`` and ``task`` off their kinds are refused."""
    with pytest.raises(ValueError, match=re.escape(message)):
        ObjectiveTerm(**term)


def test_a_written_recipe_with_every_default_still_loads():
    """recipe.yaml writes every field of a term, defaults included: those are not options set."""
    for kind, extra in [
        ("loss", {}),
        ("exact_match", {}),
        ("choice_accuracy", {}),
        ("custom", {"function": "m:f"}),
    ]:
        full = ObjectiveTerm(kind=kind, dev="arith", **extra).model_dump()
        assert ObjectiveTerm(**full).model_dump() == full
    full = ObjectiveTerm(kind="lm_eval", task="t").model_dump()
    assert ObjectiveTerm(**full).model_dump() == full
