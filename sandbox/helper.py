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
from typing import Any

from .errors import SandboxError
from .spec import Spec

_LENGTH = struct.Struct("!Q")
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


def _serve_one(spec: Spec, conn: socket.socket, stdin_fd: int) -> None:
    from .supervisor import BufferSink, run_box

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the helper ignores it; we wait for our box
    try:
        result: Any = run_box(spec, stdin_fd, BufferSink(), BufferSink(), cancel_fd=conn.fileno())
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
        data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 2)
        if not data:
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        spec = pickle.loads(data)  # noqa: S301 - sent by the library that started us
        compile_filter(spec.profile.seccomp, notify=notify)  # cached here, inherited by forks
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                _serve_one(spec, socket.socket(fileno=fds[0]), fds[1])
                code = 0
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)


def main() -> None:
    """Serve on the control socket whose number is the last command-line argument."""
    serve(socket.socket(fileno=int(sys.argv[-1])))
