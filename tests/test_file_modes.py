"""Files mergeopt writes get the mode ``open()`` would give them: 0666 less the umask.

The atomic writer creates a temporary file with ``mkstemp`` (mode 0600) and renames it into place;
without a chmod every mixture.json, report and checkpoint was private whatever the umask, so a
merged model.safetensors or a run was unreadable by the rest of a team on a shared cluster.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from mergeopt.errors import run_cli
from mergeopt.export import merge
from mergeopt.fit import main as fit_main
from mergeopt.runtime.files import current_umask, make_staging_dir, write_json_atomic, write_text_atomic
from tests.conftest import recipe_tree


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask_as_open_does(tmp_path, mask, expected):
    with umask(mask):
        assert current_umask() == mask
        atomic = write_text_atomic(tmp_path / "a.txt", "x")
        write_json_atomic(tmp_path / "b.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        staging = make_staging_dir(tmp_path, ".stage-")
    assert mode(atomic) == mode(tmp_path / "b.json") == mode(tmp_path / "plain.txt") == expected
    assert mode(staging) == 0o777 & ~mask


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_a_fit_and_a_merge_write_files_the_umask_allows(random_world, tmp_path, capsys, mask, expected):
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    tree = recipe_tree(random_world, run)
    tree["optim"].update(steps=2, eval_every=1, checkpoint_every=1)
    recipe.write_text(yaml.safe_dump(tree))
    merged = tmp_path / "merged"
    with umask(mask):
        assert run_cli(fit_main, [str(recipe), "--quiet"]) == 0
        args = [str(recipe), "--mixture", str(run / "mixture.json"), "--out", str(merged), "--quiet"]
        assert run_cli(merge.main, args) == 0
    written = [p for p in [*run.rglob("*"), *merged.rglob("*")] if p.is_file()]
    assert run / "mixture.json" in written and merged / "model.safetensors" in written
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(expected) for p in written}
    assert mode(merged) == 0o777 & ~mask


def test_a_shared_output_directory_keeps_its_mode_and_group(random_world, tmp_path, capsys):
    """A fit replaced a team's setgid, group-writable output_dir (2775) by a new directory of the
    umask's mode (755) and the parent's group: the group could no longer write into it."""
    run = tmp_path / "run"
    run.mkdir()
    groups = [g for g in os.getgroups() if g != run.stat().st_gid]
    if groups:
        os.chown(run, -1, groups[0])
    os.chmod(run, 0o2775)
    before = run.stat()
    recipe = tmp_path / "recipe.yaml"
    tree = recipe_tree(random_world, run)
    tree["optim"].update(steps=2, eval_every=1)
    recipe.write_text(yaml.safe_dump(tree))
    with umask(0o022):
        assert run_cli(fit_main, [str(recipe), "--quiet"]) == 0
    assert (run / "mixture.json").is_file()
    assert oct(mode(run)) == oct(0o2775)
    assert run.stat().st_gid == before.st_gid
    assert (run / "mixture.json").stat().st_gid == before.st_gid
    assert mode(run / "mixture.json") == 0o644


def _publish_twice_into(out: Path) -> list[str]:
    """Publish into ``out`` twice, as two commands replacing it would; what is left beside it."""
    from mergeopt.runtime.rundir import staged

    for text in ("1", "2"):
        with staged(out, ("mixture.json",)) as staging:
            (staging.path / "mixture.json").write_text(text)
    assert (out / "mixture.json").read_text() == "2" and (out / "keep.txt").is_file()
    assert mode(out) == 0o555  # the directory's mode is kept
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_a_read_only_output_directory_leaves_nothing_beside_it(tmp_path):
    """A user's own output directory made read-only (chmod a-w, 0555) keeps that mode when a command
    replaces it, so the replaced one, swapped aside, could not be emptied: every run left the
    previous outputs in a hidden .NAME.staging-PID beside it (a merged model's weights each time).
    Root ignores the mode, so as root the commands run in a child that dropped to nobody."""
    import tempfile

    # as root: a directory nobody can reach (pytest's tmp_path lies under a private one)
    root = Path(tempfile.mkdtemp(dir=tmp_path if os.geteuid() else "/tmp"))
    try:
        out = root / "run"
        out.mkdir()
        (out / "keep.txt").write_text("another command's")
        os.chmod(out, 0o555)
        if os.geteuid():
            assert _publish_twice_into(out) == []
            return
        for path in (root, out, out / "keep.txt"):
            os.chown(path, 65534, 65534)
        pid = os.fork()
        if pid == 0:  # the child: nobody, as a user running the commands
            code = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                code = 0 if _publish_twice_into(out) == [] else 3
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, sorted(p.name for p in root.iterdir())
    finally:
        for path in root.rglob("*"):
            if path.is_dir():
                os.chmod(path, 0o755)
        os.chmod(root, 0o755)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
