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
    first, fds, _, _ = socket.recv_fds(sock, _LENGTH.size, MAX_CAPTURES)
    if not first:
        raise ConnectionError("the box helper closed the connection")
    try:
        header = first + _recv_exactly(sock, _LENGTH.size - len(first))
        data = _recv_exactly(sock, _LENGTH.unpack(header)[0])
        # Our own helper process, over a private socketpair.
        return pickle.loads(data), fds  # noqa: S301
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionError("the box helper closed the connection")
        chunks += chunk
    return bytes(chunks)


def _serve_one(request: Request, conn: socket.socket, fds: list[int]) -> None:
    from .streams import FdSink, MemfdSink, Sink
    from .supervisor import run_box

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the helper ignores it; we wait for our box
    stdin_fd, *rest = fds
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
        send_result(conn, result, tuple(captures) if isinstance(result, Report) else ())


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
