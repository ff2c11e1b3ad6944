"""Recipe schema: every shipped recipe validates; mistakes name the key and the file; overrides are typed."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest
import yaml

from mergeopt.config import Recipe, load_recipe, parse_overrides, recipe_to_yaml
from mergeopt.errors import UserError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

MINIMAL = """
model:
  base: /ckpt/base
  experts: {math: /ckpt/math, code: /ckpt/code}
data:
  dev:
    - {name: math, path: /dev/math.jsonl}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert len(recipe.model.experts) >= 2
    assert load_recipe(path) == recipe


def test_shipped_recipes_include_tiny_and_8b():
    assert {"tiny.yaml", "8b.yaml"} <= {p.name for p in RECIPES}


def test_defaults_live_in_the_schema(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.optim.lr == Recipe.model_fields["optim"].default.lr
    assert recipe.weights.init is None
    assert recipe.data.target == "all" and recipe.model.stack_dtype == "float32"
    assert recipe.model.trust_remote_code is False


def test_the_removed_temperature_says_what_to_set_instead(tmp_path):
    path = write(tmp_path, MINIMAL + "weights:\n  temperature: 0.5\n")
    with pytest.raises(
        UserError, match=r"r\.yaml: weights: weights\.temperature was removed: .* set optim\.lr instead"
    ):
        load_recipe(path)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + "optim:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match=r"r\.yaml: optim\.lrr: unknown key"):
        load_recipe(path)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, MINIMAL + "optim:\n  steps: many\n")
    with pytest.raises(UserError, match=r"r\.yaml: optim\.steps: .*integer"):
        load_recipe(path)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "data:\n  dev: [{name: a, path: a.jsonl}]\n")
    with pytest.raises(UserError, match=r"model: required key is missing"):
        load_recipe(path)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{math: /ckpt/math, code: /ckpt/code}", "{math: /a, math: /b}"))
    with pytest.raises(UserError, match="duplicate key 'math'"):
        load_recipe(path)


def test_yaml_merge_keys_share_a_block_and_keys_beside_them_override(tmp_path):
    """``<<: *defaults`` was refused as 'could not determine a constructor for the tag ...merge'."""
    text = MINIMAL + "search: {strategy: grid, grid: &lattice {divisions: 4}}\n"
    text += "optim: &common {lr: 0.5, steps: 7}\ntrain: {data: {math: m.jsonl, code: c.jsonl}, <<: *common, steps: 3}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.train.lr == 0.5 and recipe.train.steps == 3  # merged, then overridden beside it
    assert recipe.optim.lr == 0.5 and recipe.search.grid.divisions == 4
    twice = MINIMAL + "optim: {<<: {lr: 0.5}, steps: 7, steps: 8}\n"
    with pytest.raises(UserError, match="duplicate key 'steps'"):
        load_recipe(write(tmp_path, twice))


def test_a_leading_tilde_in_a_path_is_the_home_directory(tmp_path, monkeypatch):
    """A recipe is YAML, which no shell expands: ``~/ckpt/math`` was looked for in a folder named '~'
    and reported missing. Every path a recipe names is expanded; a hub id or '~unknown' is not."""
    monkeypatch.setenv("HOME", str(tmp_path))
    text = (
        "output_dir: ~/runs/x\nmodel:\n  base: ~/ckpt/base\n  experts: {math: ~/ckpt/math, code: org/code-7b}\n"
        "data:\n  dev:\n    - {name: math, path: ~/dev/math.jsonl}\n  chat_template: ~/t.jinja\n"
        "rank: {grid: ~/grid.csv}\ncalibrate: {grid: ~nobody-such-user/grid.csv}\n"
        "train: {data: {math: ~/train/math.jsonl, code: c.jsonl}, output_dir: ~/runs/train}\n"
        "logging: {backends: [tensorboard], dir: ~/logs}\nworld: {cache_dir: ~/cache}\n"
    )
    recipe = load_recipe(write(tmp_path, text))
    home = str(tmp_path)
    assert recipe.model.base == f"{home}/ckpt/base" and recipe.output_dir == f"{home}/runs/x"
    assert recipe.model.experts == {"math": f"{home}/ckpt/math", "code": "org/code-7b"}
    assert (
        recipe.data.dev[0].path == f"{home}/dev/math.jsonl" and recipe.data.chat_template == f"{home}/t.jinja"
    )
    assert recipe.rank.grid == f"{home}/grid.csv" and recipe.calibrate.grid == "~nobody-such-user/grid.csv"
    assert recipe.train.data == {"math": f"{home}/train/math.jsonl", "code": "c.jsonl"}
    assert recipe.train.output_dir == f"{home}/runs/train"
    assert recipe.logging.dir == f"{home}/logs" and recipe.world.cache_dir == f"{home}/cache"
    overridden = load_recipe(write(tmp_path, MINIMAL), ["model.experts.code=~/ckpt/code"])
    assert overridden.model.experts["code"] == f"{home}/ckpt/code"


def test_one_expert_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL.replace(", code: /ckpt/code", ""))
    with pytest.raises(UserError, match=r"model\.experts: .*at least 2 experts"):
        load_recipe(path)


def test_overrides_are_typed_and_applied(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(
        path,
        [
            "optim.lr=0.25",
            "output_dir=/tmp/run",
            "optim.steps=7",
            "model.exclude=[norm, 'embed_tokens']",
            "weights.init={math: 0.3, code: 0.7}",
        ],
    )
    assert recipe.optim.lr == 0.25 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.steps == 7
    assert recipe.output_dir == "/tmp/run"
    assert recipe.model.exclude == ("norm", "embed_tokens")
    assert recipe.weights.init == {"math": 0.3, "code": 0.7}


def test_overrides_index_lists_as_errors_name_their_items(tmp_path):
    path = write(tmp_path, MINIMAL.replace("jsonl}\n", "jsonl}\n    - {name: code, path: /dev/code.jsonl}\n"))
    recipe = load_recipe(path, ["data.dev.1.weight=3", "data.dev.0.path=/elsewhere/math.jsonl"])
    assert [(d.name, d.path, d.weight) for d in recipe.data.dev] == [
        ("math", "/elsewhere/math.jsonl", 1.0),
        ("code", "/dev/code.jsonl", 3.0),
    ]
    # the key a validation error names is the key an override sets
    with pytest.raises(UserError, match=r"data\.dev\.1\.weight: -1(\.0)? is out of range: it must be >= 0"):
        load_recipe(path, ["data.dev.1.weight=-1"])
    with pytest.raises(UserError, match=r"data\.dev is a list of 2 item\(s\); index it with 0 to 1, not '2'"):
        load_recipe(path, ["data.dev.2.weight=1"])
    with pytest.raises(
        UserError, match=r"data\.dev is a list of 2 item\(s\); index it with 0 to 1, not 'math'"
    ):
        load_recipe(path, ["data.dev.math.weight=1"])
    with pytest.raises(UserError, match=r"override optim\.lr\.x: optim\.lr is not a section"):
        load_recipe(path, ["optim.lr=0.1", "optim.lr.x=1"])


def test_unknown_override_says_it_came_from_the_command_line(tmp_path):
    with pytest.raises(
        UserError, match=r"optim\.lrr: unknown key \(did you mean 'lr'\?\) \(set on the command line\)"
    ):
        load_recipe(write(tmp_path, MINIMAL), ["optim.lrr=0.1"])
    with pytest.raises(
        UserError, match=r"modle: unknown key \(did you mean 'model'\?\) \(set on the command line\)"
    ):
        load_recipe(write(tmp_path, MINIMAL), ["modle.base=x"])


def test_a_misspelt_key_is_the_error_not_the_key_it_left_missing(tmp_path):
    """``modle:`` for ``model:`` leaves model missing too: the typo is named, with the key it meant,
    in a section (``model.expert``) and in a list's item (``data.dev.0.pth``) alike."""
    recipe = MINIMAL.replace("model:", "modle:", 1)
    with pytest.raises(UserError, match=r"r\.yaml: modle: unknown key \(did you mean 'model'\?\)$"):
        load_recipe(write(tmp_path, recipe))
    with pytest.raises(UserError, match=r"r\.yaml: model\.expert: unknown key \(did you mean 'experts'\?\)$"):
        load_recipe(write(tmp_path, MINIMAL.replace("experts:", "expert:", 1)))
    with pytest.raises(UserError, match=r"data\.dev\.0\.pth: unknown key \(did you mean 'path'\?\)$"):
        load_recipe(write(tmp_path, MINIMAL.replace("path:", "pth:", 1)))
    with pytest.raises(UserError, match=r"optim\.zzz: unknown key$"):  # nothing close: no guess
        load_recipe(write(tmp_path, MINIMAL + "optim:\n  zzz: 1\n"))


def test_a_list_key_given_one_value_says_list(tmp_path):
    with pytest.raises(
        UserError,
        match=r"model\.exclude: should be a list, such as \[a, b\] \(YAML\), got 'lm_head' \(set on the command line\)",
    ):
        load_recipe(write(tmp_path, MINIMAL), ["model.exclude=lm_head"])


def test_a_section_check_of_an_overridden_key_says_it_came_from_the_command_line(tmp_path):
    """weights.init is checked by its section, whose error names the key: still the command line's."""
    path = write(tmp_path, MINIMAL)
    names = list(load_recipe(path).model.experts)
    init = "{" + ", ".join(f"{n}: 0.6" for n in names) + "}"
    with pytest.raises(UserError, match=r"weights\.init is not a mixture: .* \(set on the command line\)$"):
        load_recipe(path, [f"weights.init={init}"])
    with pytest.raises(UserError) as err:  # the same error from the file is not the command line's
        load_recipe(write(tmp_path, MINIMAL + f"weights:\n  init: {init}\n"))
    assert "command line" not in str(err.value)


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(UserError, match="override"):
        parse_overrides([bad])


def test_init_off_the_simplex_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"r\.yaml: weights\.init .*sum to 1"):
        load_recipe(write(tmp_path, MINIMAL), ["weights.init={math: 0.5, code: 0.6}"])
    with pytest.raises(UserError, match=r"weights\.init names .*experts are"):
        load_recipe(write(tmp_path, MINIMAL), ["weights.init={math: 0.5, chat: 0.5}"])


def test_target_must_name_a_dev_set(tmp_path):
    with pytest.raises(UserError, match="target 'chat'"):
        load_recipe(write(tmp_path, MINIMAL), ["data.target=chat"])


def test_bad_exclude_regex(tmp_path):
    with pytest.raises(UserError, match="not a valid regex"):
        load_recipe(write(tmp_path, MINIMAL), ["model.exclude=['(']"])


def test_a_surrogate_that_could_not_split_or_verify_is_refused(tmp_path):
    """Fewer seeds than two leaves of min_child_samples: LightGBM predicts one value for every
    candidate, so its picks would be arbitrary; more mixtures to verify than candidates."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(UserError, match=r"search\.surrogate: seeds=5 is fewer than 2 x min_child_samples=3"):
        load_recipe(path, ["search.surrogate.seeds=5"])
    assert load_recipe(path, ["search.surrogate.seeds=6"]).search.surrogate.seeds == 6
    assert load_recipe(path, ["search.surrogate.seeds=4", "search.surrogate.min_child_samples=2"])
    with pytest.raises(UserError, match=r"verify=10 is more than the 5 candidates it picks from"):
        load_recipe(path, ["search.surrogate.verify=10", "search.surrogate.candidates=5"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(UserError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, MINIMAL + "optim: [unclosed\n"))


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["optim.lr=0.3"])
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
    assert again == recipe
    assert yaml.safe_load(recipe_to_yaml(recipe))["optim"]["lr"] == 0.3


def test_recipe_is_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    with pytest.raises(pydantic.ValidationError):
        recipe.optim.lr = 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["weights.bounds={physics: [0, 0.5]}"],
            "weights.bounds names 'physics', which is not an expert (math, code)",
        ),
        (["weights.bounds={math: [0.6, 0.2]}"], "'math' has bounds [0.6, 0.2]; they need 0 <= lo <= hi <= 1"),
        (["weights.pinned={math: -0.1}"], "'math' is pinned at -0.1, below 0"),
        (["weights.pinned={math: 0.7, code: 0.6}"], "the pinned weights sum to 1.3, above 1"),
        (
            ["weights.pinned={math: 0.7}", "weights.bounds={math: [0, 0.5]}"],
            "weights.pinned 'math' is 0.7, outside",
        ),
        (
            ["weights.bounds={math: [0.7, 1], code: [0.4, 1]}"],
            "the lower bounds and pins sum to 1.1, above 1",
        ),
        (["weights.bounds={math: [0, 0.3]}", "weights.init={math: 0.5, code: 0.5}"], "weights.init breaks"),
        (["weights.max_epochs=5"], "weights.max_epochs caps repetition within weights.token_budget"),
        (["weights.token_budget=1000"], "weights.token_budget is only used by a repetition cap"),
        (["weights.samples={math: 3}"], "weights.samples is only used by a repetition cap"),
        (
            ["weights.unit=samples", "weights.max_epochs=5", "weights.token_budget=1000"],
            "weights.max_epochs caps repetition within weights.sample_budget (samples, weights.unit)",
        ),
        (
            [
                "weights.unit=samples",
                "weights.max_epochs=5",
                "weights.sample_budget=10",
                "weights.tokens={math: 3}",
            ],
            "weights.tokens counts tokens, but the cap counts samples (weights.unit): set "
            "weights.sample_budget and weights.samples instead",
        ),
        (
            ["weights.max_epochs=5", "weights.token_budget=10", "weights.samples={math: 3}"],
            "weights.samples counts samples, but the cap counts tokens (weights.unit)",
        ),
        (
            [
                "weights.unit=samples",
                "weights.max_epochs=5",
                "weights.sample_budget=10",
                "weights.samples={math: 0}",
            ],
            "'math' has 0 samples; a source has at least 1",
        ),
        (
            [
                "weights.unit=samples",
                "weights.max_epochs=5",
                "weights.sample_budget=10",
                "weights.samples={math: 3}",
            ],
            "weights.max_epochs needs each source's samples, but none are given for 'code'",
        ),
        (
            ["weights.max_epochs=5", "weights.token_budget=10", "weights.tokens={math: 3}"],
            "none are given for 'code'",
        ),
    ],
)
def test_constraints_are_checked_at_load_naming_the_culprit(tmp_path, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(write(tmp_path, MINIMAL), overrides)


def test_a_cap_in_samples_bounds_each_share_by_its_samples(tmp_path):
    overrides = [
        "weights.unit=samples",
        "weights.max_epochs=4",
        "weights.sample_budget=1000",
        "weights.samples={math: 200, code: 100}",  # caps 4 · 200 / 1000 = 0.8 and 0.4: w_code >= 0.2
        "weights.init={math: 0.9, code: 0.1}",  # above math's cap
    ]
    with pytest.raises(UserError, match=re.escape("weights.init breaks the constraints")):
        load_recipe(write(tmp_path, MINIMAL), overrides)
    recipe = load_recipe(write(tmp_path, MINIMAL), overrides[:-1])
    w = recipe.weights
    assert (w.cap_budget, w.source_sizes) == (1000, {"math": 200, "code": 100})
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "again.yaml"))
    assert again.weights == w


def test_a_feasible_constrained_recipe_loads_and_round_trips(tmp_path):
    overrides = [
        "weights.bounds={math: [0.2, 0.8]}",
        "weights.pinned={code: 0.3}",
        "weights.max_epochs=4",
        "weights.token_budget=1000",
        "weights.tokens={math: 200, code: 100}",  # math's cap: 4 · 200 / 1000 = 0.8
    ]
    recipe = load_recipe(write(tmp_path, MINIMAL), overrides)
    assert recipe.weights.constrained and recipe.weights.bounds == {"math": (0.2, 0.8)}
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "again.yaml"))
    assert again == recipe
    assert not load_recipe(write(tmp_path, MINIMAL)).weights.constrained


FOUR = "model.experts={python: /c/py, js: /c/js, gsm: /c/gsm, algebra: /c/alg}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["weights.groups={code: [python, ruby]}"],
            "weights.groups 'code' names 'ruby', which is not an expert (python, js, gsm, algebra)",
        ),
        (
            ["weights.groups={code: [python, js], scripts: [js]}"],
            "expert 'js' is in both 'code' and 'scripts'; an expert belongs to one group",
        ),
        (["weights.groups={code: [python, python]}"], "expert 'python' is in 'code' twice"),
        (["weights.groups={code: []}"], "group 'code' is empty; a group holds at least one expert"),
        (["weights.groups={gsm: [python, js]}"], "weights.groups 'gsm' is also an expert's name but holds"),
        (["weights.groups={../up: [python]}"], "weights.groups: group name '../up' may only use"),
        (  # groups combine with pins, but not with pins that leave no mixture
            [
                "weights.groups={code: [python, js]}",
                "weights.pinned={gsm: 0.6}",
                "weights.bounds={python: [0.5, 1]}",
                "search.strategy=dirichlet",
            ],
            "weights: no mixture meets the constraints: the lower bounds and pins sum to 1.1, above 1",
        ),
    ],
)
def test_groups_are_checked_at_load_naming_the_culprit(tmp_path, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(write(tmp_path, MINIMAL), [FOUR, *overrides])


@pytest.mark.parametrize("strategy", ["gradient", "dirichlet", "surrogate", "grid", "cmaes", "spsa"])
def test_groups_load_with_constraints_under_every_strategy(tmp_path, strategy):
    overrides = ["weights.groups={code: [python, js]}", "weights.pinned={gsm: 0.1}"]
    recipe = load_recipe(write(tmp_path, MINIMAL), [FOUR, *overrides, f"search.strategy={strategy}"])
    assert recipe.weights.groups == {"code": ["python", "js"]} and recipe.weights.pinned == {"gsm": 0.1}


def test_groups_load_round_trip_and_compose_with_constraints(tmp_path):
    groups = "weights.groups={code: [python, js], gsm: [gsm]}"  # a singleton may carry its expert's name
    recipe = load_recipe(write(tmp_path, MINIMAL), [FOUR, groups])
    assert recipe.weights.groups == {"code": ["python", "js"], "gsm": ["gsm"]}
    assert load_recipe(write(tmp_path, recipe_to_yaml(recipe), "again.yaml")) == recipe
    for strategy in ("grid", "cmaes", "spsa"):
        bounded = load_recipe(
            write(tmp_path, MINIMAL),
            [FOUR, groups, "weights.bounds={gsm: [0, 0.5]}", f"search.strategy={strategy}"],
        )
        assert bounded.weights.constrained and bounded.weights.groups


def test_relative_paths_are_anchored_where_they_exist(tmp_path):
    """A run's recipe.yaml names local paths absolutely: existing relative ones are anchored to the
    directory the command ran in, output_dir always; hub names, world paths, absolute paths and
    names that are not paths stay as written."""
    from mergeopt.config.loading import anchor_paths

    (tmp_path / "ckpt" / "math").mkdir(parents=True)
    (tmp_path / "dev.jsonl").write_text("{}\n")
    tree = {
        "output_dir": "runs/x",
        "model": {
            "base": "meta-llama/Llama-3.1-8B",
            "experts": {"math": "ckpt/math", "code": "tiny://experts/code"},
        },
        "data": {"dev": [{"name": "math", "path": "dev.jsonl"}, {"name": "code", "path": "/abs/dev.jsonl"}]},
        "rank": {"grid": None},
        "optim": {"lr": 0.1},
    }
    anchor_paths(tree, tmp_path)
    assert tree == {
        "output_dir": str(tmp_path / "runs" / "x"),
        "model": {
            "base": "meta-llama/Llama-3.1-8B",
            "experts": {"math": str(tmp_path / "ckpt" / "math"), "code": "tiny://experts/code"},
        },
        "data": {
            "dev": [
                {"name": "math", "path": str(tmp_path / "dev.jsonl")},
                {"name": "code", "path": "/abs/dev.jsonl"},
            ]
        },
        "rank": {"grid": None},
        "optim": {"lr": 0.1},
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["search.budget=44", "objective.normalize=experts", "objective.terms=[{kind: loss, dev: math}]"],
            "search.budget 44 is smaller than the surrogate's seeds + verify + the experts "
            "objective.normalize 'experts' scores (40 + 5 + 2 = 47)",
        ),
        (
            ["search.budget=45", "weights.init={math: 0.5, code: 0.5}"],
            "search.budget 45 is smaller than the surrogate's seeds + verify + the start (weights.init) "
            "(40 + 5 + 1 = 46)",
        ),
    ],
)
def test_a_surrogate_budget_counts_the_experts_and_the_start_when_the_recipe_is_read(
    tmp_path, overrides, message
):
    """The experts of a normalisation and the start count against search.budget; the surrogate
    refused such a budget only after loading the model and scoring the experts (full dev-set
    evaluations each), with a message the recipe-time check did not give."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(path, ["search.strategy=surrogate", *overrides])
    assert load_recipe(path, ["search.strategy=surrogate", "search.budget=47", *overrides[1:]])


def test_a_budget_below_the_experts_of_a_normalisation_is_refused_when_the_recipe_is_read(tmp_path):
    path = write(tmp_path, MINIMAL)
    terms = "objective.terms=[{kind: loss, dev: math}]"
    with pytest.raises(UserError, match="search.budget 1 cannot even score the 2 experts"):
        load_recipe(
            path, ["search.strategy=dirichlet", "search.budget=1", "objective.normalize=experts", terms]
        )


def test_train_options_the_training_does_not_read_are_named():
    """``train.lora.r`` with ``method: full`` and a lattice's ``divisions`` with Dirichlet mixtures
    were read by nothing, silently; train warns of each (the defaults a written recipe.yaml carries
    are not options set)."""
    from mergeopt.config.runs import TrainSection

    full = TrainSection(data={"a": "a.jsonl"}, lora={"r": 4}, mixtures={"kind": "dirichlet", "divisions": 4})
    assert full.unused_options() == [
        "train.lora.r 4 is read only with train.method lora",
        "train.mixtures.divisions 4 is read only with train.mixtures.kind lattice",
    ]
    lora = TrainSection(data={"a": "a.jsonl"}, method="lora", lora={"r": 4}, mixtures={"count": 10})
    assert lora.unused_options() == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["weights.bounds={math: [0, on]}"], "weights.bounds: math.1: true is not a number"),
        (
            ["model.device_map={lm_head: yes}", "model.max_memory={0: 1000}"],
            "model.device_map: lm_head: true is not a number",
        ),
        (["model.device_map=auto", "model.max_memory={0: yes}"], "model.max_memory: 0: true is not a number"),
        (["optim.steps=off"], "optim.steps: false is not a number"),
    ],
)
def test_a_yes_or_no_is_refused_wherever_a_number_is_read(tmp_path, overrides, message):
    """YAML's unquoted yes/no/on/off is a boolean, which pydantic's lax mode took as 1 or 0 in a
    bounds pair ([0, on] as [0.0, 1.0]), a mixture of train.mixtures.weights and a device_map's
    device (yes as GPU 1), as it did in number fields before they were checked."""
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(write(tmp_path, MINIMAL), overrides)


def test_a_yes_or_no_in_a_training_mixture_is_refused(tmp_path):
    text = MINIMAL + (
        "train:\n  data: {math: /d/math.jsonl, code: /d/code.jsonl}\n  output_dir: /tmp/o\n"
        "  mixtures: {kind: list, weights: [{math: 0.5, code: 0.5}, {math: on, code: off}]}\n"
    )
    with pytest.raises(UserError, match=re.escape("train.mixtures.weights: 1.math: true is not a number")):
        load_recipe(write(tmp_path, text))
