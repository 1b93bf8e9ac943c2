"""The parent side of the native box init (sandbox/native/boxinit.c): where it is, and the
messages the supervisor sends it.

Two of a box's processes become this static program once Python has built the root: the
setup process (``boxinit hold``) and the box's pid 1 (``boxinit init FD``), which forks the
runner that drops the last privileges and execs the program. The program so starts from a
process of a few hundred KiB: its rusage (max RSS above all) is its own.

Supervisor -> box messages (the box's replies are protocol.py's JSON):

* ``PREPARE``: the datagram ``SBX1PRE\\0`` with the box cgroup's entry files attached; pid 1
  forks the runner, which joins the cgroup and answers ``ready``;
* ``RUN``: the datagram ``SBX1RUN\\0`` with, attached, a sealed memory file holding the request
  (:func:`encode_run`, layout in parse.h), the program's stdin, stdout, stderr, and one detached
  mount tree per bind of the request.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, HostError

PATH = Path(__file__).resolve().parent / "native" / "boxinit"
PREPARE = b"SBX1PRE\0"
RUN = b"SBX1RUN\0"
MAGIC = b"SBXRUN1\0"
TAG_ARG, TAG_ENV, TAG_CWD, TAG_IDS, TAG_RLIMIT, TAG_BPF, TAG_FLAGS, TAG_BIND = range(1, 9)
RUN_LISTENER = 1
BIND_DIR, BIND_WRITABLE = 1, 2
#: parse.h's bounds, checked here so a request over them fails before anything starts.
MAX_ARGS = MAX_ENV = 4096
MAX_BINDS = 32
MAX_REQUEST = 8 << 20
_RECORD = struct.Struct("<HI")


def open_binary() -> int:
    """An O_RDONLY descriptor of the binary (executed with fexecve from inside the box).

    Opened by its path like the package's own Python files, which it sits beside: whoever can
    replace one can replace the other, so it is trusted as they are (no box writes there)."""
    try:
        return os.open(PATH, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HostError(
            f"the native box init is missing ({PATH}: {e.strerror})",
            hint="reinstall the package: pip builds it with the system C compiler (gcc)",
        ) from None


@dataclass(frozen=True)
class RunBind:
    """A bind the runner attaches for one run: a detached tree and where it goes."""

    target: str
    is_dir: bool
    writable: bool


@dataclass(frozen=True)
class RunRequest:
    """What one run needs that the box does not have yet."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    rlimits: tuple[tuple[int, int], ...]
    bpf: bytes
    listener: bool
    binds: tuple[RunBind, ...] = ()


def _string(tag: int, value: str, what: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw or not raw:
        raise ConfigError("request", what, "must be a non-empty string without NUL bytes")
    return _RECORD.pack(tag, len(raw) + 1) + raw + b"\0"


def encode_run(request: RunRequest) -> bytes:
    """The request as parse.h lays it out."""
    if len(request.argv) > MAX_ARGS or len(request.env) > MAX_ENV:
        raise ConfigError("request", "argv", "at most 4096 arguments and environment variables")
    if len(request.binds) > MAX_BINDS:
        raise ConfigError("request", "binds", f"at most {MAX_BINDS} binds")
    parts = [MAGIC]
    parts += [_string(TAG_ARG, arg, "argv") for arg in request.argv]
    parts += [_string(TAG_ENV, f"{k}={v}", "env") for k, v in request.env.items()]
    parts.append(_string(TAG_CWD, request.cwd, "cwd"))
    parts.append(_RECORD.pack(TAG_IDS, 8) + struct.pack("<II", request.uid, request.gid))
    for which, value in request.rlimits:
        parts.append(_RECORD.pack(TAG_RLIMIT, 12) + struct.pack("<IQ", which, value))
    parts.append(_RECORD.pack(TAG_BPF, len(request.bpf)) + request.bpf)
    flags = RUN_LISTENER if request.listener else 0
    parts.append(_RECORD.pack(TAG_FLAGS, 4) + struct.pack("<I", flags))
    for bind in request.binds:
        bits = (BIND_DIR if bind.is_dir else 0) | (BIND_WRITABLE if bind.writable else 0)
        target = bind.target.encode() + b"\0"
        parts.append(_RECORD.pack(TAG_BIND, 4 + len(target)) + struct.pack("<I", bits) + target)
    data = b"".join(parts)
    if len(data) > MAX_REQUEST:
        raise ConfigError("request", "argv", "argv, environment and filter exceed 8 MiB")
    return data


def _send(sock: socket.socket, header: bytes, fds: tuple[int, ...]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([header], ancillary)


def send_prepare(sock: socket.socket, cgroup_entry: tuple[int, ...]) -> None:
    """Ask pid 1 for a runner in the box cgroup (entered through these files)."""
    _send(sock, PREPARE, cgroup_entry)


def send_run(
    sock: socket.socket,
    request: RunRequest,
    stdio: tuple[int, int, int],
    trees: tuple[int, ...] = (),
) -> None:
    """Hand the waiting runner its run: the request in a sealed memory file, stdio, binds."""
    memfd = os.memfd_create("sandbox-run", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(memfd, encode_run(request))
        # Sealed: nothing can change the request between this write and the runner's read.
        fcntl.fcntl(
            memfd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
        )
        _send(sock, RUN, (memfd, *stdio, *trees))
    finally:
        os.close(memfd)
