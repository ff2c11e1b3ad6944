"""The `mergeopt` console script: one parser tree, shared options, aliases, one error handler.

Compared against: the handlers each verb names (they exist and take the parsed namespace), the
`python -m` aliases' output (the same as the verb's), and the exit codes a shell expects.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points

import pytest

import mergeopt
from mergeopt import cli, cli_options
from mergeopt.errors import Interrupted, UserError, run_cli
from tests.conftest import REPO, repo_pythonpath

ENV = {**os.environ, "PYTHONPATH": repo_pythonpath()}
ALIASES = list(cli.HANDLERS)  # every verb has its python -m alias, as the README says


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120, **kwargs
    )


def test_the_console_script_is_declared_and_points_at_cli_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mergeopt": "mergeopt.cli:main"}
    installed = {e.name: e.value for e in entry_points(group="console_scripts") if e.name == "mergeopt"}
    assert installed == {"mergeopt": "mergeopt.cli:main"}


def test_version_and_help_answer_without_importing_torch():
    code = (
        "import sys; from mergeopt.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "for verb in ('fit', 'rank', 'transfer'):  # a verb's help, and a mistyped option\n"
        "    for argv in ([verb, '--help'], [verb, 'r.yaml', '--no-such-option']):\n"
        "        try:\n            code = main(argv)\n        except SystemExit as e:\n            code = e.code\n"
        "        assert code == (0 if '--help' in argv else 2), (argv, code)\n"
        "assert 'torch' not in sys.modules, 'the parser tree imported torch'\n"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr
    assert f"mergeopt {mergeopt.__version__}" in done.stdout
    for verb in cli.HANDLERS:
        assert f"    {verb} " in done.stdout


@pytest.mark.parametrize("verb", list(cli.HANDLERS))
def test_every_verb_has_a_handler_taking_the_namespace_and_the_shared_options(verb):
    module, _, function = cli.HANDLERS[verb].partition(":")
    handler = getattr(importlib.import_module(module), function)
    assert callable(handler)
    options = {o for a in cli.command_parser(verb)._actions for o in a.option_strings}
    assert {"--quiet", "--debug", "--help"} <= options
    tree = cli.build_parser()
    sub = next(a for a in tree._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    assert {o for a in sub._actions for o in a.option_strings} == options  # the tree and the verb agree
    for parser in (cli.command_parser(verb), sub):  # every help ends with its example
        assert f"Example: {cli.EXAMPLES[verb]}" in " ".join(parser.format_help().split())


def test_the_tree_lists_exactly_the_handled_verbs():
    tree = cli.build_parser()
    sub = next(a for a in tree._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(cli.HANDLERS) == list(cli.HELP) == list(cli.EXAMPLES)


def test_rank_help_names_the_mode_of_every_option_its_other_mode_refuses():
    # --k and --bootstrap read "top-k size (default 3)" while grid mode refused them with a recipe
    from mergeopt.evaluation.rank import GRID_OPTIONS, TABLE_OPTIONS

    helps = {o: a.help for a in cli.command_parser("rank")._actions for o in a.option_strings}
    for flags, mode in ((TABLE_OPTIONS, "table mode: "), (GRID_OPTIONS, "grid mode: ")):
        for flag in flags.values():
            assert helps[flag].startswith(mode), flag


def test_out_is_the_recipe_key_of_fit_and_train_and_both_at_once_is_refused():
    args = cli.parse("fit", ["r.yaml", "optim.lr=0.1", "--out", "/tmp/x", "--quiet"])
    assert args.overrides == ["optim.lr=0.1", "output_dir='/tmp/x'"] and args.quiet
    args = cli.parse("train", ["r.yaml", "--out", "runs"])
    assert args.overrides == ["train.output_dir='runs'"]
    with pytest.raises(UserError, match="--out and a output_dir= override both name where fit writes"):
        cli.parse("fit", ["r.yaml", "output_dir=a", "--out", "b"])


@pytest.mark.parametrize("out", ["2024", "yes", "~", "#1", "null", "it's", "[x]", "a: b"])
def test_out_is_a_path_whatever_yaml_would_read_it_as(out):
    """``--out 2024`` was read as YAML, an integer, and refused as 'output_dir: Input should be a
    valid string' (``--out yes`` a boolean, ``--out '#1'`` a comment, so null). A leading '~' is the
    home directory, as in any recipe path (the home directory itself is then refused as an output)."""
    from mergeopt.config import load_recipe

    recipe = REPO / "recipes" / "tiny.yaml"
    read = load_recipe(recipe, cli.parse("fit", [str(recipe), "--out", out]).overrides).output_dir
    assert read == os.path.expanduser(out)


def test_options_may_follow_the_overrides():
    args = cli.parse("plan", ["r.yaml", "a.b=1", "--world-size", "8", "c=2"])
    assert (args.recipe, args.overrides, args.world_size) == ("r.yaml", ["a.b=1", "c=2"], 8)


def test_merge_dtypes_are_the_writers():
    from mergeopt.export.merge import OUT_DTYPES

    assert cli_options.MERGE_DTYPES == OUT_DTYPES


def test_plan_verb_equals_fit_dry_run(tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig

    from mergeopt.memory import dry_run

    # the host's free memory is read at each call and moves between two calls on a busy machine
    monkeypatch.setattr(dry_run, "_meminfo", lambda: {"MemTotal": 24 * 2**30, "MemAvailable": 20 * 2**30})

    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    ).save_pretrained(tmp_path)  # a config.json alone: the plan reads no weights
    experts = [f"model.experts.{e}={tmp_path}" for e in ("math", "code", "chat", "multilingual")]
    argv = [str(REPO / "recipes" / "8b.yaml"), f"model.base={tmp_path}", *experts, "--world-size", "2"]
    assert cli.main(["plan", *argv]) == 0
    plan = capsys.readouterr().out
    assert cli.main(["fit", *argv, "--dry-run"]) == 0
    assert capsys.readouterr().out == plan and "per rank, 2 ranks" in plan


def test_a_user_error_is_one_line_and_exit_2_through_the_console_script(tmp_path):
    done = _run("-m", "mergeopt", "fit", str(tmp_path / "missing.yaml"), "--quiet")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mergeopt: error: recipe {tmp_path / 'missing.yaml'} does not exist"
    ]
    debug = _run("-m", "mergeopt", "fit", str(tmp_path / "missing.yaml"), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_reader_that_closed_stdout_ends_the_command_with_141_and_no_traceback():
    """`mergeopt plan ... | head -1`: the reader is gone before the plan is printed. As a shell tool
    killed by SIGPIPE, the command exits 128 + 13 and says nothing (it used to end in a
    BrokenPipeError traceback and exit 1)."""
    config = "random://" + str(REPO / "tests" / "data" / "configs" / "llama-3.1-8b.json")
    experts = "model.experts={" + ", ".join(f"{e}: '{config}'" for e in "abcd") + "}"
    read, write = os.pipe()
    os.close(read)  # every write to stdout now fails with EPIPE (Python ignores SIGPIPE)
    try:
        argv = ["-m", "mergeopt", "plan", "recipes/8b.yaml", f"model.base={config}", experts]
        done = subprocess.run(
            [sys.executable, *argv, "--device-memory", "79"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=ENV,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == "", done.stderr


def test_an_unknown_verb_or_option_exits_2():
    assert _run("-m", "mergeopt", "fitt").returncode == 2
    assert _run("-m", "mergeopt", "fit", "r.yaml", "--no-such-option").returncode == 2


@pytest.mark.parametrize("verb", ALIASES)
def test_python_m_aliases_are_the_verbs(verb):
    alias = _run("-m", f"mergeopt.{verb}", "--help")
    verb_help = _run("-m", "mergeopt", verb, "--help")
    assert alias.returncode == verb_help.returncode == 0
    words = alias.stdout.replace(f"python -m mergeopt.{verb}", f"mergeopt {verb}").split()
    assert words == verb_help.stdout.split()  # the same help, wrapped to another prog's width


def test_an_interrupt_exits_128_plus_the_signal_with_the_commands_hint(capsys):
    def stopped(_argv):
        stop = Interrupted(signal.SIGTERM, "step 3")
        stop.hint = "the state is saved in out/. Rerun to continue."
        raise stop

    assert run_cli(stopped, []) == 143
    assert capsys.readouterr().err == (
        "mergeopt: interrupted (SIGTERM at step 3); the state is saved in out/. Rerun to continue.\n"
    )

    def silent(_argv):  # a non-zero rank under torchrun: the exit code, no second message
        stop = Interrupted(signal.SIGINT, "step 1")
        stop.silent = True
        raise stop

    assert run_cli(silent, []) == 130 and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "raised", [Interrupted(signal.SIGTERM, "step 3"), UserError("bad"), KeyboardInterrupt()]
)
def test_the_last_line_follows_the_progress_bar_it_stopped(raised, capsys):
    """A command stopped mid-bar: the bar is closed (its line ended) before the last line, which
    stands alone at the end, not run into the bar or drawn over by its close at exit."""
    from tqdm import tqdm

    def stopped(_argv):
        bar = tqdm(total=10, desc="fit", file=sys.stderr, mininterval=0)
        bar.update(3)
        raise raised

    run_cli(stopped, [])
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("mergeopt: ") == 1
    last = err.splitlines()[-1]
    assert last.startswith("mergeopt: ") and "fit:" not in last
    assert "3/10" in err.rsplit("mergeopt: ", 1)[0]  # the bar came first, ended by its close


def test_the_error_line_is_one_write_with_its_newline(monkeypatch):
    """Under torchrun the ranks share one stderr pipe: ``print`` wrote the text and the newline
    separately, and CI caught two ranks' refusals run together on one line."""
    writes: list[str] = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    def refuse(_argv):
        raise UserError("optim.batch_size: must be positive")

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert run_cli(refuse, []) == 2
    assert writes == ["mergeopt: error: optim.batch_size: must be positive\n"]


def test_shell_completion_completes_verbs_and_options(tmp_path):
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions"
    env = {
        **ENV,
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        "COMP_TYPE": "9",
        "_ARGCOMPLETE_IFS": "\n",
    }
    for line, expected in [
        ("mergeopt tr", {"train", "transfer"}),
        ("mergeopt fit --re", {"--resume", "--restart"}),
    ]:
        env.update(COMP_LINE=line, COMP_POINT=str(len(line)))
        done = subprocess.run(
            [sys.executable, "-m", "mergeopt"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert set(out.read_text().split()) == expected


def test_importing_peft_with_torchao_installed_is_silent_under_the_command_line():
    """peft imports torchao when it is installed (the export frameworks need it), and torchao then
    logs one warning per compiled kernel built for another Python; the command line raises those
    libraries' loggers to ERROR before a verb runs, so none of it reaches the user."""
    pytest.importorskip("peft")
    pytest.importorskip("torchao")
    code = "from mergeopt.cli import quiet_foreign_loggers; quiet_foreign_loggers(); import peft"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == "", quiet.stderr


def _bar(_args) -> int:
    """A verb's stand-in that draws a library-style tqdm bar (no ``disable=`` of its own)."""
    from tqdm.auto import tqdm

    for _ in tqdm(range(3), desc="a library's bar"):
        pass
    return 0


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_silences_library_progress_bars(quiet):
    """A library's bar (no ``disable=`` of its own, as transformers' GGUF conversion draws it) is
    silent under --quiet and drawn without it, in a command-line process."""
    argv = ["recipe.yaml", *(["--quiet"] if quiet else [])]
    code = (
        "import sys; from mergeopt import cli; cli.HANDLERS['plan'] = 'tests.test_cli:_bar'; "
        f"sys.exit(cli.run_command('plan', {argv!r}))"
    )
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    env.pop("TQDM_DISABLE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert ("a library's bar" in done.stderr) is not quiet, done.stderr


def test_fits_help_groups_the_plans_options_under_dry_run():
    """--world-size, --device-memory and --json only shape a --dry-run's plan (a fit refuses them):
    fit --help lists them under that heading, not beside --resume."""
    from mergeopt.cli import command_parser

    help_text = command_parser("fit").format_help()
    options = help_text[help_text.index("\noptions:") :]  # past the usage line, which lists every option
    before, heading, plan_part = options.partition("with --dry-run:")
    assert heading and "--resume" in before
    for option in ("--world-size N", "--device-memory GIB", "--json"):
        assert option in plan_part and option not in before


@pytest.mark.parametrize(
    "options, hint",
    [
        (["--k", "5"], "(override them: rank.k=5)"),
        (["--seed", "3", "--bootstrap", "10"], "(override them: rank.bootstrap=10 seed=3)"),
        (
            ["--metrics", "loss"],
            "which ranks the recipe's dev sets and objective terms against the grid's columns",
        ),
    ],
)
def test_a_table_option_with_a_recipe_is_refused_with_its_own_grid_mode_equivalent(options, hint):
    """The refusal names the recipe key of a table option grid mode has one for, with the value
    given (it suggested rank.k=5 whatever the option), and says what grid mode ranks otherwise."""
    from mergeopt.evaluation.rank import check_mode_options

    with pytest.raises(UserError, match="table-mode option") as err:
        check_mode_options(cli.parse("rank", ["r.yaml", *options]))
    assert hint in str(err.value) and str(err.value).endswith("; drop the recipe for table mode")
