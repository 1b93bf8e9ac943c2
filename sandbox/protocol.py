"""Messages between the box's processes and the supervisor, over one SOCK_SEQPACKET pair.

The supervisor's end has ``SO_PASSCRED``: the kernel stamps every message with the sender's pid
translated into the supervisor's pid namespace, so a child never has to say (or be trusted about)
who it is. A message is one JSON object; :func:`decode` accepts only the documented shapes.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from dataclasses import dataclass, field

# Child -> supervisor.
UNSHARED = "unshared"  # namespaces exist: write the id maps
READY = "ready"  # the native runner is in the box cgroup, waiting for its run (boxinit.py)
EXEC = "exec"  # execve is next; may carry the seccomp listener fd
SETUP_ERROR = "error"  # a phase failed: phase, op, errno, detail
EXEC_ERROR = "exec_error"  # execve failed: errno
EXITED = "exit"  # the program's wait status, from the box's init
# Without cgroups, from the box's init (sandbox/box/treelimits.py): the whole tree's CPU and memory
# as last sampled, when a limit fired (``limit`` is "cpu_time" or "memory") and, with ``limit``
# "", once more right before ``exit``. ``at`` is the sample's CLOCK_MONOTONIC in ns.
TREE = "tree"
# Supervisor -> child.
GO = "go"

_FIELDS: dict[str, dict[str, type]] = {
    UNSHARED: {},
    READY: {},
    EXEC: {"at": int, "cpu_ns": int},
    SETUP_ERROR: {"phase": str, "op": str, "errno": int, "detail": str},
    EXEC_ERROR: {"errno": int},
    EXITED: {"status": int, "at": int, "utime_us": int, "stime_us": int, "maxrss_kb": int},
    TREE: {"limit": str, "at": int, "user_us": int, "system_us": int, "memory_peak": int},
    GO: {},
}
MAX_MESSAGE = 4096
_CRED = struct.Struct("3i")


class ProtocolError(Exception):
    """A message that is not one of the documented shapes."""


@dataclass(frozen=True)
class Message:
    """One decoded message; ``pid`` is the sender's host pid (0 if the kernel gave none)."""

    kind: str
    fields: dict[str, int | str] = field(default_factory=dict)
    pid: int = 0
    fds: tuple[int, ...] = ()


def encode(kind: str, **fields: int | str) -> bytes:
    """Serialize a message; raises ProtocolError for an undocumented shape."""
    data = json.dumps({"t": kind, **fields}).encode()
    decode(data)  # the writer is held to the same rules as the reader
    return data


def decode(data: bytes) -> Message:
    """Parse and validate one message."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too long")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise ProtocolError("expected an object with a string 't'")
    kind = obj.pop("t")
    expected = _FIELDS.get(kind)
    if expected is None:
        raise ProtocolError(f"unknown message {kind!r}")
    if set(obj) != set(expected):
        raise ProtocolError(f"{kind}: expected fields {sorted(expected)}, got {sorted(obj)}")
    for name, kind_type in expected.items():
        value = obj[name]
        if type(value) is not kind_type:
            raise ProtocolError(f"{kind}.{name}: expected {kind_type.__name__}")
    return Message(kind, obj)


def send(sock: socket.socket, kind: str, fds: tuple[int, ...] = (), **fields: int | str) -> None:
    """Send one message, with ``fds`` attached as SCM_RIGHTS."""
    data = encode(kind, **fields)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendmsg([data])


def receive(sock: socket.socket) -> Message | None:
    """Receive one message (None at end of stream), with sender pid and attached fds."""
    anc = socket.CMSG_SPACE(_CRED.size) + socket.CMSG_SPACE(4 * 4)
    try:
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, anc)
    except ConnectionResetError:
        # The box's end closed while a message to it was still unread (a PREPARE its init did
        # not live to read): Linux then sets ECONNRESET on this end (net/unix/af_unix.c,
        # unix_release_sock) and reports it once, before the messages the box had sent and
        # are still queued here, such as why its setup failed. Read on: they come next, then
        # the end of the stream.
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, anc)
    fds: list[int] = []
    pid = 0
    for level, ctype, payload in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
        elif level == socket.SOL_SOCKET and ctype == socket.SCM_CREDENTIALS:
            pid = _CRED.unpack(payload[: _CRED.size])[0]
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("ancillary data truncated")
    msg = decode(data)
    return Message(msg.kind, msg.fields, pid, tuple(fds))


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end with SO_PASSCRED, child end). Both close-on-exec."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return parent, child
