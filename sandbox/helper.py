"""The library's box helper: a small single-threaded process that forks one supervisor per run.

A judge service is multi-threaded, and ``fork()`` in a threaded process is unsafe (a lock another
thread held stays locked in the child; ``unshare(CLONE_NEWUSER)`` refuses threaded callers). So
the library starts this helper once, with fork+exec, and sends it each run over a control socket
(the pattern of multiprocessing's ``forkserver``). Each run arrives as one message carrying a
pickled Spec and two descriptors: the run's own stream socket and the program's stdin. The
helper forks; the fork supervises the box and writes the pickled outcome to the run's socket.
The helper exits when the library closes the control socket.

Warm boxes (Core v2): after a run of some shape (the request but for argv, environment and
working directory), the helper keeps up to ``SANDBOX_POOL`` boxes of that shape built ahead
(default 2; 0 turns the pool off), each in a forked process of its own that has done every
step of the box's setup but the run itself (:class:`sandbox.supervisor.PreparedBox`). The next
run of that shape goes to one of them, which sends the runner its argv, environment and stdio
and supervises it as any run. A warm box runs once; the pool is refilled as soon as one is
taken, and at most :data:`MAX_WARM` boxes wait at once (the oldest shape's go first).

As root, boxes are built, and torn down after their report, at SCHED_IDLE (sched.py), so this
work never takes CPU from a program that is running; a box is raised back when its run comes.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import sched
from .errors import SandboxError
from .group import GroupSpec
from .report import Report
from .spec import NetworkMode, Spec

_LENGTH = struct.Struct("!Q")


@dataclass(frozen=True)
class Request:
    """One run (or a group's) sent to the helper, with (in this order) the run's socket, stdin,
    and stdout and stderr descriptors when the program's output goes to files."""

    spec: Spec | None
    stdout_to_fd: bool = False
    stderr_to_fd: bool = False
    group: GroupSpec | None = None

    @property
    def specs(self) -> list[Spec]:
        boxes = self.group.boxes if self.group is not None else ()
        return [b.spec for b in boxes] + ([self.spec] if self.spec is not None else [])

    @property
    def descriptors(self) -> int:
        return 2 + self.stdout_to_fd + self.stderr_to_fd


MAX_REQUEST = 1 << 20
MAX_CAPTURES = 2  # stdout and stderr memory files


def send_result(sock: socket.socket, result: Any, fds: tuple[int, ...] = ()) -> None:
    """Length-prefixed pickle on a stream socket; ``fds`` ride on the length's bytes."""
    data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    header = _LENGTH.pack(len(data))
    if fds:
        sent = socket.send_fds(sock, [header], list(fds))
        sock.sendall(header[sent:] + data)
    else:
        sock.sendall(header + data)


def receive_result(sock: socket.socket) -> tuple[Any, list[int]]:
    """Counterpart of :func:`send_result`: (result, descriptors); raises ConnectionError if
    the helper died."""
    reader = ResultReader()
    try:
        while wanted := reader.wanted():
            data, fds, _, _ = socket.recv_fds(sock, wanted, MAX_CAPTURES)
            reader.feed(data, fds)
        return reader.result()
    except BaseException:
        reader.close()
        raise


class ResultReader:
    """The decoding of one :func:`send_result` answer from what the socket gives, without the
    reading itself: the blocking receiver above and the asyncio one (aio.py) share it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.size: int | None = None  # of the pickle, once the length has come
        self.fds: list[int] = []

    def wanted(self) -> int:
        """How many bytes to read next (at most 1 MiB at a time); 0 once all have come."""
        if self.size is None:
            return _LENGTH.size - len(self.buffer)
        return min(self.size - len(self.buffer), 1 << 20)

    def feed(self, data: bytes, fds: list[int]) -> None:
        """Take what one read gave; end of file before the end raises ConnectionError."""
        self.fds += fds
        if not data:
            raise ConnectionError("the box helper closed the connection")
        self.buffer += data
        if self.size is None and len(self.buffer) == _LENGTH.size:
            self.size = _LENGTH.unpack(self.buffer)[0]
            self.buffer.clear()

    def result(self) -> tuple[Any, list[int]]:
        """(result, descriptors) once :meth:`wanted` is 0; the descriptors are the caller's."""
        # Our own helper process, over a private socketpair.
        result = pickle.loads(self.buffer)  # noqa: S301
        fds, self.fds = self.fds, []
        return result, fds

    def close(self) -> None:
        """Close the descriptors received so far (the answer is abandoned)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


MAX_WARM = 8
MAX_IDLE_TEARDOWNS = 4
DEFAULT_POOL = 2


def pool_size() -> int:
    """Warm boxes kept per shape: ``$SANDBOX_POOL`` (0 turns the pool off), else 2."""
    try:
        return max(0, min(int(os.environ.get("SANDBOX_POOL", DEFAULT_POOL)), MAX_WARM))
    except ValueError:
        return DEFAULT_POOL


def shape_of(spec: Spec) -> bytes | None:
    """The pool key of ``spec``, or None when its box is not built ahead: a linked group's
    (its network is made by its group), and one on an image (a box holds the store's shared
    lock from its start, and an idle box must not keep ``sandbox image prune`` waiting), and
    one in a workspace (its runs own the workspace's ids, one box at a time)."""
    if spec.link is not None or spec.image is not None or spec.workspace is not None:
        return None
    from .supervisor import PreparedBox

    return pickle.dumps(PreparedBox.shape(spec))


def _serve_one(request: Request, fds: list[int], box: Any = None, at: float = 0.0) -> None:
    """In a fork: run ``request`` (in ``box`` if it is one of its shape, else cold) and send
    the outcome on the run's socket, the first of ``fds`` (as the request message came)."""
    from .streams import FdSink, MemfdSink, Sink
    from .supervisor import run_box

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the helper ignores it; we wait for our box
    conn = socket.socket(fileno=fds[0])
    stdin_fd, *rest = fds[1:]
    sinks: list[Sink] = []
    # Captured output goes to memory files handed to the caller, not through this process's
    # heap and a pickle (which cost several copies of the output outside every limit).
    captures: list[int] = []
    for to_fd, name in ((request.stdout_to_fd, "stdout"), (request.stderr_to_fd, "stderr")):
        if to_fd:
            sinks.append(FdSink(rest.pop(0)))
        else:
            capture = MemfdSink(name)
            captures.append(capture.fd)
            sinks.append(capture)
    delivered = False

    def deliver(report: Report) -> None:
        nonlocal delivered
        delivered = True
        with contextlib.suppress(OSError):  # the caller went away
            send_result(conn, report, tuple(captures))

    try:
        if request.group is not None:
            from .group import run_group

            result: Any = run_group(request.group, cancel_fd=conn.fileno())
        elif request.spec is not None and box is not None and box.matches(request.spec):
            result = box.run(
                request.spec,
                stdin_fd,
                sinks[0],
                sinks[1],
                cancel_fd=conn.fileno(),
                requested_at=at,
                deliver=deliver,
            )
        elif request.spec is not None:
            if box is not None:  # a bind source was replaced since the box was built
                box.close()
            result = run_box(request.spec, stdin_fd, sinks[0], sinks[1], cancel_fd=conn.fileno())
        else:
            result = SandboxError("the box helper got an empty request")
    except SandboxError as e:
        result = e
    except Exception as e:  # any other failure still reaches the caller, as an error
        result = SandboxError(f"internal error in the box helper: {type(e).__name__}: {e}")
    if delivered:
        return
    with contextlib.suppress(OSError):  # the caller went away
        send_result(conn, result, tuple(captures) if isinstance(result, Report) else ())


@dataclass
class _Warm:
    """A forked process holding a box built ahead for ``shape``; ``sock`` takes its run."""

    pid: int
    sock: socket.socket
    shape: bytes


def _warm_box(spec: Spec, sock: socket.socket, helper_end: socket.socket) -> None:
    """In a fork of the helper: build a box of ``spec``'s shape, then serve one run from
    ``sock`` (a request message with its descriptors, as on the control socket; the helper
    keeps ``helper_end``)."""
    from .supervisor import PreparedBox

    helper_end.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sched.background()
    try:
        box = PreparedBox(spec)
    except SandboxError:
        box = None  # the run that comes still gets its error, from a cold start
    with contextlib.suppress(OSError):
        data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 4)
    at = time.monotonic()
    sched.foreground(os.getpid())  # again: a process forked while the helper raised us was missed
    if not data:
        if box is not None:
            box.close()
        return
    request = pickle.loads(data)  # noqa: S301 - sent by the helper that forked us
    _serve_one(request, fds, box, at)


def _fork(control: socket.socket, pool: _Pool, body: Callable[..., object], *args: Any) -> int:
    """Fork; the child closes the helper's descriptors (its control socket, the pool's), runs
    ``body(*args)`` and exits, never returning into the helper's loop. Returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            control.close()
            pool.close_in_child()
            body(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


class _Pool:
    """The warm boxes of every shape seen, bounded per shape and in all."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.size = pool_size()
        self.warm: list[_Warm] = []  # oldest first
        self.serving: list[tuple[int, int]] = []  # (pid, pidfd) of boxes taken, not yet gone

    def take(self, shape: bytes) -> _Warm | None:
        """The oldest warm box of ``shape``, out of the pool."""
        found = next((w for w in self.warm if w.shape == shape), None)
        if found is not None:
            self.warm.remove(found)
        return found

    def close_in_child(self) -> None:
        """In a fork: the pool's descriptors are the helper's, not this process's."""
        for warm in self.warm:
            warm.sock.close()
        for _, pidfd in self.serving:
            os.close(pidfd)

    def started(self, warm: _Warm) -> None:
        """``warm`` runs now, then tears down at SCHED_IDLE (sched.py). At most
        :data:`MAX_IDLE_TEARDOWNS` wait for idle CPU at once: with more, the host is too busy
        for idle time to come soon, and every box still tearing down is raised back, so
        their cgroups, mounts and id slots cannot pile up behind a busy host."""
        with contextlib.suppress(OSError):  # already gone: nothing to wait for
            self.serving.append((warm.pid, os.pidfd_open(warm.pid)))
        poller = select.poll()
        for _, pidfd in self.serving:
            poller.register(pidfd, select.POLLIN)
        gone = {fd for fd, _ in poller.poll(0)}  # a pidfd reads as ready once its process ended
        for fd in gone:
            os.close(fd)
        self.serving = [(pid, fd) for pid, fd in self.serving if fd not in gone]
        if len(self.serving) > MAX_IDLE_TEARDOWNS:
            # Only the box's supervisor tears down: its box is dead by then, and a box still
            # running has a program of its own below, which this process has no business with.
            for pid, _ in self.serving:
                sched.raise_process(pid)

    def fill(self, spec: Spec, shape: bytes) -> None:
        """Fork warm boxes of ``shape`` until the pool holds its share."""
        from .supervisor import PreparedBox

        template = replace(PreparedBox.shape(spec), argv=spec.argv[:1])
        while sum(w.shape == shape for w in self.warm) < self.size:
            if len(self.warm) >= MAX_WARM:
                self.warm.pop(0).sock.close()  # its process sees end of file and tears down
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = _fork(self.control, self, _warm_box, template, theirs, ours)
            theirs.close()
            self.warm.append(_Warm(pid, ours, shape))


def serve(control: socket.socket) -> None:
    """Loop: one message per run, until the control socket closes."""
    from .box.cgroups import backend
    from .box.seccomp import compile_filter, listener_supported

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's Ctrl-C is the caller's business
    # Detect once; every fork inherits the answer. Boxes are built ahead only on the native
    # path, which needs a cgroup (without one, the box's init needs the run's stdio to start).
    native = not isinstance(backend(), SandboxError)
    notify = listener_supported()
    pool = _Pool(control)
    while True:
        data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 4)
        if not data:
            return
        request = pickle.loads(data)  # noqa: S301 - sent by the library that started us
        if not isinstance(request, Request) or len(fds) != request.descriptors:
            for fd in fds:
                os.close(fd)
            continue
        for spec in request.specs:
            compile_filter(spec.profile.seccomp, notify=notify)  # inherited by forks
            if spec.profile.network is NetworkMode.LINKED:
                import pyroute2  # noqa: F401 - imported once here, not in every fork (250 ms)
        single = request.spec if request.group is None else None
        shape = shape_of(single) if single is not None and native and pool.size else None
        warm = pool.take(shape) if shape is not None else None
        if warm is not None:
            sched.foreground(warm.pid)  # it may still be building: it is this run's box now
            pool.started(warm)
            with contextlib.suppress(OSError):  # a warm box that died: it answers nothing
                socket.send_fds(warm.sock, [data], fds)
            warm.sock.close()
        else:
            _fork(control, pool, _serve_one, request, fds)
        for fd in fds:
            os.close(fd)
        if single is not None and shape is not None:
            pool.fill(single, shape)  # the next box of this shape builds while this one runs


def main() -> None:
    """Serve on the control socket whose number is the last command-line argument."""
    serve(socket.socket(fileno=int(sys.argv[-1])))
