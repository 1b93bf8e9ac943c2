"""Messages between the box's processes and the supervisor, over one SOCK_SEQPACKET pair.

Each kind of message is one class below; :func:`encode` writes one as a JSON object whose
``t`` names its kind (the native box init, sandbox/native/boxinit.c, writes the same objects),
and :func:`decode` accepts only these shapes, with exactly their fields, of exactly their types.
The supervisor's end has ``SO_PASSCRED``: the kernel stamps every message with the sender's pid
translated into the supervisor's pid namespace, so a child never has to say (or be trusted about)
who it is; :func:`receive` hands that pid and the attached descriptors beside the message.

The kinds are NamedTuples rather than dataclasses: made at import several times faster, and every
run imports this module (docs/performance.md). A NamedTuple compares equal to any tuple of the
same values, so code tells kinds apart by their class (``match``), never with ``==``.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import typing
from typing import NamedTuple, TypeAlias

# Child -> supervisor.


class Unshared(NamedTuple):
    """The namespaces exist: write the id maps, then answer :class:`Go`."""


class Ready(NamedTuple):
    """The native runner is in the box cgroup, waiting for its run (boxinit.py)."""


class Exec(NamedTuple):
    """execve is next: its CLOCK_MONOTONIC instant and the CPU the process used before it, in
    ns; may carry the seccomp listener's descriptor."""

    at: int
    cpu_ns: int


class SetupError(NamedTuple):
    """A phase of the box's setup failed: its name, the operation, the errno (0 when no system
    call failed) and a detail (the kernel's text, or why)."""

    phase: str
    op: str
    errno: int
    detail: str


class ExecError(NamedTuple):
    """The program's execve failed (or it was not found) with ``errno``."""

    errno: int


class Exited(NamedTuple):
    """The program's wait status and rusage, from the box's init, and when it ended (ns)."""

    status: int
    at: int
    utime_us: int
    stime_us: int
    maxrss_kb: int


class Tree(NamedTuple):
    """Without cgroups, from the box's init (sandbox/box/treelimits.py): the whole tree's CPU
    and memory as last sampled, when a limit fired (``limit`` is "cpu_time" or "memory") and,
    with ``limit`` "", once more right before :class:`Exited`. ``at`` is the sample's
    CLOCK_MONOTONIC in ns."""

    limit: str
    at: int
    user_us: int
    system_us: int
    memory_peak: int


# Supervisor -> child.


class Go(NamedTuple):
    """The id maps are written: the setup goes on."""


Message: TypeAlias = Unshared | Ready | Exec | SetupError | ExecError | Exited | Tree | Go

#: The ``t`` of each kind on the wire.
_KINDS: dict[str, type[Message]] = {
    "unshared": Unshared,
    "ready": Ready,
    "exec": Exec,
    "error": SetupError,
    "exec_error": ExecError,
    "exit": Exited,
    "tree": Tree,
    "go": Go,
}
_TAGS = {kind: tag for tag, kind in _KINDS.items()}
_FIELDS = {kind: typing.get_type_hints(kind) for kind in _KINDS.values()}
MAX_MESSAGE = 4096
_CRED = struct.Struct("3i")


class ProtocolError(Exception):
    """A message that is not one of the documented shapes."""


class Received(NamedTuple):
    """One message as it arrived: ``pid`` is the sender's host pid (0 if the kernel gave none),
    ``fds`` the descriptors attached to it (the receiver's to close)."""

    message: Message
    pid: int = 0
    fds: tuple[int, ...] = ()


def encode(message: Message) -> bytes:
    """Serialize a message; raises ProtocolError for an undocumented shape."""
    tag = _TAGS.get(type(message))
    if tag is None:
        raise ProtocolError(f"not a message: {type(message).__name__}")
    data = json.dumps({"t": tag, **message._asdict()}).encode()
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
    tag = obj.pop("t")
    kind = _KINDS.get(tag)
    if kind is None:
        raise ProtocolError(f"unknown message {tag!r}")
    expected = _FIELDS[kind]
    if set(obj) != set(expected):
        raise ProtocolError(f"{tag}: expected fields {sorted(expected)}, got {sorted(obj)}")
    for name, field_type in expected.items():
        if type(obj[name]) is not field_type:
            raise ProtocolError(f"{tag}.{name}: expected {field_type.__name__}")
    return kind(**obj)


def send(sock: socket.socket, message: Message, fds: tuple[int, ...] = ()) -> None:
    """Send one message, with ``fds`` attached as SCM_RIGHTS."""
    data = encode(message)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendmsg([data])


def receive(sock: socket.socket) -> Received | None:
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
    return Received(decode(data), pid, tuple(fds))


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end with SO_PASSCRED, child end). Both close-on-exec."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return parent, child
