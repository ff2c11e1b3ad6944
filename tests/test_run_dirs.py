"""Run directories are owned and published whole (mergeopt.runtime.rundir, mergeopt.runtime.fingerprint).

* a second process into a directory in use is refused in one line naming the first's pid, and a
  killed holder (kill -9) never blocks the rerun;
* an empty output_dir, ``.`` or a parent of the current directory is refused, and nothing in the
  current directory is touched;
* a checkpoint remembers what its run read: a resume after a dev file changed is refused, naming it;
  so is a train's, after a training set changed, and a finished train run is not reused as if it
  had been trained on the new data;
* every command's outputs appear together: killed at any point (``MERGEOPT_FAULT``, a seeded step
  or evaluation, or the moment before its outputs are published), a directory holds either its
  previous state or the complete new one, and a killed fit or train still resumes;
* ``mergeopt train`` holds every directory it writes (train.output_dir and each expert's, wherever
  it lies), makes no run directory before it saves something into it, and never replaces a
  directory that is not one of its runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from mergeopt.errors import UserError
from mergeopt.evaluation.calibrate import CALIBRATE_CHECKPOINT_DIR
from mergeopt.runtime.resume import CHECKPOINT_DIR
from tests.conftest import REPO, recipe_tree, run_forked, run_in_process, stopped_at
from tests.test_export import WEIGHTS, write_run

GRADIENT = {"steps": 12, "batch_size": 4, "eval_every": 4, "patience": 100, "checkpoint_every": 2}
REGMIX = REPO / "tests" / "data" / "regmix"
PROXY = f"{REGMIX / 'test_mixture_1m.csv'}+{REGMIX / 'test_pile_loss_1m.csv'}"
TRUTH = f"{REGMIX / 'test_mixture_60m.csv'}+{REGMIX / 'test_pile_loss_60m.csv'}"


def _recipe(world, tmp_path: Path, out: Path, name: str = "recipe.yaml", **optim) -> str:
    tree = recipe_tree(world, out)
    tree["optim"] = {**GRADIENT, **optim}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _state(directory: Path, skip: tuple[str, ...] = (CHECKPOINT_DIR,)) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes (the resumable checkpoint left out)."""
    if not directory.exists():
        return {}
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).parts[0] not in skip
    }


def _leftovers(directory: Path) -> list[str]:
    """Hidden staging, lock or swapped-out directories beside ``directory``."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


def _refused(command: str, *argv: str) -> list[str]:
    """The stderr lines of ``mergeopt COMMAND ARGV --quiet``, which must exit 2."""
    result = run_in_process(command, *argv, "--quiet")
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()


def _change_a_digit(path: Path) -> bytes:
    """Change one digit of ``path``, keeping its size (only its contents tell); returns the original."""
    original = path.read_bytes()
    path.write_bytes(original.replace(b"1", b"2", 1))
    assert path.read_bytes() != original
    return original


def _visible(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes, hidden ones (checkpoints, staging, locks) left out."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def _train_recipe(world, tmp_path: Path, name: str = "train.yaml", **train) -> tuple[str, dict]:
    """A train of the three experts alone (the one mixture is a vertex), 4 steps, a checkpoint every 2."""
    from tests.test_train import train_tree

    tree = train_tree(world, tmp_path)
    vertex = {"alpha": 1.0, "beta": 0.0, "gamma": 0.0}
    tree["train"].update(steps=4, checkpoint_every=2, mixtures={"kind": "list", "weights": [vertex]}, **train)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path), tree


# ----------------------------------------------------------------------------- the lock


def test_a_second_process_into_a_directory_in_use_is_refused_naming_the_first_pid(random_world, tmp_path):
    out = tmp_path / "run"
    first = _recipe(random_world, tmp_path, out, "first.yaml", lr=0.1)
    second = _recipe(random_world, tmp_path, out, "second.yaml", lr=0.3)
    # stopped at step 5, the directory locked; killed with -9 after (the kernel drops its lock)
    with stopped_at("fit", first, "--quiet", fault="sigstop@step:5") as pid:
        assert _refused("fit", second) == [
            f"mergeopt: error: {out} is in use by mergeopt fit (pid {pid}): wait for it to end, "
            "or choose another output directory"
        ]
        # every command that writes there is refused the same way
        diagnosed = run_in_process("diagnose", second, "--points", "3", "--quiet")
        assert diagnosed.returncode == 2 and f"(pid {pid})" in diagnosed.stderr
    assert not (out / "mixture.json").exists()
    resumed = run_in_process("fit", first)  # the stale lock file does not block
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["lr"] == 0.1
    assert _leftovers(out) == []  # the lock file goes with its holder


def test_the_lock_is_held_by_rank_0_only(tmp_path, monkeypatch):
    from mergeopt.runtime import rundir

    monkeypatch.setenv("RANK", "1")
    with rundir.owned(tmp_path / "out", "fit"):
        assert _leftovers(tmp_path / "out") == []
    monkeypatch.setenv("RANK", "0")
    with rundir.owned(tmp_path / "out", "fit"):
        assert _leftovers(tmp_path / "out") == [".out.lock"]
        with pytest.raises(UserError, match=rf"in use by mergeopt fit \(pid {os.getpid()}\)"):
            with rundir.owned(tmp_path / "out", "rank"):
                pass
    assert _leftovers(tmp_path / "out") == []


def test_a_filesystem_without_locks_runs_the_command_with_one_warning(
    random_world, tmp_path, monkeypatch, capsys
):
    """Lustre mounted ``noflock`` and some FUSE mounts answer flock with ENOSYS or EOPNOTSUPP:
    every command writing there stopped on an OSError traceback. It runs, with one warning naming
    the directory and that a second writer would not be refused; a reader's probe says nobody
    holds it."""
    import errno
    import fcntl

    from mergeopt.runtime import rundir

    def no_locks(_fd, _operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    result = run_in_process("fit", _recipe(random_world, tmp_path, out, "first.yaml", lr=0.1), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"mergeopt: warning: {out}: its filesystem cannot lock files (Function not implemented): a "
        "second command writing there at the same time would not be refused"
    ]
    assert (out / "mixture.json").is_file() and _leftovers(out) == []
    with rundir.owned(tmp_path / "other", "fit"):
        assert rundir.in_use_by(tmp_path / "other") is None
    assert "cannot lock files" in capsys.readouterr().err


def test_several_directories_are_taken_in_one_order_and_each_once(tmp_path):
    from mergeopt.runtime import rundir

    with rundir.owned(tmp_path / "a", "fit"):
        # "a" sorts first whatever the order asked: refused there, before "z" is ever taken
        with pytest.raises(UserError, match=rf"{tmp_path / 'a'} is in use by mergeopt fit"):
            with rundir.owned_all({"z": tmp_path / "z", "a": tmp_path / "a"}, "train"):
                pass
        assert _leftovers(tmp_path / "z") == []
    same = {"one": tmp_path / "b", "two": tmp_path / "x" / ".." / "b"}  # one directory, two names
    with rundir.owned_all(same, "train"):
        assert _leftovers(tmp_path / "b") == [".b.lock"]
    assert _leftovers(tmp_path / "b") == []


def _linked(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``scratch/real`` (holding the user's notes and an old trace), ``link`` to it, ``via/real``
    through a linked parent: one directory under three names."""
    real = tmp_path / "scratch" / "real"
    real.mkdir(parents=True)
    (real / "notes.txt").write_text("the user's")
    (real / "trace.csv").write_text("old")
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "via").symlink_to(tmp_path / "scratch")
    return real, tmp_path / "link", tmp_path / "via" / "real"


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_a_linked_output_dir_is_its_target_locked_and_published_there(tmp_path, monkeypatch, swap):
    """A link to a scratch disk: one lock with its target, the outputs swapped into the target."""
    from mergeopt.runtime import rundir

    if swap == "fallback":
        monkeypatch.setenv("MERGEOPT_NO_RENAME_EXCHANGE", "1")
    real, link, via = _linked(tmp_path)
    with rundir.owned(link, "fit") as out:
        assert out == link and _leftovers(real) == [".real.lock"] and _leftovers(link) == []
        with pytest.raises(UserError, match=rf"^{real} is in use by mergeopt fit \(pid {os.getpid()}\)"):
            with rundir.owned(real, "rank"):
                pass
        with pytest.raises(UserError, match=rf"^{via} \({real}\) is in use by mergeopt fit"):
            with rundir.owned_all({"expert": via}, "train"):
                pass
        with rundir.staged(link, ("trace.csv", "mixture.json")) as staging:
            (staging.path / "mixture.json").write_text("new")
    assert link.is_symlink() and link.resolve() == real and real.is_dir() and not real.is_symlink()
    assert _state(real, skip=()) == {"notes.txt": b"the user's", "mixture.json": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "scratch", "via"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["real"]


def test_a_fit_through_a_linked_output_dir_writes_into_its_target(random_world, tmp_path):
    real, link, _ = _linked(tmp_path)
    recipe = _recipe(random_world, tmp_path, link)
    done = run_in_process("fit", recipe, "--quiet")
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and link.resolve() == real
    assert {"notes.txt", "mixture.json", "recipe.yaml"} <= set(_state(real, skip=()))
    assert (real / "notes.txt").read_text() == "the user's"
    assert not (real / CHECKPOINT_DIR).exists() and _leftovers(real) == [] and _leftovers(link) == []


def test_a_second_train_onto_an_expert_in_use_is_refused_naming_the_first_pid(random_world, tmp_path):
    """The experts lie outside train.output_dir: another output_dir does not make them free."""
    first, tree = _train_recipe(random_world, tmp_path)
    tree["train"]["output_dir"] = str(tmp_path / "other")
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(tree))
    alpha = tmp_path / "experts" / "alpha"
    with stopped_at("train", first, "--quiet", fault="sigstop@train.alpha:1") as pid:
        assert _refused("train", str(second)) == [
            f"mergeopt: error: {alpha} is in use by mergeopt train (pid {pid}): wait for it to end, "
            "or choose another output directory"
        ]
        assert not (tmp_path / "other").exists() and not alpha.exists()
    done = run_in_process("train", str(second), "--quiet")  # the killed holder's locks block nothing
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == ["alpha", "beta", "gamma"]


# ----------------------------------------------------------------------------- where outputs may go


@pytest.mark.parametrize("value, says", [("", "output_dir is empty"), (".", "is the current directory")])
def test_an_empty_or_current_output_dir_is_refused_and_touches_nothing(
    random_world, tmp_path, monkeypatch, value, says
):
    here = tmp_path / "here"
    here.mkdir()
    (here / "mixture.json").write_text("{}")
    recipe = _recipe(random_world, tmp_path, tmp_path / "unused")
    monkeypatch.chdir(here)
    from mergeopt import fit
    from mergeopt.errors import run_cli

    code = run_cli(fit.main, [recipe, f"output_dir={value}", "--quiet"])
    assert code == 2
    assert sorted(p.name for p in here.iterdir()) == ["mixture.json"]
    assert (here / "mixture.json").read_text() == "{}"
    from mergeopt.runtime import rundir

    with pytest.raises(UserError, match=says):
        rundir.check_output_dir(value, "output_dir")


def test_a_parent_of_the_current_directory_or_home_is_refused(tmp_path, monkeypatch):
    from mergeopt.runtime import rundir

    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(UserError, match="a parent of the current directory"):
        rundir.check_output_dir("..", "--out")
    with pytest.raises(UserError, match="name a directory of its own"):
        rundir.check_output_dir("~", "--out")
    assert rundir.check_output_dir("runs/x", "--out") == Path("runs/x")


# ----------------------------------------------------------------------------- what a checkpoint read


def test_a_resume_after_a_dev_file_changed_is_refused_naming_it(random_world, tmp_path):
    world = {**random_world, "dev": dict(random_world["dev"])}
    dev = tmp_path / "arith.jsonl"
    shutil.copy(world["dev"]["arith"], dev)
    world["dev"]["arith"] = str(dev)
    out = tmp_path / "run"
    recipe = _recipe(world, tmp_path, out)
    killed = run_forked("fit", recipe, "--quiet", fault="sigkill@step:5")
    assert killed.returncode == -signal.SIGKILL
    original = _change_a_digit(dev)
    assert _refused("fit", recipe) == [
        f"mergeopt: error: {out / CHECKPOINT_DIR} belongs to a run that read other data: {dev} changed "
        "since; restore it, pass --restart to start over on the new data, or use another output_dir"
    ]
    dev.write_bytes(original)
    resumed = run_in_process("fit", recipe)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout


def test_a_train_after_a_training_set_changed_is_refused_naming_it(random_world, tmp_path):
    recipe, tree = _train_recipe(random_world, tmp_path)
    checkpoint = tmp_path / "experts" / ".alpha.checkpoint"
    killed = run_forked("train", recipe, "--quiet", fault="sigkill@train.alpha:3")  # step 2 saved
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    data = Path(tree["train"]["data"]["alpha"])
    original = _change_a_digit(data)
    assert _refused("train", recipe) == [
        f"mergeopt: error: {checkpoint} belongs to a run that read other data: {data} changed since; "
        "restore it, or delete that directory to start the run over on the new data"
    ]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2  # kept, not restarted
    data.write_bytes(original)
    done = run_in_process("train", recipe, "--quiet")
    assert done.returncode == 0, done.stderr
    finished = _visible(tmp_path)
    # a finished run is not reused as if trained on new data, whichever set changed: every run's
    # seeded stream shuffles every domain, so beta's set is alpha's input too
    other = Path(tree["train"]["data"]["beta"])
    other.write_bytes(other.read_bytes() + other.read_bytes().splitlines(keepends=True)[0])
    assert _refused("train", recipe) == [
        f"mergeopt: error: {tmp_path / 'experts' / 'alpha'} was trained on other data: {other} changed "
        "since; restore it, or delete every run (model.experts, train.output_dir/mixtures) to retrain "
        "them on the new data"
    ]
    assert {n: b for n, b in _visible(tmp_path).items() if n != other.name} == {
        n: b for n, b in finished.items() if n != other.name
    }


def test_a_retrained_expert_of_the_same_shapes_changes_its_fingerprint(random_world, tmp_path):
    from safetensors.torch import load_file, save_file

    from mergeopt.runtime.fingerprint import digest

    expert = tmp_path / "alpha"
    shutil.copytree(random_world["experts"]["alpha"], expert)
    before = digest(expert)
    tensors = load_file(str(expert / "model.safetensors"))
    for value in tensors.values():
        value.add_(1e-3)
    save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
    assert digest(expert) != before


def _eight_tensors(tmp_path: Path) -> tuple[Path, dict]:
    """An expert of eight 64 KiB tensors: the third lies between the start and middle samples."""
    import torch
    from safetensors.torch import save_file

    expert = tmp_path / "expert"
    expert.mkdir()
    (expert / "config.json").write_text("{}\n")
    original = {f"t{i}": torch.full((128, 128), float(i)) for i in range(8)}
    save_file(original, str(expert / "model.safetensors"))
    return expert, original


def test_an_expert_retrained_in_some_tensors_only_changes_its_fingerprint(tmp_path):
    """A fine-tune that trains a few tensors (the MLP, a LoRA merged into q and v) changed none of the
    three 64 KiB samples of a weight file when the tensors lay between them: the checkpoint resumed
    on the changed expert."""
    from safetensors.torch import save_file

    from mergeopt.runtime.fingerprint import digest, first_changed

    expert, original = _eight_tensors(tmp_path)
    before = digest(expert)
    save_file({**original, "t2": original["t2"] + 1e-3}, str(expert / "model.safetensors"))
    assert digest(expert) != before
    assert first_changed({str(expert): before}) == str(expert)


def test_a_fingerprint_an_earlier_mergeopt_recorded_is_checked_its_way(tmp_path):
    """Checkpoints and trained runs recorded before the per-tensor samples are not refused as changed."""
    from mergeopt.runtime.fingerprint import EACH_TENSOR, digest, first_changed

    expert, _ = _eight_tensors(tmp_path)
    earlier, now = digest(expert, each_tensor=False), digest(expert)
    assert not earlier.startswith(EACH_TENSOR) and now.startswith(EACH_TENSOR)
    assert first_changed({str(expert): earlier}) is None
    assert first_changed({str(expert): earlier}, {str(expert): now}) is None
    assert first_changed({str(expert): now}) is None


@pytest.mark.parametrize(
    "header", [b"[1, 2]", b'{"t": {"data_offsets": ["a", 3]}}', b'{"t": {"data_offsets": 5}}']
)
def test_a_weight_file_whose_header_is_not_safetensors_is_fingerprinted_without_a_traceback(tmp_path, header):
    """JSON that is no safetensors header (a list, offsets that are not numbers) leaves the three
    samples alone to stand for the file, as a header that is not JSON does."""
    from mergeopt.runtime.fingerprint import digest

    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(100))
    assert digest(path) == digest(path) and digest(path).startswith("tensors:")


# ----------------------------------------------------------------------------- nothing half-written


def test_a_fit_killed_anywhere_leaves_the_previous_run_or_the_new_one(random_world, tmp_path):
    out = tmp_path / "run"
    previous = _recipe(random_world, tmp_path, out, "previous.yaml", lr=0.3)
    assert run_in_process("fit", previous, "--quiet").returncode == 0
    before = _state(out)
    assert "mixture.json" in before
    recipe = _recipe(random_world, tmp_path, out, "new.yaml", lr=0.1)
    step = random.Random(18).randint(1, GRADIENT["steps"])
    for fault in (f"sigkill@step:{step}", "sigkill@publish:1"):
        killed = run_forked("fit", recipe, "--quiet", fault=fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr)
        assert _state(out) == before, fault  # the previous run, whole
        assert (out / CHECKPOINT_DIR).is_dir()  # and the new one's state to resume from
    resumed = run_in_process("fit", recipe)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["lr"] == 0.1
    assert not (out / CHECKPOINT_DIR).exists() and _leftovers(out) == []
    assert set(_state(out)) == set(before)  # the same files, all of the new run


def test_a_kill_between_the_fallback_renames_is_undone_by_the_next_owner(tmp_path, monkeypatch):
    from mergeopt.runtime import rundir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setenv("MERGEOPT_NO_RENAME_EXCHANGE", "1")
    monkeypatch.setattr(rundir.faults, "reached", _raise_at("publish", 2))
    with pytest.raises(KeyboardInterrupt), rundir.owned(out, "test"):
        with rundir.staged(out, ("*",)) as staging:
            (staging.path / "new.txt").write_text("new")
    # what a kill at that moment leaves: the old directory aside (the test's exception ran no cleanup
    # of it), no directory at out
    assert not out.exists() and any(".replaced-" in n for n in _leftovers(out))
    with rundir.owned(out, "test"):
        assert _state(out) == {"old.txt": b"old"}
    assert _leftovers(out) == []


def _raise_at(point: str, index: int):
    def reached(at: str, n: int) -> None:
        if (at, n) == (point, index):
            raise KeyboardInterrupt

    return reached


def test_publishing_keeps_what_the_command_does_not_own(tmp_path):
    from mergeopt.runtime import rundir

    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "meta.json").write_text("{}")
    (out / "diagnose.json").write_text("theirs")
    (out / "trace.csv").write_text("old")
    with rundir.staged(out, ("trace.csv", "mixture.json", "checkpoint")) as staging:
        (staging.path / "mixture.json").write_text("new")
    assert _state(out, skip=()) == {"diagnose.json": b"theirs", "mixture.json": b"new"}


def _export_inputs(root: Path) -> dict:
    """A tokenizer and one small JSONL per expert: what ``export --to all`` measures."""
    import json

    from mergeopt.worlds import toy

    toy.build_tokenizer().save_pretrained(root / "tokenizer")
    paths = {}
    for name in WEIGHTS:
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text(
            "".join(json.dumps({"prompt": f"{name}{i}", "completion": "xy"}) + "\n" for i in range(10))
        )
    return {"tokenizer": str(root / "tokenizer"), "paths": paths}


# the evaluations each command scores (calibrate: 3 runs and 7 candidates; diagnose: θ0, 3 experts,
# 3 edge midpoints), and what makes a rerun score them again rather than replay its journal
EVALUATIONS = {"calibrate": (10, ["--restart"]), "diagnose": (7, [])}


def _command_argv(command: str, tmp_path: Path, out: Path, request) -> list[str]:
    """A few seconds' run of ``command`` into ``out``."""
    if command == "rank":
        return ["--proxy", PROXY, "--truth", TRUTH, "--bootstrap", "20", "--out", str(out)]
    if command == "transfer":
        return [PROXY, TRUTH, "--bootstrap", "20", "--out", str(out)]
    if command == "export":  # every format, as tests/test_export.py writes them
        files = _export_inputs(tmp_path)
        run = write_run(tmp_path / "run", WEIGHTS)
        fake = {"base": "/x/base", "experts": {n: f"/x/{n}" for n in WEIGHTS}, "dev": {"d": "/x/d.jsonl"}}
        (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe_tree(fake, tmp_path / "run")))
        argv = [str(run), "--to", "all", "--out", str(out), "--tokenizer", files["tokenizer"], "--datasets"]
        return argv + [f"{n}={p}" for n, p in files["paths"].items()]
    from tests.test_calibrate import SPEC, _grid

    world = request.getfixturevalue("random_world")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree(world, tmp_path / "fit", calibrate=SPEC)))
    if command == "calibrate":
        _grid().to_csv(tmp_path / "grid.csv", index=False)
        return [str(recipe), "--grid", str(tmp_path / "grid.csv"), "--out", str(out), "--quiet"]
    return [str(recipe), "--points", "3", "--out", str(out), "--quiet"]  # diagnose


@pytest.mark.parametrize("command", ["rank", "transfer", "export", "calibrate", "diagnose"])
def test_commands_killed_before_publishing_leave_the_previous_outputs(tmp_path, command, request):
    out = tmp_path / "out"
    argv = _command_argv(command, tmp_path, out, request)
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    first = run_in_process(command, *argv)
    assert first.returncode == 0, first.stderr
    journals = (CHECKPOINT_DIR, CALIBRATE_CHECKPOINT_DIR)  # kept for the next round: not outputs
    before = _state(out, journals)
    assert len(before) > 2 and before["notes.txt"] == b"the user's"
    for name in before:  # make the rerun's outputs tell from the first's
        if name != "notes.txt":
            (out / name).write_bytes(b"previous")
    before = _state(out, journals)
    faults = ["sigkill@publish:1"]
    if command in EVALUATIONS:  # and first at a seeded evaluation, scored again (not replayed)
        count, rescore = EVALUATIONS[command]
        faults.insert(0, f"sigkill@evaluation:{random.Random(18).randint(1, count)}")
    for fault in faults:
        extra = rescore if fault.startswith("sigkill@evaluation") else []
        killed = run_forked(command, *argv, *extra, fault=fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr)
        assert _state(out, journals) == before, fault
    again = run_in_process(command, *argv)
    assert again.returncode == 0, again.stderr
    after = _state(out, journals)
    assert set(after) == set(before) and after["notes.txt"] == b"the user's"
    assert all(after[n] != b"previous" for n in after if n != "notes.txt")
    assert _leftovers(out) == []


def test_a_merge_killed_before_publishing_leaves_the_previous_checkpoint(random_world, tmp_path):
    from tests.test_merge_cli import WEIGHTS as MERGED
    from tests.test_merge_cli import as_arg, write_recipe

    recipe = write_recipe(tmp_path, random_world)
    out = tmp_path / "merged"
    first = run_in_process("merge", str(recipe), "--weights", as_arg(MERGED), "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    before = _state(out, skip=())
    assert "model.safetensors" in before
    other = {"alpha": 0.6, "beta": 0.1, "gamma": 0.3}
    argv = [str(recipe), "--weights", as_arg(other), "--out", str(out), "--overwrite", "--quiet"]
    killed = run_forked("merge", *argv, fault="sigkill@publish:1")  # merge has no earlier fault point
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _state(out, skip=()) == before
    again = run_in_process("merge", *argv)
    assert again.returncode == 0, again.stderr
    after = _state(out, skip=())
    assert set(after) == set(before) and after["model.safetensors"] != before["model.safetensors"]
    assert json.loads(after["mergeopt_merge.json"])["weights"] == other
    assert _leftovers(out) == []


# ----------------------------------------------------------------------------- train


def test_a_train_killed_anywhere_leaves_its_finished_runs_and_a_rerun_trains_the_same(random_world, tmp_path):
    recipe, _ = _train_recipe(random_world, tmp_path)
    assert run_in_process("train", recipe, "--quiet").returncode == 0
    whole = _visible(tmp_path)
    alpha = tmp_path / "experts" / "alpha"
    shutil.rmtree(alpha)  # the one run to train again
    before = _visible(tmp_path)
    step = random.Random(18).randint(1, 4)
    for fault in (f"sigkill@train.alpha:{step}", "sigkill@publish:1"):  # the publish of alpha's run
        killed = run_forked("train", recipe, "--quiet", fault=fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr)
        assert _visible(tmp_path) == before, fault  # no half run, the others and grid.csv untouched
    assert any(p.name.startswith(".alpha.staging-") for p in alpha.parent.iterdir())
    again = run_in_process("train", recipe, "--quiet")
    assert again.returncode == 0, again.stderr
    assert _visible(tmp_path) == whole  # the same run, bit for bit, and the same grid
    assert [p.name for p in alpha.parent.iterdir() if p.name.startswith(".")] == []
    assert _leftovers(tmp_path / "grid") == []


def test_train_leaves_no_run_directory_before_it_saves_and_never_replaces_a_users(random_world, tmp_path):
    from tests.test_train import train_tree

    tree = train_tree(random_world, tmp_path)
    tree["train"]["checkpoint_every"] = 100  # no step checkpoint before the kill
    recipe = tmp_path / "train.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    killed = run_forked("train", str(recipe), "--quiet", fault="sigkill@train.alpha:1")
    assert killed.returncode == -signal.SIGKILL
    experts = tmp_path / "experts"
    # nothing saved, so no run directory made: only the killed holder's locks on the experts'
    # directories, which the kernel dropped with it and the next train removes
    assert sorted(p.name for p in experts.iterdir()) == [".alpha.lock", ".beta.lock", ".gamma.lock"]
    mine = Path(tree["model"]["experts"]["beta"])
    mine.mkdir(parents=True)
    (mine / "weights.bin").write_text("a user's model")
    refused = run_in_process("train", str(recipe), "--quiet")
    assert refused.returncode == 2
    assert f"{mine} exists and is not a finished mergeopt train run" in refused.stderr
    assert (mine / "weights.bin").read_text() == "a user's model"
    assert sorted(p.name for p in experts.iterdir()) == ["beta"]


def test_rank_that_crashes_after_its_first_files_leaves_nothing(random_world, tmp_path, monkeypatch):
    """The class of "rank writes five files, then crashes before report.md": any failure between
    the first output and the last publishes none of them."""
    from mergeopt.reporting import run_report
    from tests.test_rank_grid import grid_table, rank_cli

    def crash(*_args, **_kwargs):
        raise RuntimeError("crashed while writing report.md")

    monkeypatch.setattr(run_report, "write_report", crash)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crashed while writing report.md"):  # a bug's traceback
        rank_cli(tmp_path, recipe_tree(random_world, out), grid_table())
    # no output, only the journal a rerun replays (rank_checkpoint/, what the resume guide promises)
    assert sorted(p.name for p in out.iterdir()) == ["rank_checkpoint"] and _leftovers(out) == []


def test_a_filesystem_without_locks_spares_a_running_commands_staging(tmp_path, monkeypatch):
    """Without flock a second command is not refused, and on entering it cleared what it took for a
    killed publish's leftovers beside the directory: the first command's staging, still being
    written, so that command lost its outputs at its publish. A live process's staging is spared;
    a dead one's is still removed."""
    import errno
    import fcntl
    import subprocess

    from mergeopt.runtime import rundir

    def no_locks(_fd, _operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    out.mkdir()
    first = subprocess.Popen(["sleep", "60"])  # the first command, still writing its outputs
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live = tmp_path / f".out.staging-{first.pid}"
        killed = tmp_path / f".out.staging-{dead.pid}"
        for staging in (live, killed):
            staging.mkdir()
            (staging / "mixture.json").write_text("{}")
        with rundir.owned(out, "fit"):
            assert (live / "mixture.json").is_file()
            assert not killed.exists()
    finally:
        first.kill()
        first.wait()
