"""Where the sandbox keeps its own files (layers, id locks); nothing else is written on the host."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$SANDBOX_HOME``, else ``/var/lib/sandbox`` for root, else the XDG data dir."""
    override = os.environ.get("SANDBOX_HOME")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/sandbox")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "sandbox"


def take_slot(kind: str, count: int) -> tuple[int, int] | None:
    """Lock one free slot of ``count`` (ids, subnets) for as long as the returned fd is open.

    An ``flock`` is released by the kernel when its holder dies, even by SIGKILL, so a slot is
    never lost. Returns (fd, slot), or None when every slot is taken.
    """
    import fcntl

    directory = ensure_dir(state_dir() / kind)
    for slot in range(count):
        fd = os.open(directory / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd, slot
    return None


def ensure_dir(path: Path, mode: int = 0o755) -> Path:
    """Create ``path`` (and parents) owned by us; refuse one another user could write to.

    Cached layers and compiled filters are trusted input to every run, so a directory that
    someone else can modify would let them weaken the sandbox.
    """
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        from .errors import HostError

        raise HostError(f"{path} must be owned by uid {os.geteuid()} and not group/world-writable")
    return path
