"""The shared checks up front (mergeopt.inputs) and the one-line argparse errors of every verb."""

from __future__ import annotations

import math
import os

import pytest

from mergeopt import cli, inputs, worlds
from mergeopt.errors import UserError, run_cli
from tests.conftest import REPO, run_module
from tests.malformed import UNCREATABLE


def _message(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    return str(caught.value)


def test_a_path_of_the_wrong_kind_is_named_as_such(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert _message(lambda: inputs.existing_file(tmp_path / "d", "recipe")).endswith(
        "d is a directory, not a file"
    )
    assert _message(lambda: inputs.existing_dir(tmp_path / "f", "checkpoint")).endswith(
        "f is a file, not a directory"
    )
    assert _message(lambda: inputs.existing_file(tmp_path / "no", "recipe")).endswith("no does not exist")
    assert "broken symbolic link" in _message(lambda: inputs.existing_file(tmp_path / "link", "recipe"))
    assert inputs.existing(tmp_path / "d", "x") == inputs.existing_dir(tmp_path / "d", "x")


@pytest.mark.parametrize(
    "check, wanted",
    [
        (inputs.existing_file, "give a path"),
        (inputs.existing_dir, "give a path"),
        (inputs.existing, "give a path"),
        (inputs.writable_dir, "name a directory for the outputs (e.g. runs/NAME)"),
        (inputs.writable_file, "name a file to write"),
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_directory(check, wanted):
    """Also where a command writes: ``export --out ''`` wrote its file into the current directory."""
    assert _message(lambda: check("", "recipe")) == f"recipe is empty: {wanted}"


def test_an_output_directory_is_checked_without_leaving_anything(tmp_path):
    (tmp_path / "f").write_text("x")
    assert inputs.writable_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert inputs.writable_dir(tmp_path, "--out") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe is gone, nothing created
    assert _message(lambda: inputs.writable_dir(tmp_path / "f", "--out")).endswith(
        "f is a file, not a directory"
    )
    under_file = _message(lambda: inputs.writable_dir(tmp_path / "f" / "sub", "output_dir"))
    assert under_file.endswith("cannot be created: " + str(tmp_path / "f") + " is a file, not a directory")
    assert "cannot be created in /proc" in _message(lambda: inputs.writable_dir(UNCREATABLE, "--out"))
    assert "is a directory, not a file" in _message(lambda: inputs.writable_file(tmp_path, "--out"))
    assert "cannot be created" in _message(lambda: inputs.writable_file(UNCREATABLE + "/x.yaml", "--out"))


def test_two_names_for_one_output_directory_are_refused(tmp_path):
    """``train`` published expert beta whole over expert alpha when both named one directory."""
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    inputs.distinct_dirs({"x": tmp_path / "a", "y": tmp_path / "b", "z": tmp_path / "a" / "b"})
    for other in (tmp_path / "link", tmp_path / "." / "a", tmp_path / "b" / ".." / "a"):
        assert _message(lambda other=other: inputs.distinct_dirs({"x": tmp_path / "a", "y": other})) == (
            f"x and y are the same directory {other}: each needs its own"
        )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_directory_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert "Permission denied" in _message(lambda: inputs.writable_dir(tmp_path / "ro" / "out", "--out"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1", True, None])
def test_numbers_must_be_finite_numbers(bad):
    assert "--x is" in _message(lambda: inputs.finite(bad, "--x"))


def test_number_bounds_refuse_nan_too():
    assert inputs.finite(0.5, "w", at_least=0, at_most=1) == 0.5
    assert "above 0" in _message(lambda: inputs.finite(0, "lr", above=0))
    assert "at most 1" in _message(lambda: inputs.finite(2, "w", at_most=1))
    assert "not a finite number" in _message(lambda: inputs.finite(math.nan, "w", at_most=1))


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, "3", True])
def test_seeds_are_whole_numbers_from_0_to_2_63_minus_1(bad):
    assert inputs.seed(2**63 - 1, "seed") == 2**63 - 1
    assert "seed is" in _message(lambda: inputs.seed(bad, "seed"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must hold a JSON object, not list"),
        ('{"a": ', "is not valid JSON (line 1"),
        (b"\xff\xfe", "is not UTF-8 text"),
    ],
)
def test_a_json_file_must_parse_as_an_object(tmp_path, text, message):
    path = tmp_path / "m.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert message in _message(lambda: inputs.json_file(path, "mixture"))


def test_a_truncated_safetensors_file_is_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(path))
    assert inputs.safetensors_header(path) == {"a": ((64, 64), "F32")}
    os.truncate(path, path.stat().st_size // 2)
    assert "not a readable safetensors file" in _message(lambda: inputs.safetensors_header(path))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] is 0, not a positive whole number"),
        ({"rank_pattern": {"q_proj": 2.5}}, "not a positive whole number"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern['q_proj'] is 'big', not a positive number"),
        ({"alpha_pattern": {"q_proj": math.nan}}, "not a positive number"),
        ({"alpha_pattern": {"(": 1}}, "alpha_pattern key '(' is not a valid regex"),
        ({"rank_pattern": [1]}, "rank_pattern must be an object"),
    ],
)
def test_lora_patterns_are_what_peft_reads(config, message):
    inputs.lora_patterns({"rank_pattern": {"q_proj": 4}, "alpha_pattern": {r"layers\.0\..*": 8.0}}, "cfg")
    assert message in _message(lambda: inputs.lora_patterns(config, "cfg"))


def test_lora_targets_follow_peft_s_rule():
    names = ["", "model", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    inputs.lora_targets(["q_proj", "up_proj", "model.layers.0.mlp.up_proj"], names, "targets")
    message = _message(lambda: inputs.lora_targets(["proj"], names, "train.lora.target_modules"))
    assert message.startswith("train.lora.target_modules 'proj' matches no module of the base")
    assert message.endswith("(its modules end in: model, q_proj, up_proj)")  # no layer numbers


# ----------------------------------------------------------------------------- argparse


@pytest.mark.parametrize("verb", list(cli.HANDLERS))
def test_every_verb_s_argparse_errors_are_one_line(verb, capsys):
    code = run_cli(lambda argv: cli.run_command(verb, argv), ["--no-such-option", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("mergeopt: error: ") and f"(see mergeopt {verb} --help)" in err


@pytest.mark.parametrize(
    "argv", [[], ["nope"], ["rank", "--seed", "-1"], ["export", "m.json", "--to", "x", "--max-epochs", "inf"]]
)
def test_the_root_command_s_argparse_errors_are_one_line(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mergeopt: error: "), err


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["fitt", "r.yaml"], "(did you mean 'fit'?) (see mergeopt --help)"),
        (["fit", "r.yaml", "--dry_run"], "--dry_run (did you mean '--dry-run'?) (see mergeopt fit --help)"),
        (["plan", "r.yaml", "--world_size=2"], "(did you mean '--world-size'?) (see mergeopt plan --help)"),
        (
            ["export", "m.json", "--weights-are", "token"],
            "(did you mean 'tokens'?) (see mergeopt export --help)",
        ),
        (
            ["export", "m.json", "--to", "llamafactry"],
            "'llamafactry' (did you mean 'llamafactory'?); known: ",
        ),
        (["fit", "r.yaml", "--zzz"], None),  # nothing close: no suggestion
    ],
)
def test_a_mistyped_verb_option_or_choice_names_the_closest_one(argv, suggestion, capsys):
    """argparse's message (its wording varies with Python's version) with the closest name added."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergeopt: error: ") and err.count("\n") == 1, err
    if suggestion is None:
        assert "did you mean" not in err and err.endswith("--zzz (see mergeopt fit --help)\n")
    else:
        assert suggestion in err, err


def test_a_python_m_alias_says_its_own_name_in_one_line():
    done = run_module("transfer", "a.csv", "b.csv", "--seed", str(2**63))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"mergeopt: error: argument --seed: '{2**63}' is not a seed (a whole number from 0 to 2^63 - 1) "
        "(see python -m mergeopt.transfer --help)"
    ]


def test_help_is_argparse_s_own(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["fit", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mergeopt fit [-h]") and "--dry-run" in out


# ----------------------------------------------------------------------------- the world cache


def test_a_world_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("MERGEOPT_CACHE", str(tmp_path / "cache"))
    message = _message(lambda: worlds.ensure("tiny", log=lambda _m: None))
    assert message == f"MERGEOPT_CACHE {tmp_path / 'cache'} is a file, not a directory"
    monkeypatch.setenv("MERGEOPT_CACHE", UNCREATABLE)
    assert _message(lambda: worlds.ensure("tiny", log=lambda _m: None)).startswith(
        f"MERGEOPT_CACHE {UNCREATABLE}"
    )
    assert "world.cache_dir" in _message(lambda: worlds.ensure("tiny", str(tmp_path / "cache"), log=print))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_plan_says_the_world_cache_is_a_file_not_that_it_would_build_there(tmp_path, monkeypatch):
    """A dry run builds no world: it said 'run once without --dry-run to build it', which would only
    have met the same file."""
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("MERGEOPT_CACHE", str(tmp_path / "cache"))
    message = _message(lambda: cli.run_command("plan", [str(REPO / "recipes" / "tiny.yaml")]))
    assert message == f"MERGEOPT_CACHE {tmp_path / 'cache'} is a file, not a directory"
    monkeypatch.setenv("MERGEOPT_CACHE", str(tmp_path / "empty"))
    message = _message(lambda: cli.run_command("plan", [str(REPO / "recipes" / "tiny.yaml")]))
    assert message.endswith(f"builds it into {tmp_path / 'empty' / worlds.world_dir('tiny', '').name})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# ----------------------------------------------------------------------------- the environment


@pytest.mark.parametrize(
    "environ, message",
    [
        (
            {"WORLD_SIZE": "abc"},
            "WORLD_SIZE='abc' in the environment is not a number of processes (1 or more)",
        ),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment is not a number of processes (1 or more)"),
        ({"WORLD_SIZE": "1.5"}, "WORLD_SIZE='1.5' in the environment is not a number of processes"),
        ({"RANK": "x"}, "RANK='x' in the environment is not a process rank (0 or more)"),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' in the environment is not a process rank (0 or more)"),
        ({"RANK": "1"}, "RANK=1 in the environment is not below WORLD_SIZE=1: a process rank runs from 0"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 in the environment is not below WORLD_SIZE=2"),
        ({"MERGEOPT_FAULT": "sigkill@step"}, "MERGEOPT_FAULT='sigkill@step' is not SIGNAL@POINT:N"),
        ({"MERGEOPT_FAULT": " "}, "MERGEOPT_FAULT=' ' is not SIGNAL@POINT:N"),
    ],
)
def test_the_environment_is_checked_before_any_work(environ, message):
    assert _message(lambda: inputs.environment(environ)).startswith(message)


def test_torchrun_s_variables_unset_or_empty_are_one_process():
    """``WORLD_SIZE=`` was one process to a plan and ``int('')``, a traceback, to a fit."""
    inputs.environment({})
    inputs.environment({"WORLD_SIZE": "", "RANK": " ", "LOCAL_RANK": "", "MERGEOPT_FAULT": ""})
    inputs.environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MERGEOPT_FAULT": "sigint@step:2"})
    assert [inputs.torchrun_variable(n, {n: ""}) for n in ("WORLD_SIZE", "RANK", "LOCAL_RANK")] == [1, 0, 0]
    assert inputs.torchrun_variable("WORLD_SIZE", {"WORLD_SIZE": " 8 "}) == 8


@pytest.mark.parametrize(
    "verb, argv",
    [
        ("merge", ["nope.yaml", "--weights", "a=1", "--out", "OUT"]),
        ("fit", ["nope.yaml", "--out", "OUT"]),
        ("train", ["nope.yaml", "--out", "OUT"]),
        ("export", ["nope.json", "--to", "trl", "--out", "OUT"]),
        ("rank", ["--proxy", "p.csv", "--truth", "t.csv", "--out", "OUT"]),
    ],
)
def test_every_command_checks_the_environment_first(verb, argv, tmp_path, monkeypatch, capsys):
    """merge and export ignored WORLD_SIZE=abc; fit and diagnose read it with int() once their work
    had begun, a traceback."""
    monkeypatch.setenv("WORLD_SIZE", "abc")
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert run_cli(lambda rest: cli.run_command(verb, rest), argv) == 2
    assert capsys.readouterr().err == (
        "mergeopt: error: WORLD_SIZE='abc' in the environment is not a number of processes (1 or more)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "verb, argv",
    [
        ("merge", ["RECIPE", "--weights", "alpha=0.2,beta=0.5,gamma=0.3", "--out", "OUT"]),
        ("train", ["nope.yaml", "--out", "OUT"]),
        ("export", ["nope.json", "--to", "trl", "--out", "OUT"]),
        ("transfer", ["small.csv", "large.csv", "--out", "OUT"]),
        ("diagnose", ["nope.yaml", "--out", "OUT"]),
    ],
)
def test_a_one_process_command_refuses_torchrun(verb, argv, random_world, tmp_path, monkeypatch, capsys):
    """``torchrun --nproc-per-node 3 -m mergeopt merge ...`` merged three times: the first rank
    published the checkpoint, the other two failed on the directory it had just filled (exit 2 each,
    torchrun's ChildFailedError, exit 1). A verb that never joins the group says so in one line."""
    import yaml

    from tests.conftest import recipe_tree

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree(random_world, tmp_path / "run")))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else str(recipe) if a == "RECIPE" else a for a in argv]
    assert run_cli(lambda rest: cli.run_command(verb, rest), argv) == 2
    assert capsys.readouterr().err == (
        f"mergeopt: error: mergeopt {verb} runs in one process, not as one of WORLD_SIZE=3 (torchrun's): "
        "start it without torchrun\n"
    )
    assert not out.exists()


def test_a_process_group_without_its_rendezvous_is_one_line():
    """WORLD_SIZE=2 outside torchrun was torch's ValueError from inside init_process_group."""
    from mergeopt.runtime.distributed import check_rendezvous

    assert _message(lambda: check_rendezvous(2, {"WORLD_SIZE": "2", "RANK": "0"})).startswith(
        "WORLD_SIZE=2 in the environment says this is one of 2 processes, but MASTER_ADDR, MASTER_PORT "
        "are not set: start it with torchrun --nproc_per_node=2"
    )
    rendezvous = {"MASTER_ADDR": "localhost", "MASTER_PORT": "http", "RANK": "1"}
    assert _message(lambda: check_rendezvous(2, rendezvous)) == (
        "MASTER_PORT='http' in the environment is not a port (1 to 65535)"
    )
    check_rendezvous(2, {**rendezvous, "MASTER_PORT": "29500"})


# ----------------------------------------------------------------------------- tolerance tests and NaN


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, on inf - inf
def test_sum_to_one_tests_refuse_nan_and_inf_minus_inf():
    """``abs(x - 1) > tol`` is false for NaN; each sum-to-one test is written ``not abs(...) <= tol``."""
    import numpy as np
    import pandas as pd

    from mergeopt.evaluation.table_checks import check_mixture_rows, check_weights
    from mergeopt.merging.simplex import sum_problem

    assert "sum to nan" in sum_problem({"a": math.nan, "b": 0.5})
    rows = np.array([[math.inf, -math.inf], [0.5, 0.5]])
    with pytest.raises(UserError, match=r"^T line 2: weights sum to nan, not 1"):
        check_mixture_rows(rows, ["w_a", "w_b"], lambda i: f"T line {i + 2}", allow_negative=True)
    table = pd.DataFrame({"w_a": ["inf", 0.5], "w_b": ["-inf", 0.5]})  # a table refuses them sooner
    with pytest.raises(
        UserError, match=r"^T line 2: column w_a \(a mixture weight\) is empty or not a finite"
    ):
        check_weights(table, ["w_a", "w_b"], "T")
