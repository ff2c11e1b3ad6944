"""filelock's lock where the filesystem can lock files, and one warning and no lock where it cannot.

The built-in worlds' cache and an MLflow SQLite store are guarded by ``filelock.FileLock`` (one
builder of a world, one creator of a store's tables). Lustre mounted ``noflock`` and some FUSE
mounts answer flock with ENOSYS or EOPNOTSUPP: filelock before 3.24 raises NotImplementedError
for the first, and every version raises the OSError for the second, so a fit whose cache or
``logging.dir`` lay there ended on a traceback. As for run directories
(:mod:`mergeopt.runtime.rundir`), the work goes on there unguarded, and the user hears what a
second process at the same time would do.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from filelock import FileLock

from mergeopt.errors import warn

# what flock answers where the filesystem has no locks (ENOTSUP is EOPNOTSUPP on Linux)
UNLOCKABLE = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})


def acquire(lock: FileLock, timeout: float, where: str | os.PathLike, unguarded: str) -> bool:
    """Take ``lock`` within ``timeout`` seconds (-1: wait; filelock's ``Timeout`` when another
    process holds it longer): True once held; False where ``where``'s filesystem cannot lock
    files, after one warning saying so and ``unguarded``, what a second process would do."""
    try:
        lock.acquire(timeout=timeout)
        return True
    except NotImplementedError as err:  # filelock < 3.24 on ENOSYS
        reason = str(err) or "flock is not supported"
    except OSError as err:  # filelock's Timeout is an OSError without an errno: re-raised
        if err.errno not in UNLOCKABLE:
            raise
        reason = err.strerror or str(err)
    warn(f"{where}: its filesystem cannot lock files ({reason}): {unguarded}")
    return False


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
