"""The program's stdio on the supervisor's side: nothing shared with the caller, nothing blocking.

* **stdin** (:func:`private_stdin`): the program never gets the caller's open file description.
  A description is shared by every descriptor dup'ed from it, so flags and offsets the program
  set (``O_NONBLOCK`` on a shell's terminal or pipe, a file offset) would change the caller's.
  The supervisor opens the same file or pipe again through ``/proc/self/fd/N`` (a new
  description; a file keeps its current offset). A socket cannot be opened again, a terminal's
  settings (echo, size, exclusive mode) belong to the terminal, not to a description, and a
  world-writable file (a memfd) could be opened again for writing by the box: for those the
  program gets a pipe fed by a small copier process.
* **stdout/stderr** (:class:`FdSink`): the supervisor copies the program's pipes to the
  caller's descriptors without ever blocking, since the same loop enforces the time limits
  (a consumer that never reads must not suspend them). Pipes and terminals are opened again
  with ``O_NONBLOCK`` (again a new description, so the caller's flags stay as they are), sockets
  are written with ``MSG_DONTWAIT``; what cannot be written now waits in a bounded backlog, and
  the supervisor stops reading the program's pipe while the backlog is full: back-pressure
  slows the program, never the enforcement.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
from typing import Protocol

#: Bytes a sink may hold for a slow consumer before the program's pipe is no longer read.
MAX_BACKLOG = 1 << 20


class Sink(Protocol):
    """Where one output stream of the program goes."""

    def write(self, data: bytes) -> None:
        """Take ``data``; never blocks (keeps what cannot be written now)."""

    @property
    def backlog(self) -> int:
        """Bytes taken but not written yet."""

    def wait_fd(self) -> int | None:
        """The descriptor to wait on (writable) while there is a backlog."""

    def flush(self) -> None:
        """Write what can be written now, without blocking."""

    def finish(self) -> None:
        """Write everything left, waiting for the consumer (after the box is gone)."""


class _Capture:
    """A sink that keeps what it takes at once: no backlog, nothing to wait for."""

    backlog = 0

    def wait_fd(self) -> int | None:
        return None

    def flush(self) -> None:
        return None

    def finish(self) -> None:
        return None


class BufferSink(_Capture):
    """Capture in memory (the report gets the bytes: groups, doctor)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data


class MemfdSink(_Capture):
    """Capture into a memory file the library's caller reads once (no copies in between):
    the helper hands the descriptor over instead of the bytes (see ``helper.py``)."""

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(f"sandbox-{name}", os.MFD_CLOEXEC)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


class DiscardSink(_Capture):
    """Count and drop (the output of a repeated run after the first, ``--repeat``)."""

    def write(self, data: bytes) -> None:
        return None


def sealed_input(data: bytes) -> int:
    """A memory file holding ``data`` for a program's stdin, sealed read-only: the box could
    open it again for writing (a memfd is 0777) and change what a later reader would see."""
    fd = os.memfd_create("sandbox-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    return fd


def read_all(fd: int) -> bytes:
    """Everything left to read from ``fd`` (every repeated run reads the same input)."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_capture(fd: int) -> bytes:
    """The whole content of a :class:`MemfdSink`'s file (closes ``fd``)."""
    try:
        size = os.fstat(fd).st_size
        parts = []
        offset = 0
        while offset < size:  # read(2) returns at most ~2 GiB at once
            chunk = os.pread(fd, min(size - offset, 1 << 30), offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def _reopen(fd: int, flags: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_NOCTTY | os.O_CLOEXEC)


class FdSink:
    """Copy to a descriptor (the CLI's stdout/stderr, or a file) without ever blocking."""

    def __init__(self, fd: int) -> None:
        self.pending = bytearray()
        self.broken = False  # the reader went away: output is still counted, then dropped
        self._socket: socket.socket | None = None
        self._owned: int | None = None
        mode = os.fstat(fd).st_mode
        self.fd = fd
        if stat.S_ISREG(mode):
            return  # a file's writes do not wait for anyone
        if stat.S_ISSOCK(mode):
            self._socket = socket.socket(fileno=os.dup(fd))
            return
        try:
            self._owned = _reopen(fd, os.O_WRONLY | os.O_NONBLOCK)
            self.fd = self._owned
        except OSError as e:
            # ENXIO: a FIFO without a reader. Anything else: write to the caller's own
            # description (the consumer can then make us wait, as any pipeline would).
            self.broken = e.errno == errno.ENXIO

    @property
    def backlog(self) -> int:
        return len(self.pending)

    def write(self, data: bytes) -> None:
        if self.broken:
            return
        self.pending += data
        self.flush()

    def wait_fd(self) -> int | None:
        if self._socket is not None:
            return self._socket.fileno()
        return self._owned

    def _write_some(self, view: memoryview) -> int:
        if self._socket is not None:
            return self._socket.send(view, socket.MSG_DONTWAIT)
        return os.write(self.fd, view)

    def flush(self) -> None:
        while self.pending and not self.broken:
            broken = False
            with memoryview(self.pending) as view:  # released before pending is resized
                try:
                    written = self._write_some(view)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENXIO):
                        raise
                    broken = True
            if broken:
                self.broken = True
                self.pending.clear()
                return
            del self.pending[:written]

    def finish(self) -> None:
        fd = self.wait_fd()
        while self.pending and not self.broken:
            if fd is not None:
                select.select([], [fd], [])
            self.flush()
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._owned is not None:
            os.close(self._owned)
            self._owned = None


def private_stdin(fd: int) -> tuple[int, int | None]:
    """A descriptor of the program's stdin that shares no open file description with ``fd``,
    and the pid of the copier feeding it (None when ``fd``'s file could be opened again)."""
    st = os.fstat(fd)
    if not (stat.S_ISSOCK(st.st_mode) or os.isatty(fd) or _writable_by_others(fd, st)):
        try:
            # O_NONBLOCK: opening a FIFO whose writer is gone must not wait for a new one.
            new = _reopen(fd, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            pass
        else:
            os.set_blocking(new, True)
            if stat.S_ISREG(st.st_mode):
                with contextlib.suppress(OSError):
                    os.lseek(new, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
            return new, None
    return _copier(fd)


def _writable_by_others(fd: int, st: os.stat_result) -> bool:
    """A regular file the box could open again for writing through ``/proc/self/fd/0`` (a
    memfd is 0777) and that no seals make unchangeable: the program must get a copy instead."""
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o002:
        return False
    try:
        # Truncating or growing it through the reopened path would change it as much.
        sealed = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & sealed != sealed
    except OSError:  # not a memfd: no seals
        return True


def _copier(source: int) -> tuple[int, int]:
    """Fork a process that copies ``source`` into a pipe until end of file (for sockets).

    Forked by the single-threaded supervisor; it dies with the supervisor (parent-death
    signal) and is killed when the run ends.
    """
    from .kernel import Kernel

    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            Kernel().set_pdeathsig(signal.SIGKILL)
            # Forked from a supervisor that may already hold a box's descriptors (a box built
            # ahead of its run): keep only the two ends it copies between.
            Kernel().close_fds_except((source, write_end))  # read_end too
            if os.getppid() == parent:
                while chunk := os.read(source, 1 << 16):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(write_end, view) :]
        finally:
            os._exit(0)
    os.close(write_end)
    return read_end, pid


def stop_copier(pid: int | None) -> None:
    """Kill and reap the copier of :func:`private_stdin`, if there is one."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
