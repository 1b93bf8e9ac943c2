"""Workspaces: a work dir that persists across runs, so a judge compiles once and runs the
result against every test without a writable host bind.

A workspace is a size-capped tmpfs the sandbox mounts on the host, in a root-only directory of
its state dir (``$SANDBOX_HOME/workspaces/slot-N/root``), and binds over the work dir (``/box``)
of every run in it. Its files, and every box run in it, belong to one host id of its own
(``userns.WORKSPACE_BASE + N``), so what one run writes the next may run or rewrite, and no
other box ever has that id. Nothing of the host is inside: a program can leave only symlinks,
FIFOs and ordinary files there (``nodev``, ``nosuid``), and the host side never follows one:
``put``/``get`` resolve every path beneath the workspace's own descriptor
(:func:`sandbox.boxdir.open_beneath`: no symlink, no way out) and open only regular files,
without blocking; removing a workspace unmounts it (``MNT_DETACH``) instead of walking what a
program left.

A library workspace (``with sandbox.Workspace() as ws``) belongs to its process and is removed
when it is closed, at exit, or, after a crash, by the next workspace made on the host; a named
one (``sandbox workspace create NAME``) stays until ``sandbox workspace rm NAME``. One run at a
time uses a workspace (an ``flock`` on its record).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kernel
from .boxdir import open_beneath
from .errors import ConfigError, HostError, SandboxError
from .limits import LIMITS
from .spec import WorkspaceRoot
from .state import state_dir

if TYPE_CHECKING:
    from .report import Report

_DIR = "workspaces"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEFAULT_SIZE = 64 << 20
MAX_INODES = 65536
_POLL = 0.005  # seconds between tries of a busy workspace from asyncio


def _home() -> int:
    """A descriptor of ``$SANDBOX_HOME/workspaces`` (made root-only)."""
    from .state import open_private_dir

    try:
        return open_private_dir(_DIR, create=True)
    except OSError as e:
        raise HostError(f"cannot use {state_dir() / _DIR}: {e.strerror or e}") from None


def _start_time(pid: int) -> str | None:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]


def _record(home: int, slot: str) -> dict[str, Any] | None:
    """A workspace's record (written by the sandbox, in a root-only directory)."""
    try:
        fd = os.open(f"{slot}/info.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=home)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        try:
            data = json.load(f)
        except ValueError:
            return None
    return data if isinstance(data, dict) else None


def _slots(home: int) -> Iterator[tuple[str, dict[str, Any] | None]]:
    for entry in sorted(os.listdir(home)):
        if entry.startswith("slot-") and entry[5:].isdigit():
            yield entry, _record(home, entry)


def _remove(home: int, slot: str) -> None:
    """Unmount and remove one workspace: nothing a program left is walked."""
    with contextlib.suppress(OSError):
        kernel.Kernel().umount2(str(state_dir() / _DIR / slot / "root"), kernel.MNT_DETACH)
    try:
        slot_fd = os.open(slot, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home)
    except FileNotFoundError:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir("root", dir_fd=slot_fd)  # empty once unmounted: only ever a mount point
        with contextlib.suppress(FileNotFoundError):
            os.unlink("info.json", dir_fd=slot_fd)
    finally:
        os.close(slot_fd)
    os.rmdir(slot, dir_fd=home)


def remove_stale() -> None:
    """Remove the library workspaces of processes that no longer exist (killed with -9)."""
    home = _home()
    try:
        for slot, record in _slots(home):
            owner = record.get("owner") if record else None
            if isinstance(owner, list) and len(owner) == 2 and _start_time(owner[0]) != owner[1]:
                _remove(home, slot)
    finally:
        os.close(home)


def names() -> list[str]:
    """The named workspaces on this host."""
    home = _home()
    try:
        return sorted(
            str(r["name"]) for _, r in _slots(home) if r and isinstance(r.get("name"), str)
        )
    finally:
        os.close(home)


class Workspace:
    """A persistent, size-capped work dir for many runs (see the module's docstring).

    ``Workspace(size="64M")`` makes one for this process; ``Workspace.create(name)`` a named
    one that outlives it; ``Workspace.open(name)`` opens a named one. Use it as a context
    manager, or call :meth:`close` (a named workspace stays; :meth:`remove` removes it).
    """

    def __init__(self, size: int | str = DEFAULT_SIZE, *, name: str | None = None) -> None:
        if os.geteuid() != 0:
            raise HostError(
                "a workspace needs root: its size cap is a tmpfs the sandbox mounts on the host",
                hint="without root, bind a directory of your own (--bind, binds=[...])",
            )
        if name is not None and not _NAME.match(name):
            raise ConfigError("request", "workspace", f"expected a lower-case name, got {name!r}")
        try:
            self.size = int(LIMITS["work_size"].parse(size))
        except ValueError as e:
            raise ConfigError("request", "size", str(e)) from None
        remove_stale()
        home = _home()
        try:
            if name is not None and name in names():
                raise ConfigError("request", "workspace", f"workspace {name!r} exists already")
            self.slot = self._claim(home)
            try:
                self._mount(home, name)
            except BaseException:
                _remove(home, self.slot)
                raise
        finally:
            os.close(home)
        self.name = name
        self._open()
        if name is None:  # removed at exit if nobody closed it
            self._finalizer: weakref.finalize[Any, Any] | None = weakref.finalize(
                self, _remove_slot, self.slot
            )
        else:
            self._finalizer = None

    @classmethod
    def create(cls, name: str, size: int | str = DEFAULT_SIZE) -> Workspace:
        """A named workspace, kept until :meth:`remove` (``sandbox workspace rm``)."""
        return cls(size, name=name)

    @classmethod
    def open(cls, name: str) -> Workspace:
        """The named workspace ``name``."""
        home = _home()
        try:
            for slot, record in _slots(home):
                if record and record.get("name") == name:
                    ws = cls.__new__(cls)
                    ws.slot, ws.name, ws._finalizer = slot, name, None
                    ws.size = int(record.get("size", DEFAULT_SIZE))
                    ws._open()
                    return ws
        finally:
            os.close(home)
        raise ConfigError("request", "workspace", f"no workspace named {name!r}")

    def _claim(self, home: int) -> str:
        from .box.userns import SLOTS

        for number in range(SLOTS):  # mkdir is the atomic claim of a slot
            slot = f"slot-{number}"
            try:
                os.mkdir(slot, 0o700, dir_fd=home)
            except FileExistsError:
                continue
            return slot
        raise HostError("all workspace slots are in use")

    def _mount(self, home: int, name: str | None) -> None:
        uid, _ = self._ids()
        slot_fd = os.open(self.slot, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home)
        try:
            os.mkdir("root", 0o700, dir_fd=slot_fd)
            owner = None if name is not None else [os.getpid(), _start_time(os.getpid())]
            record = {"name": name, "size": self.size, "owner": owner}
            fd = os.open("info.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=slot_fd)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
        finally:
            os.close(slot_fd)
        options = f"size={self.size},nr_inodes={MAX_INODES},mode=0755,uid={uid},gid={uid}"
        kernel.Kernel().mount(
            "sandbox-workspace", self._path(), "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, options
        )

    def _path(self) -> str:
        return str(state_dir() / _DIR / self.slot / "root")

    def _ids(self) -> tuple[int, int]:
        from .box.userns import WORKSPACE_BASE, WORKSPACE_INIT_BASE

        number = int(self.slot.removeprefix("slot-"))
        return WORKSPACE_BASE + number, WORKSPACE_INIT_BASE + number

    def _open(self) -> None:
        home = _home()
        try:
            fd = os.open(
                f"{self.slot}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home
            )
            lock = os.open(f"{self.slot}/info.json", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=home)
        finally:
            os.close(home)
        if os.fstat(fd).st_dev == os.fstat(lock).st_dev:  # not (or no longer) mounted
            os.close(fd)
            os.close(lock)
            raise HostError(f"workspace {self.name or self.slot} is not mounted")
        self._root, self._lock_fd, self._thread_lock = fd, lock, threading.Lock()
        uid, init = self._ids()
        self.root = WorkspaceRoot(self._path(), uid, uid, init, self.size)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """One user of the workspace at a time, in this process and across processes."""
        if self._root < 0:
            raise ConfigError("request", "workspace", "the workspace is closed")
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.asynccontextmanager
    async def held_async(self) -> AsyncIterator[None]:
        """:meth:`held` from asyncio: waits without blocking the event loop."""
        import asyncio

        if self._root < 0:
            raise ConfigError("request", "workspace", "the workspace is closed")
        while not self._thread_lock.acquire(blocking=False):
            await asyncio.sleep(_POLL)
        try:
            while True:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_POLL)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _parent(self, path: str, create: bool) -> tuple[int, str]:
        """The directory holding ``path`` (relative to the work dir) and its last name;
        ``create`` makes the missing directories, owned by the workspace's id."""
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ConfigError(
                "request", "path", f"expected a relative path inside the workspace, got {path!r}"
            )
        fd = os.dup(self._root)
        try:
            for part in parts[:-1]:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                        os.chown(part, *[self.root.uid] * 2, dir_fd=fd, follow_symlinks=False)
                child = open_beneath(fd, part, os.O_RDONLY | os.O_DIRECTORY)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the workspace (the box's ``/box/PATH``), replacing a
        regular file there; never through a symlink or into a FIFO a run left."""
        with self.held():
            self._put(path, data, mode)

    def get(self, path: str) -> bytes:
        """The content of the regular file ``path`` in the workspace."""
        with self.held():
            return self._get(path)

    def run(self, argv: list[str], **kwargs: Any) -> Report:
        """``sandbox.run(argv, **kwargs)`` with this workspace as the work dir (``/box``)."""
        from .api import run

        with self.held():
            return run(argv, workspace=self, **kwargs)

    async def aput(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """:meth:`put`, from asyncio."""
        async with self.held_async():
            self._put(path, data, mode)

    async def aget(self, path: str) -> bytes:
        """:meth:`get`, from asyncio."""
        async with self.held_async():
            return self._get(path)

    async def arun(self, argv: list[str], **kwargs: Any) -> Report:
        """``await sandbox.aio.run(argv, **kwargs)`` with this workspace as the work dir;
        cancelling it kills the box, as :func:`sandbox.aio.run` does."""
        from . import aio

        async with self.held_async():
            return await aio.run(argv, workspace=self, **kwargs)

    def _put(self, path: str, data: bytes | str, mode: int) -> None:
        content = data.encode() if isinstance(data, str) else bytes(data)
        try:
            parent, name = self._parent(path, create=True)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK
                fd = open_beneath(parent, name, flags, 0o600)
            finally:
                os.close(parent)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigError("request", "path", f"{path} is not a regular file")
                os.ftruncate(fd, 0)
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchown(fd, self.root.uid, self.root.gid)
                os.fchmod(fd, mode & 0o777)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._error(path, e) from None

    def _get(self, path: str) -> bytes:
        try:
            parent, name = self._parent(path, create=False)
            try:
                fd = open_beneath(parent, name, os.O_RDONLY | os.O_NONBLOCK)
            finally:
                os.close(parent)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigError("request", "path", f"{path} is not a regular file")
                return f.read()
        except OSError as e:
            raise self._error(path, e) from None

    def _error(self, path: str, e: OSError) -> SandboxError:
        if e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            return ConfigError(
                "request", "path", f"{path}: a symlink or a file is in the way, refused"
            )
        if e.errno == errno.ENOSPC:
            return ConfigError(
                "request", "path", f"{path}: the workspace is full ({self.size} bytes)"
            )
        return ConfigError("request", "path", f"{path}: {e.strerror}")

    def close(self) -> None:
        """Stop using it; a workspace of this process is removed, a named one stays."""
        if self._root < 0:
            return
        with self._thread_lock:
            os.close(self._root)
            os.close(self._lock_fd)
            self._root = self._lock_fd = -1
        if self._finalizer is not None:
            self._finalizer()

    def remove(self) -> None:
        """Close and remove the workspace, named or not."""
        self.close()
        _remove_slot(self.slot)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_slot(slot: str) -> None:
    home = _home()
    try:
        _remove(home, slot)
    finally:
        os.close(home)
