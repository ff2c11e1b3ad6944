"""filelock's lock where the filesystem can lock files, and one warning and no lock where it cannot.

The built-in worlds' cache and an MLflow SQLite store are guarded by ``filelock.FileLock`` (one
builder of a world, one creator of a store's tables). Lustre mounted ``noflock`` and some FUSE
mounts answer flock with ENOSYS, EOPNOTSUPP or ENOLCK: filelock 3.21 on raises the OSError for the
last two (a fit whose cache or ``logging.dir`` lay there ended on a traceback), and before 3.21
takes them for another process's lock and waits forever; before 3.24 it raises NotImplementedError
on ENOSYS, and from 3.24 falls back to a soft lock with a warning. So flock itself is asked first
(:func:`_check_lockable`). As for run directories
(:mod:`mergeopt.runtime.rundir`), the work goes on there unguarded, and the user hears what a
second process at the same time would do.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from mergeopt.errors import warn

# what flock answers where the filesystem has no locks (ENOTSUP is EOPNOTSUPP on Linux)
UNLOCKABLE = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})


def acquire(lock: FileLock, timeout: float, where: str | os.PathLike, unguarded: str) -> bool:
    """Take ``lock`` within ``timeout`` seconds (-1: wait; filelock's ``Timeout`` when another
    process holds it longer): True once held; False where ``where``'s filesystem cannot lock
    files, after one warning saying so and ``unguarded``, what a second process would do."""
    try:
        _check_lockable(lock.lock_file)
        lock.acquire(timeout=timeout)
        return True
    except NotImplementedError as err:  # filelock before 3.24 on ENOSYS, where the probe saw none
        reason = str(err) or "flock is not supported"
    except OSError as err:  # filelock's Timeout is an OSError without an errno: re-raised
        if err.errno not in UNLOCKABLE:
            raise
        reason = err.strerror or str(err)
    warn(f"{where}: its filesystem cannot lock files ({reason}): {unguarded}")
    return False


def _check_lockable(path: str) -> None:
    """Raise flock's OSError where ``path``'s filesystem cannot lock files. filelock is not asked:
    before 3.21 it takes EOPNOTSUPP and ENOLCK for another process's lock and waits for it forever
    (3.12.4 is the floor), and from 3.24 it answers ENOSYS with a soft lock (a file that a process
    killed while holding it leaves behind, so every later builder waits) and a UserWarning."""
    try:
        import fcntl
    except ImportError:  # Windows: filelock's own locks
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as filelock does: a store's new directory
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:  # another process holds it: files lock here
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def held(path: str | os.PathLike, where: str | os.PathLike, unguarded: str) -> Iterator[bool]:
    """Hold the lock file ``path`` for the block (waiting for another holder); yields whether it
    is held, False where the filesystem cannot lock files (see :func:`acquire`)."""
    lock = FileLock(str(path))
    locked = acquire(lock, -1, where, unguarded)
    try:
        yield locked
    finally:
        if locked:
            lock.release()
