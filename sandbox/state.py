"""Where the sandbox keeps its own files (layers, id locks, compiled filters); nothing else is
written on the host."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
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


_PRIVATE_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_private_dir(name: str, *, create: bool) -> int:
    """A descriptor of ``state_dir()/name``, for files only the caller may read or write;
    ``create`` makes it (mode 0700) and the state dir if missing. Raises OSError (or HostError
    for the state dir itself) when it is missing, a symlink, not owned by the caller, or open
    to others.

    The directory is opened without following a symlink, and its files are then reached only
    relative to the descriptor, so nothing planted on the way can redirect them.
    """
    home = ensure_dir(state_dir()) if create else state_dir()
    root = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=root)
        fd = os.open(name, _PRIVATE_DIR, dir_fd=root)
    finally:
        os.close(root)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise PermissionError(
            errno.EPERM, f"must be owned by uid {os.geteuid()} and closed to others", name
        )
    return fd


def read_private(dir_fd: int, name: str, limit: int) -> bytes | None:
    """The content of file ``name`` in ``dir_fd``, or None unless it is a regular file of at
    most ``limit`` bytes with one link, owned by the caller and closed to others (mode 0600).

    A symlink is never followed (``O_NOFOLLOW``) and a FIFO never waited for (``O_NONBLOCK``).
    """
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_mode & 0o077
            or st.st_nlink != 1
            or st.st_size > limit
        ):
            return None
        content = b""
        while len(content) <= limit:  # one byte past the limit tells a file that grew
            data = os.read(fd, limit + 1 - len(content))
            if not data:
                return content
            content += data
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def replace_private(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``data`` as file ``name`` in ``dir_fd``, mode 0600, atomically: a new file with an
    unpredictable name is created exclusively (``O_EXCL|O_NOFOLLOW``) and renamed over ``name``,
    so a reader sees the old file or the whole new one, and a symlink planted at ``name`` is
    replaced rather than written through. Raises OSError."""
    temporary = f".{name}.{os.urandom(8).hex()}.tmp"
    fd = os.open(
        temporary,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask left
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise
