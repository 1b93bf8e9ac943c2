"""The library's box helper: a small single-threaded process that forks one supervisor per run.

A judge service is multi-threaded, and ``fork()`` in a threaded process is unsafe (a lock another
thread held stays locked in the child; ``unshare(CLONE_NEWUSER)`` refuses threaded callers). So
the library starts this helper once, with fork+exec, and sends it each run over a control socket
(the pattern of multiprocessing's ``forkserver``). Each run arrives as one message carrying a
pickled Spec and two descriptors: the run's own stream socket and the program's stdin. The
helper forks; the fork supervises the box and writes the pickled outcome to the run's socket.
The helper exits when the library closes the control socket.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

from .errors import SandboxError
from .group import GroupSpec
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


def send_result(sock: socket.socket, result: Any) -> None:
    """Length-prefixed pickle on a stream socket."""
    data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def receive_result(sock: socket.socket) -> Any:
    """Counterpart of :func:`send_result`; raises ConnectionError if the helper died."""
    header = _recv_exactly(sock, _LENGTH.size)
    data = _recv_exactly(sock, _LENGTH.unpack(header)[0])
    return pickle.loads(data)  # noqa: S301 - our own helper process, over a private socketpair


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionError("the box helper closed the connection")
        chunks += chunk
    return bytes(chunks)


def _serve_one(request: Request, conn: socket.socket, fds: list[int]) -> None:
    from .supervisor import BufferSink, FdSink, Sink, run_box

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the helper ignores it; we wait for our box
    stdin_fd, *rest = fds
    sinks: list[Sink] = []
    for to_fd in (request.stdout_to_fd, request.stderr_to_fd):
        sinks.append(FdSink(rest.pop(0)) if to_fd else BufferSink())
    try:
        if request.group is not None:
            from .group import run_group

            result: Any = run_group(request.group)
        elif request.spec is not None:
            result = run_box(request.spec, stdin_fd, sinks[0], sinks[1], cancel_fd=conn.fileno())
        else:
            result = SandboxError("the box helper got an empty request")
    except SandboxError as e:
        result = e
    except Exception as e:  # any other failure still reaches the caller, as an error
        result = SandboxError(f"internal error in the box helper: {type(e).__name__}: {e}")
    with contextlib.suppress(OSError):  # the caller went away
        send_result(conn, result)


def serve(control: socket.socket) -> None:
    """Loop: one message per run, until the control socket closes."""
    from .seccomp import compile_filter
    from .supervisor import cgroup_backend, listener_supported

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's Ctrl-C is the caller's business
    cgroup_backend()  # detect once; every fork inherits the answer
    notify = listener_supported()
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
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                _serve_one(request, socket.socket(fileno=fds[0]), fds[1:])
                code = 0
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)


def main() -> None:
    """Serve on the control socket whose number is the last command-line argument."""
    serve(socket.socket(fileno=int(sys.argv[-1])))
