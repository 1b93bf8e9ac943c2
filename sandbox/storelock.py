"""The image store's flocks: ``lock`` is shared by builds, pulls, loads and runs, exclusive for
prune (which then removes what no tag reaches).

It sits below both the supervisor, whose run on an image holds the lock while the image's
layers are mounted, and the image package's store, so neither imports the other for it.
"""

from __future__ import annotations

import fcntl
import os

#: The store's lock file, under its root.
STORE_LOCK = "lock"


def lock_file(path: str | os.PathLike[str], exclusive: bool = False) -> int:
    """Take an flock on ``path`` (made 0600 if missing, never through a symlink), shared unless
    ``exclusive``; closing the returned descriptor releases it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def hold_store(store: str | os.PathLike[str], exclusive: bool = False) -> int:
    """Take the lock of the store at ``store``: see :func:`lock_file`."""
    return lock_file(os.path.join(store, STORE_LOCK), exclusive)
