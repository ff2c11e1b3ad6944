"""Run directories: one writer at a time, and outputs that appear all together or not at all.

Every command that writes into a directory (fit's output_dir, ``--out`` of rank, calibrate,
diagnose, transfer, merge and ``export --to all``, train's output_dir) goes through this module:

* :func:`check_output_dir` refuses a directory that is no place for outputs: an empty name, the
  current directory or one above it, the home directory, a filesystem root. Publishing replaces
  the directory whole, so any of those would put unrelated files at stake.
* Every helper acts where the directory really is (:func:`real_dir`): an output directory that is
  a symbolic link, or lies under one (a link to a fast scratch disk), is its target. A link and its
  target share one lock, the staging sibling lies beside the target (on its filesystem) and the
  swap replaces the target: the link stays a link and nothing is left beside it.
* :func:`owned` holds an OS lock (``flock``) on ``PARENT/.NAME.lock`` while the command runs, with
  the holder's pid and command written in it: a second process asking for the same directory gets
  one line naming that pid (:func:`owned_all` holds several, train's output_dir and each expert's
  directory, in a fixed order). The kernel drops the lock when its process dies, so a ``kill -9`` never
  blocks the rerun. The lock file is removed on release. A filesystem without flock runs the command
  unguarded, with one warning (what a live process on this host stages there is left alone).
  Under torchrun rank 0 alone holds it (the
  other ranks write nothing). ``filelock`` truncates its file on every attempt and never removes it,
  so it could keep neither the pid nor the directory clean; hence plain ``fcntl``.
* :class:`Staging` is a hidden sibling ``.NAME.staging-PID`` the command writes its outputs into.
  :meth:`Staging.publish` first hard-links in whatever the directory holds that the command does
  not own (another command's outputs, a tracker's logs), then swaps it for the directory in one
  ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel lacks it). A kill before the swap
  leaves the previous directory as it was; after it, the complete new one. The next owner removes
  any staging a kill left, and puts back a directory a kill caught between the two fallback renames.
  The staging directory takes the replaced directory's group and mode first, so a team's shared
  (setgid, group-writable) output directory stays one after the swap.

Every file in a staging directory must be written by replacing it (:mod:`mergeopt.runtime.files`),
never appended to in place: a hard-linked file is shared with the published directory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from mergeopt.errors import UserError, warn
from mergeopt.inputs import torchrun_variable
from mergeopt.runtime import faults

LOCK_SUFFIX = ".lock"
STAGING = ".staging-"
REPLACED = ".replaced-"


# ----------------------------------------------------------------------------- where outputs may go


def check_output_dir(raw: str | os.PathLike, what: str) -> Path:
    """``raw`` as a Path, or a one-line refusal of a directory that must never be replaced whole."""
    text = os.fspath(raw)
    if not text.strip():
        raise UserError(f"{what} is empty: name a directory for the outputs (e.g. runs/NAME)")
    path = Path(text).expanduser()
    here, full = Path.cwd().resolve(), real_dir(path, what)
    if full == here or full in here.parents:
        where = "the current directory" if full == here else f"a parent of the current directory ({full})"
        raise UserError(
            f"{what} {text!r} is {where}: name a directory of its own for the outputs (e.g. runs/NAME)"
        )
    if full == Path.home().resolve() or full.parent == full:
        raise UserError(f"{what} {text!r} is {full}: name a directory of its own for the outputs")
    return path


def check_apart_from_inputs(
    out: str | os.PathLike, inputs: Mapping[str, str | None], what: str, command: str
) -> None:
    """``out`` is not a directory the command reads (``inputs``: label -> path; a checkpoint, a saved
    dataset) nor inside one. Publishing there put the command's files among a checkpoint's (or, for
    a command that owns its whole directory, replaced the checkpoint), and a fit's checkpoint/
    changed the digest of the input it lies in, so its rerun refused to resume ('read other data')."""
    full = real_dir(out, what)
    for label, path in inputs.items():
        if path is None or not Path(path).expanduser().is_dir():
            continue
        read = Path(path).expanduser().resolve()
        if full == read or read in full.parents:
            where = "is" if full == read else "lies inside"
            raise UserError(
                f"{what} {os.fspath(out)} {where} the directory of {label} ({path}), which {command} reads: "
                "name a directory of its own for the outputs (e.g. runs/NAME)"
            )


def real_dir(out: str | os.PathLike, what: str = "the output directory") -> Path:
    """``out`` with every symbolic link on its way followed, absolute.

    The lock, the staging sibling and the swap must act on the real directory: beside a link they
    would give a link and its target two locks, and the swap would replace the link by a directory
    (on the link's filesystem), leaving the target's old contents behind.
    """
    try:
        return Path(out).expanduser().resolve()
    except RuntimeError:  # a loop of links (Python 3.13 resolves it as far as it goes instead)
        raise UserError(f"{what} {os.fspath(out)!r} is a loop of symbolic links") from None


def _named(out: Path, real: Path) -> str:
    """``out`` as the user wrote it, with its real place when a link leads elsewhere."""
    return str(out) if Path(os.path.abspath(out)) == real else f"{out} ({real})"


# ----------------------------------------------------------------------------- the lock


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _writes_run_dirs() -> bool:
    """Rank 0 under torchrun (before or after the process group is joined), or a lone process."""
    from mergeopt.runtime import distributed

    rank, size = distributed.process_rank_and_size()
    return rank == 0 if size > 1 else torchrun_variable("RANK") == 0


def _acquire(lock: Path, unlockable: Callable[[OSError], None]) -> int | None:
    """An fd holding the flock on ``lock``, or None when another process holds it. On a filesystem
    without flock (Lustre mounted ``noflock``, some FUSE mounts) the fd holds nothing and
    ``unlockable`` hears why: the command still runs there, unguarded."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:  # ENOSYS, EOPNOTSUPP, ENOLCK: no locks here, not someone else's
            unlockable(err)
            return fd
        try:  # the holder before us may have removed the file as we opened it: lock the live one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def in_use_by(out: str | os.PathLike) -> str | None:
    """Who holds ``out`` now (``mergeopt fit (pid N)``), or None: a reader's probe of the lock that
    :func:`owned` takes, which creates nothing (a run being read may lie where nothing is written)."""
    import fcntl

    lock = _lock_path(Path(os.path.realpath(out)))
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(lock)
    except OSError:  # a filesystem without flock: nobody can be told to hold it
        return None
    finally:
        os.close(fd)  # a lock taken here goes with the descriptor
    return None


def _holder(lock: Path) -> str:
    try:
        pid, _, command = lock.read_text(encoding="utf-8").strip().partition(" ")
    except OSError:
        pid = command = ""
    if not pid.isdigit():
        return "another process (starting up)"
    return f"mergeopt {command or '?'} (pid {pid})"


def _everyones(refusal: str | None) -> str | None:
    """Rank 0's refusal, heard by every rank of a joined process group: a rank that went on would
    wait in its first collective for a rank 0 that has left, until the launcher kills it (torchrun
    after 30 s) or the backend gives up (gloo after 30 minutes). Without a group: ``refusal``."""
    from mergeopt.runtime import distributed

    return next((said for said in distributed.all_gather_objects(refusal) if said is not None), None)


@contextmanager
def owned(out: str | os.PathLike, command: str, what: str = "the output directory") -> Iterator[Path]:
    """Hold ``out`` for ``command`` (refused in one line while another process holds it).

    The lock is the real directory's (:func:`real_dir`), so a link to it and the directory itself
    are one; ``out`` is yielded as given, for messages that name what the user wrote. Under
    torchrun, rank 0 takes the lock: enter this after the process group is joined, so that every
    rank says its refusal and exits.
    """
    out = check_output_dir(out, what)
    writes, refusal = _writes_run_dirs(), None
    if writes:
        real = real_dir(out, what)
        made = _make_parents(real.parent)
        lock = _lock_path(real)

        def unlockable(err: OSError) -> None:
            warn(
                f"{_named(out, real)}: its filesystem cannot lock files ({err.strerror or err}): "
                "a second command writing there at the same time would not be refused"
            )

        if (fd := _acquire(lock, unlockable)) is None:
            refusal = (
                f"{_named(out, real)} is in use by {_holder(lock)}: wait for it to end, "
                "or choose another output directory"
            )
    if (refusal := _everyones(refusal)) is not None:
        raise UserError(refusal)
    if not writes:
        yield out
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        recover(real)
        yield out
    finally:
        lock.unlink(missing_ok=True)  # while still held: the next owner checks the inode it locked
        os.close(fd)
        for directory in reversed(made):  # parents this command created and left empty
            try:
                directory.rmdir()
            except OSError:
                break


@contextmanager
def owned_all(outs: Mapping[str, str | os.PathLike], command: str) -> Iterator[dict[str, Path]]:
    """Hold several directories (``{what: path}``) for one command, each as :func:`owned` holds one.

    They are taken in one fixed order, by absolute path, so two commands that want overlapping sets
    meet first on the first directory they share: one gets every lock and the other is refused,
    never both refused holding half the locks each. A directory named twice (or once through a
    link) is held once.
    """
    checked = {what: check_output_dir(path, what) for what, path in outs.items()}
    first: dict[Path, str] = {}
    for what, path in checked.items():
        first.setdefault(real_dir(path, what), what)
    with ExitStack() as held:
        for full in sorted(first, key=str):
            held.enter_context(owned(checked[first[full]], command, first[full]))
        yield checked


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing = []
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return list(reversed(missing))


def _alive(entry: Path) -> bool:
    """Whether the process whose pid ends ``entry``'s name (``.NAME.staging-PID``) runs on this host."""
    pid = entry.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def recover(out: Path) -> None:
    """Undo what a killed publish left beside ``out`` (call with the lock held), where it really is.

    What a process still running on this host left is spared: the lock keeps out every other
    writer, but on a filesystem without flock (:func:`owned`'s fallback) none is held, and a
    command's staging removed under it lost its outputs at its publish. A pid reused since a
    ``kill -9`` only leaves that leftover to a later run."""
    out = real_dir(out)
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        if entry.name.startswith(f".{out.name}.") and _alive(entry):
            continue
        if entry.name.startswith(f".{out.name}{STAGING}"):
            _remove_tree(entry)  # a killed command's unpublished outputs
        elif entry.name.startswith(f".{out.name}{REPLACED}"):
            if not out.exists():
                os.rename(entry, out)  # killed between the fallback's two renames: the old one back
            else:
                _remove_tree(entry)


# ----------------------------------------------------------------------------- staging and publishing


class Staging:
    """A hidden sibling of ``out`` that becomes ``out`` in one swap.

    ``owns`` are the names (``fnmatch`` patterns) of ``out``'s entries this command writes or
    makes obsolete: those are dropped, everything else in ``out`` is kept. ``out`` is taken where it
    really is (:func:`real_dir`): the sibling beside a link's target, on its filesystem, is swapped
    for the target and the link is left as it was.
    """

    def __init__(self, out: str | os.PathLike, owns: Iterable[str] = ()):
        self.out = real_dir(out)
        self.owns = tuple(owns)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out.parent / f".{self.out.name}{STAGING}{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        if self.out.is_dir():  # files written from here on take the directory's group (setgid)
            _keep_group_and_mode(self.out.stat(), self.path, writable=True)

    def _owned(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.owns)

    def carry_over(self) -> None:
        """Hard-link ``out``'s entries that this command does not own into the staging directory.

        Called by :meth:`publish`; call it earlier when what is written reads them (report.md
        summarises every command's outputs). Entries linked before are linked again, fresh.
        """
        if not self.out.is_dir():
            return
        for entry in self.out.iterdir():
            if self._owned(entry.name):
                continue
            target = self.path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            _link_tree(entry, target)

    def publish(self) -> Path:
        """Make the staging directory ``out``, with what it does not own carried over."""
        self.carry_over()
        faults.reached("publish", 1)  # tests only: killed with every output staged, none published
        if not self.out.exists():
            os.rename(self.path, self.out)
            return self.out
        if not self.out.is_dir():
            raise UserError(f"{self.out} exists and is not a directory")
        _keep_group_and_mode(self.out.stat(), self.path)
        if _exchange(self.path, self.out):
            _remove_tree(self.path)  # the previous directory, now aside
            return self.out
        aside = self.out.parent / f".{self.out.name}{REPLACED}{os.getpid()}"
        os.rename(self.out, aside)
        faults.reached("publish", 2)  # tests only: the fallback killed between its two renames
        try:
            os.rename(self.path, self.out)
        except BaseException:
            os.rename(aside, self.out)
            raise
        _remove_tree(aside)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def staged(out: str | os.PathLike, owns: Iterable[str] = ()) -> Iterator[Staging]:
    """A :class:`Staging` published when the block ends normally, discarded when it raises."""
    staging = Staging(out, owns)
    try:
        yield staging
        staging.publish()
    finally:
        staging.discard()  # a no-op once published


def _keep_group_and_mode(kept: os.stat_result, path: Path, writable: bool = False) -> None:
    """Give the staging directory the replaced directory's group and mode (a team's setgid,
    group-writable directory stays one); ``writable`` keeps it writable by its owner meanwhile."""
    if path.stat().st_gid != kept.st_gid:
        try:
            os.chown(path, -1, kept.st_gid)
        except OSError:  # not a member of that group: the mode alone is kept
            pass
    os.chmod(path, stat.S_IMODE(kept.st_mode) | (stat.S_IRWXU if writable else 0))


def _remove_tree(path: Path) -> None:
    """``rm -rf``, the directory made writable by its owner first: a replaced directory the user had
    made read-only (0555) could not be emptied, and since its mode is kept (:func:`_keep_group_and_mode`)
    every later run left the previous outputs in a hidden ``.NAME.staging-PID`` beside it."""
    try:
        os.chmod(path, stat.S_IMODE(path.lstat().st_mode) | stat.S_IRWXU)
    except OSError:  # gone, or another user's: removed as far as it can be
        pass
    shutil.rmtree(path, ignore_errors=True)


def _link_tree(source: Path, target: Path) -> None:
    """``cp -al``: directories made, files hard-linked (copied where links are not supported)."""
    mode = source.lstat().st_mode
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISDIR(mode):
        target.mkdir()
        shutil.copystat(source, target)
        for child in source.iterdir():
            _link_tree(child, target / child.name)
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where the system cannot."""
    if os.environ.get("MERGEOPT_NO_RENAME_EXCHANGE"):  # tests of the fallback
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
