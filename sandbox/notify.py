"""The seccomp listener's receiver: a small process that keeps one NOTIF_RECV always blocked.

Every notification of the box's filter is a forbidden syscall (the filter's only notify action is
its kill action). A notification is removed again when its caller dies, or when a signal
interrupts its wait, before anyone received it; then the listener never polls readable, and the
only trace left is the kernel's count of requests: a RECV that is already blocked, or that starts
while the count is above zero, is woken by the request and returns ENOENT when it finds the
notification gone (seccomp_unotify(2) documents ENOENT for a target that died). Polling the
listener cannot see that, so a process waits in RECV the whole time the program runs, and tells
the supervisor about every return on a socket its event loop watches.

A process, not a thread: the supervisor forks the box, and may run many boxes in one process
(the image builder), and forking a process with threads is forbidden here. It is forked before
any of the box's processes exist, keeps only its socket, and dies with the supervisor
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct

from .kernel import Kernel
from .seccomp import describe_syscall

# seccomp_unotify(2): struct seccomp_notif is {u64 id; u32 pid; u32 flags; struct seccomp_data}
# and seccomp_data is {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}.
_NOTIF = struct.Struct("=QIIiIQ6Q")
SECCOMP_IOCTL_NOTIF_RECV = 0xC0000000 | (_NOTIF.size << 16) | (ord("!") << 8)
# Linux 6.11 made a RECV return (ENOENT) once no task is left under the filter; before, it
# blocks on, and the receiver has no last word to wait for.
RECV_ENDS = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2]) >= (6, 11)
# One report: kind, then (nr, arch) for a received call or (errno, 0) for a failed RECV.
_REPORT = struct.Struct("=ciI")
_CALL, _VANISHED, _FAILED, _END = b"C", b"V", b"F", b"E"


VANISHED = "unknown (its caller was gone before the supervisor could read it)"


class Receiver:
    """The supervisor's side of one run's receiver process."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.pid = os.fork()
        if self.pid == 0:  # the forked receiver
            code = 1
            try:
                ours.close()
                code = _serve(theirs)
            finally:
                os._exit(code)
        theirs.close()

    def hand_over(self, listener: int) -> None:
        """Give the receiver its copy of the box's listener (the supervisor keeps its own)."""
        socket.send_fds(self.sock, [b"L"], [listener])

    def read(self) -> str | None:
        """The next forbidden call's name (``unknown (...)`` when it vanished before RECV);
        None once the receiver is done: no task is left under the filter."""
        try:
            data = self.sock.recv(_REPORT.size)
        except OSError:
            data = b""
        if len(data) != _REPORT.size:  # fail closed: nobody listens any more
            return "unknown (the seccomp receiver ended before the program)"
        kind, value, arch = _REPORT.unpack(data)
        if kind == _CALL:
            return describe_syscall(arch, value)
        if kind == _VANISHED:
            return VANISHED
        if kind == _FAILED:
            return f"unknown (SECCOMP_IOCTL_NOTIF_RECV failed: {os.strerror(value)})"
        return None

    def stop(self) -> None:
        """Kill and reap it. Only after the box is killed: its listener copy closes with it."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.sock.close()


def _serve(sock: socket.socket) -> int:  # the forked receiver
    parent = os.getppid()
    kernel = Kernel()
    kernel.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before the death signal was armed
        return 1
    # Keep nothing of the supervisor's: a pipe end held here would keep a peer from its EOF.
    kernel.close_fds_except((sock.fileno(),))
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if not fds:
        return 0  # the run ended before the program's execve
    listener = fds[0]
    buf = bytearray(_NOTIF.size)
    while True:
        try:
            fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno != errno.ENOENT:
                sock.send(_REPORT.pack(_FAILED, e.errno or 0, 0))
                return 0
            # ENOENT also answers at once once the filter has no users left (EPOLLHUP): then
            # it means nothing, and nothing can notify any more. Users never come back, so
            # ENOENT without HUP afterwards is a request whose caller vanished.
            if _hung_up(listener):
                sock.send(_REPORT.pack(_END, 0, 0))
                return 0
            sock.send(_REPORT.pack(_VANISHED, 0, 0))
            continue
        # Never answered: the caller stays blocked in its syscall until the box is killed.
        _, _, _, nr, arch, *_ = _NOTIF.unpack(buf)
        sock.send(_REPORT.pack(_CALL, nr, arch))


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))
