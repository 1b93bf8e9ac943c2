"""The store's shared lock, for a run: held while its layers are mounted."""

from __future__ import annotations

import fcntl
import os


def hold_store(store: str) -> int:
    """Take the store's shared lock; closing the returned descriptor releases it."""
    fd = os.open(os.path.join(store, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd
