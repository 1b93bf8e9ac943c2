"""Workspaces: a work dir that persists across runs, so a judge compiles once and runs the
result against every test without a writable host bind.

A workspace is a size-capped tmpfs the sandbox mounts on the host, in a root-only directory of
its state dir (``$SANDBOX_HOME/workspaces/slot-N/root``), and binds over the work dir (``/box``)
of every run in it. Its files, and every box run in it, belong to one host id of its own
(``userns.WORKSPACE_BASE + N``), so what one run writes the next may run or rewrite. Nothing of
the host is inside: a program can leave only symlinks, FIFOs and ordinary files there
(``nodev``, ``nosuid``), and the host side never follows one: ``put``/``get`` resolve every
path beneath the workspace's own descriptor (:func:`sandbox.boxdir.open_beneath`: no symlink,
no way out) and open only regular files, without blocking; the mount and unmount name their
directory by descriptor (``/proc/self/fd/N``), so no path is resolved again after it was
checked; removing a workspace unmounts it instead of walking what a program left.

Locks (``flock``, released by the kernel even after SIGKILL):

* ``workspaces/.lock`` serializes making, removing and reclaiming workspaces, so a name is
  claimed once and a slot is never reclaimed while it is being made;
* ``slot-N/lock`` is held by whoever uses the workspace (a run, ``put``, ``get``, its
  removal); a removal unlinks it, so a handle still open on a removed workspace is refused
  instead of reaching the next workspace to take the slot;
* ``slot-N/owner`` is held for its whole life by the process that made a library workspace:
  when it can be taken, the owner is gone (killed with -9), and the next workspace made on the
  host removes it.

A library workspace (``with sandbox.Workspace() as ws``) is removed when it is closed or its
process exits; a named one (``sandbox workspace create NAME``) stays until ``sandbox workspace
rm NAME``. One user at a time holds a workspace.
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
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
DEFAULT_SIZE = 64 << 20
#: Inodes per workspace: one per 4 KiB of its size (kernel memory a run can pin, slab included,
#: grows with them, not with the size), within these bounds.
MIN_INODES, MAX_INODES = 1024, 65536
_POLL = 0.005  # seconds between tries of a busy workspace from asyncio
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def _home() -> int:
    """A descriptor of ``$SANDBOX_HOME/workspaces`` (made root-only)."""
    if os.geteuid() != 0:
        raise HostError(
            "a workspace needs root: its size cap is a tmpfs the sandbox mounts on the host",
            hint="without root, bind a directory of your own (--bind, binds=[...])",
        )
    from .state import open_private_dir

    try:
        return open_private_dir(_DIR, create=True)
    except OSError as e:
        raise HostError(f"cannot use {state_dir() / _DIR}: {e.strerror or e}") from None


@contextlib.contextmanager
def _lifecycle() -> Iterator[int]:
    """The workspaces directory, with its lock held: one creation or removal at a time."""
    home = _home()
    try:
        lock = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=home)  # fmt: skip
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield home
        finally:
            os.close(lock)
    finally:
        os.close(home)


def _record(slot_fd: int) -> dict[str, Any] | None:
    """A workspace's record (written by the sandbox, in a root-only directory)."""
    try:
        fd = os.open("info.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=slot_fd)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        try:
            data = json.load(f)
        except ValueError:
            return None
    return data if isinstance(data, dict) else None


def _slots(home: int) -> Iterator[tuple[str, int]]:
    """(name, descriptor) of every slot directory; each descriptor is closed after its turn."""
    for entry in sorted(os.listdir(home)):
        if entry.startswith("slot-") and entry[5:].isdigit():
            try:
                fd = os.open(entry, _DIRECTORY, dir_fd=home)
            except OSError:
                continue
            try:
                yield entry, fd
            finally:
                os.close(fd)


def _find(home: int, name: str) -> str | None:
    for slot, fd in _slots(home):
        record = _record(fd)
        if record is not None and record.get("name") == name:
            return slot
    return None


def _unmount(slot_fd: int) -> None:
    """Unmount the slot's tmpfs, naming it by descriptor (a path could be swapped)."""
    try:
        root = os.open("root", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=slot_fd)
    except FileNotFoundError:
        return
    try:
        with contextlib.suppress(OSError):  # EINVAL: not mounted (a reboot, a crash)
            kernel.Kernel().umount2(f"/proc/self/fd/{root}", kernel.MNT_DETACH)
    finally:
        os.close(root)


def _remove(home: int, slot: str) -> None:
    """Remove one workspace (with the lifecycle lock held): wait for its user, unlink its
    lock so no handle can use it again, unmount it; nothing a program left is walked."""
    try:
        slot_fd = os.open(slot, _DIRECTORY, dir_fd=home)
    except FileNotFoundError:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            lock = os.open("lock", _FILE, dir_fd=slot_fd)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the run in it, if any, ends first
                os.unlink("lock", dir_fd=slot_fd)
            finally:
                os.close(lock)
        _unmount(slot_fd)
        for name in ("info.json", "owner"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=slot_fd)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir("root", dir_fd=slot_fd)  # only ever a mount point
    except OSError as e:
        raise HostError(f"cannot remove workspace {slot}: {e.strerror}") from None
    finally:
        os.close(slot_fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(slot, dir_fd=home)


def _stale(slot_fd: int) -> bool:
    """Whether a slot belongs to nobody: a library workspace whose owner is gone, or one whose
    making never finished (no record)."""
    record = _record(slot_fd)
    if record is None:
        return True
    if record.get("name") is not None:
        return False  # named: kept until removed
    try:
        owner = os.open("owner", _FILE, dir_fd=slot_fd)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its owner holds it: alive
    finally:
        os.close(owner)
    return True


def remove_stale() -> None:
    """Remove the library workspaces of processes that no longer exist (killed with -9)."""
    with _lifecycle() as home:
        for slot in [slot for slot, fd in _slots(home) if _stale(fd)]:
            with contextlib.suppress(HostError):
                _remove(home, slot)


def names() -> list[str]:
    """The named workspaces on this host."""
    with _lifecycle() as home:
        found = (_record(fd) for _, fd in _slots(home))
        return sorted(str(r["name"]) for r in found if r and isinstance(r.get("name"), str))


def remove_named(name: str) -> None:
    """Remove the named workspace ``name``, mounted or not (after a reboot it is not)."""
    with _lifecycle() as home:
        slot = _find(home, name)
        if slot is None:
            raise ConfigError("request", "workspace", f"no workspace named {name!r}")
        _remove(home, slot)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError("request", "workspace", f"expected a lower-case name, got {name!r}")
    return name


class Workspace:
    """A persistent, size-capped work dir for many runs (see the module's docstring).

    ``Workspace(size="64M")`` makes one for this process; ``Workspace.create(name)`` a named
    one that outlives it; ``Workspace.open(name)`` opens a named one. Use it as a context
    manager, or call :meth:`close` (a named workspace stays; :meth:`remove` removes it).
    """

    def __init__(self, size: int | str = DEFAULT_SIZE, *, name: str | None = None) -> None:
        if name is not None:
            _check_name(name)
        try:
            self.size = int(LIMITS["work_size"].parse(size))
        except ValueError as e:
            raise ConfigError("request", "size", str(e)) from None
        remove_stale()
        with _lifecycle() as home:
            if name is not None and _find(home, name) is not None:
                raise ConfigError("request", "workspace", f"workspace {name!r} exists already")
            self.slot = self._claim(home)
            try:
                owner = self._make(home, name)
                self._attach(home, owner)
            except BaseException:
                with contextlib.suppress(HostError):
                    _remove(home, self.slot)
                raise
        self.name = name
        # A library workspace goes when its process exits (not a forked child's exit).
        self._finalizer = (
            weakref.finalize(self, _remove_owned, self.slot, os.getpid()) if name is None else None
        )

    @classmethod
    def create(cls, name: str, size: int | str = DEFAULT_SIZE) -> Workspace:
        """A named workspace, kept until :meth:`remove` (``sandbox workspace rm``)."""
        return cls(size, name=name)

    @classmethod
    def open(cls, name: str) -> Workspace:
        """The named workspace ``name``."""
        _check_name(name)
        with _lifecycle() as home:
            slot = _find(home, name)
            if slot is None:
                raise ConfigError("request", "workspace", f"no workspace named {name!r}")
            ws = cls.__new__(cls)
            ws.slot, ws.name, ws._finalizer = slot, name, None
            slot_fd = os.open(slot, _DIRECTORY, dir_fd=home)
            try:
                record = _record(slot_fd) or {}
            finally:
                os.close(slot_fd)
            ws.size = int(record.get("size", DEFAULT_SIZE))
            ws._attach(home, None)
            return ws

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

    def _make(self, home: int, name: str | None) -> int | None:
        """Write the record and locks, and mount the tmpfs; returns the owner lock's
        descriptor (held for this process's life) for a library workspace."""
        uid, _ = self._ids()
        slot_fd = os.open(self.slot, _DIRECTORY, dir_fd=home)
        try:
            owner = None
            if name is None:
                owner = os.open("owner", _FILE | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=slot_fd)
                fcntl.flock(owner, fcntl.LOCK_EX)
            os.close(os.open("lock", _FILE | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=slot_fd))
            os.mkdir("root", 0o700, dir_fd=slot_fd)
            record = {"name": name, "size": self.size}
            fd = os.open("info.json", _FILE | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=slot_fd)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            root = os.open("root", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=slot_fd)
            try:
                inodes = max(MIN_INODES, min(MAX_INODES, self.size // 4096))
                options = f"size={self.size},nr_inodes={inodes},mode=0755,uid={uid},gid={uid}"
                kernel.Kernel().mount(
                    "sandbox-workspace",
                    f"/proc/self/fd/{root}",  # the directory just made, not a path again
                    "tmpfs",
                    kernel.MS_NOSUID | kernel.MS_NODEV,
                    options,
                )
            finally:
                os.close(root)
            return owner
        finally:
            os.close(slot_fd)

    def _ids(self) -> tuple[int, int]:
        from .box.userns import WORKSPACE_BASE, WORKSPACE_INIT_BASE

        number = int(self.slot.removeprefix("slot-"))
        return WORKSPACE_BASE + number, WORKSPACE_INIT_BASE + number

    def _attach(self, home: int, owner: int | None) -> None:
        """Open the slot, its lock and its mounted root; refuse a slot whose tmpfs is gone."""
        slot_fd = os.open(self.slot, _DIRECTORY, dir_fd=home)
        try:
            root = os.open("root", _DIRECTORY, dir_fd=slot_fd)
            lock = os.open("lock", _FILE, dir_fd=slot_fd)
        except OSError:
            os.close(slot_fd)
            raise HostError(f"workspace {self.name or self.slot} is damaged") from None
        if os.fstat(root).st_dev == os.fstat(slot_fd).st_dev:
            for fd in (root, lock, slot_fd):
                os.close(fd)
            raise HostError(
                f"workspace {self.name or self.slot} is not mounted (after a reboot?)",
                hint="remove it (sandbox workspace rm) and create it again",
            )
        self._slot_fd, self._root, self._lock_fd, self._owner = slot_fd, root, lock, owner
        self._mount_dev = os.fstat(root).st_dev
        self._thread_lock, self._depth = threading.RLock(), 0
        uid, init = self._ids()
        path = str(state_dir() / _DIR / self.slot / "root")
        self.root = WorkspaceRoot(path, uid, uid, init, self.size)

    def _take(self) -> None:
        """With the thread lock held: the workspace's lock, then checks that it is still this
        workspace, mounted, with its root the box's again (a run may have chmod'ed it)."""
        if self._depth == 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._check()
        self._depth += 1

    def _check(self) -> None:
        try:
            current = os.stat("root", dir_fd=self._slot_fd, follow_symlinks=False)
            removed = os.fstat(self._lock_fd).st_nlink == 0
        except OSError:
            removed = True
        if removed or current.st_dev != self._mount_dev:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            raise ConfigError("request", "workspace", "the workspace was removed")
        os.fchown(self._root, self.root.uid, self.root.gid)
        os.fchmod(self._root, 0o755)

    def _give(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the workspace: one user at a time, in this process and across processes
        (reentrant within a thread)."""
        self._open_or_fail()
        with self._thread_lock:
            self._take()
            try:
                yield
            finally:
                self._give()

    @contextlib.asynccontextmanager
    async def held_async(self) -> AsyncIterator[None]:
        """:meth:`held` from asyncio: waits without blocking the event loop."""
        import asyncio

        self._open_or_fail()
        while not self._thread_lock.acquire(blocking=False):
            await asyncio.sleep(_POLL)
        try:
            while self._depth == 0:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    await asyncio.sleep(_POLL)
                    continue
                self._check()
                break
            self._depth += 1
            try:
                yield
            finally:
                self._give()
        finally:
            self._thread_lock.release()

    def _open_or_fail(self) -> None:
        if self._root < 0:
            raise ConfigError("request", "workspace", "the workspace is closed")

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the workspace (the box's ``/box/PATH``), replacing a
        regular file there; never through a symlink or into a FIFO a run left."""
        if not isinstance(data, bytes | bytearray | memoryview | str):
            raise ConfigError(
                "request", "data", f"expected bytes or str, got {type(data).__name__}"
            )
        with self.held():
            self._put(path, data, mode)

    def get(self, path: str) -> bytes:
        """The content of the regular file ``path`` in the workspace."""
        with self.held():
            return self._get(path)

    def run(self, argv: list[str], **kwargs: Any) -> Report:
        """``sandbox.run(argv, **kwargs)`` with this workspace as the work dir (``/box``)."""
        from .api import run

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

        return await aio.run(argv, workspace=self, **kwargs)

    def _parent(self, path: str, create: bool) -> tuple[int, str]:
        """The directory holding ``path`` (relative to the work dir) and its last name;
        ``create`` makes the missing directories, owned by the workspace's id."""
        if not isinstance(path, str):
            raise ConfigError("request", "path", f"expected a path string, got {path!r}")
        parts = path.split("/")
        bad = "\0" in path or path.startswith("/") or any(p in ("", ".", "..") for p in parts)
        try:
            os.fsencode(path)
        except UnicodeEncodeError:
            bad = True
        if bad:
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

    def _put(self, path: str, data: bytes | bytearray | memoryview | str, mode: int) -> None:
        content = data.encode() if isinstance(data, str) else bytes(data)
        try:
            parent, name = self._parent(path, create=True)
            try:
                fd = open_beneath(parent, name, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o600)
            finally:
                os.close(parent)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigError("request", "path", f"{path!r} is not a regular file")
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
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ConfigError("request", "path", f"{path!r} is not a regular file")
                if st.st_size > self.size:  # sparse: it may claim more than the tmpfs holds
                    raise ConfigError(
                        "request", "path", f"{path!r} is larger than the workspace ({self.size})"
                    )
                return f.read(self.size + 1)
        except OSError as e:
            raise self._error(path, e) from None

    def _error(self, path: str, e: OSError) -> SandboxError:
        if e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            return ConfigError(
                "request", "path", f"{path!r}: a symlink or a file is in the way, refused"
            )
        if e.errno == errno.ENOSPC:
            return ConfigError(
                "request", "path", f"{path!r}: the workspace is full ({self.size} bytes)"
            )
        return ConfigError("request", "path", f"{path!r}: {e.strerror}")

    def close(self) -> None:
        """Stop using it; a workspace of this process is removed, a named one stays."""
        if self._root < 0:
            return
        with self._thread_lock:
            for fd in (self._root, self._lock_fd, self._slot_fd):
                os.close(fd)
            self._root = self._lock_fd = self._slot_fd = -1
        if self._finalizer is not None:
            self._finalizer()
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    def remove(self) -> None:
        """Close and remove the workspace, named or not."""
        self.close()
        if self.name is not None:
            remove_named(self.name)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_owned(slot: str, pid: int) -> None:
    """A library workspace's end: removed by the process that made it, never by a child
    that inherited the object across fork."""
    if os.getpid() != pid:
        return
    with _lifecycle() as home, contextlib.suppress(HostError):
        _remove(home, slot)
