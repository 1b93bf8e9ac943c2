"""seccomp, all three parts: the supervisor compiles a profile's
:class:`~sandbox.spec.SeccompPolicy` into a BPF program, the program's process installs it last
(:func:`child_install`), and the supervisor's :class:`Receiver` waits on its user-notification
listener (below).

The filter is an allowlist built with libseccomp (through pyseccomp) and exported as raw BPF,
which the child installs with one ``seccomp(2)`` call right before ``execve``. Compilation runs
in the supervisor, never in the child, and at most once per policy: the program is kept per
process (``functools.lru_cache``) and on disk, under ``$SANDBOX_HOME/seccomp`` (see
:func:`compile_filter`), so a run whose filter was compiled before never loads pyseccomp (whose
import alone runs ``ldconfig``).

Denied syscalls are reported, not just killed: the "kill" action is ``SECCOMP_RET_USER_NOTIF``,
so the supervisor learns the syscall's number and architecture from the kernel and then kills the
box; the syscall itself never runs (seccomp_unotify(2)). On kernels without listeners the action
is ``SECCOMP_RET_KILL_PROCESS`` and the report only knows a SIGSYS.

Argument guards (seccomp(2) can only inspect register arguments, never memory). They hold in
every profile, whatever its rules say about these syscalls; only a key named ``unsafe_...``
drops one. They are a small fixed BPF prefix in front of libseccomp's program rather than
libseccomp rules: how libseccomp merges several rules for one syscall (an allow with argument
conditions from a profile next to a guard's refusal) is its own business, while the prefix runs
first and returns before that program is even reached.

* ``clone``: namespace flags refused, so a program cannot build its own user namespace and regain
  capabilities in it (the root of many kernel exploits, e.g. CVE-2022-0185).
* ``clone3``: answers ENOSYS because its flags live in memory the filter cannot read; glibc then
  falls back to ``clone``, whose flags can be checked.
* ``ioctl``: TIOCSTI and TIOCLINUX refused on the low 32 bits (the kernel ignores the high bits,
  so comparing all 64 would let ``0x1_00005412`` through: CVE-2019-10063); commands with high bits
  set are refused too.
* ``socket``: families outside the profile's list answer EAFNOSUPPORT (netlink, packet, ...).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import signal
import socket
import struct
import termios
from typing import Any

from .. import boxinit, kernel, state
from ..errors import SandboxError
from ..kernel import KernelOps
from ..spec import ArgCondition, SeccompAction, SeccompPolicy
from .plan import ChildPlan

#: Syscalls the sandbox itself makes between installing the filter and the program's execve.
SANDBOX_NEEDS = ("sendmsg", "execve", "exit_group")
NAMESPACE_FLAGS = (
    kernel.CLONE_NEWNS
    | kernel.CLONE_NEWUTS
    | kernel.CLONE_NEWIPC
    | kernel.CLONE_NEWUSER
    | kernel.CLONE_NEWPID
    | kernel.CLONE_NEWNET
    | kernel.CLONE_NEWCGROUP
    | kernel.CLONE_NEWTIME
)
TIOCLINUX = 0x541C
X32_SYSCALL_BIT = 0x4000_0000
# Classic BPF (linux/filter.h, linux/bpf_common.h): struct sock_filter {u16 code; u8 jt, jf;
# u32 k}. A conditional jump goes jt (true) or jf (false) instructions past the next one.
_INSN = struct.Struct("=HBBI")
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = 32 bits of seccomp_data at offset k
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K: true if A & k
_RET = 0x06  # BPF_RET | BPF_K
# seccomp_data: {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}, little-endian here.
_NR, _ARCH = 0, 4
BPF_MAXINSNS = 4096  # the kernel's limit on one filter's length (linux/bpf_common.h)
# A stored filter: magic, the key it was stored under, the program's length and SHA-256, then
# the program. The key is also the file's name: a file copied or renamed to another key's name
# is refused, and so is one cut short or damaged.
_CACHE_MAGIC = b"sandbox-bpf-1\n"
_CACHE_HEADER = struct.Struct(f"={len(_CACHE_MAGIC)}s32sI32s")
CACHE_DIR = "seccomp"
CACHE_ENTRIES = 64  # the most filters kept; past that the oldest written go


def _sc() -> Any:
    """pyseccomp, imported on first use: only compiling a filter, checking syscall names and
    naming a reported syscall need it."""
    import pyseccomp as sc

    return sc


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` (the high half is 4 bytes further)."""
    return 16 + 8 * index


def unknown_syscalls(names: tuple[str, ...]) -> list[str]:
    """Names libseccomp does not know on this architecture."""
    sc = _sc()
    return [n for n in names if sc.resolve_syscall(sc.Arch.NATIVE, n) < 0]


def syscall_name(arch: int, number: int) -> str:
    """The name of syscall ``number`` on audit architecture ``arch`` (``"#N"`` when unknown)."""
    sc = _sc()
    try:
        name: bytes = sc.resolve_syscall(arch, number)
        return name.decode()
    except (ValueError, OSError):
        return f"#{number}"


def describe_syscall(arch: int, number: int) -> str:
    """``keyctl``; ``getpid (x86)`` or ``getpid (x32)`` for a foreign ABI's call."""
    if arch == native_arch() and number & X32_SYSCALL_BIT:
        return f"{syscall_name(arch, number & ~X32_SYSCALL_BIT)} (x32)"
    name = syscall_name(arch, number)
    return name if arch == native_arch() else f"{name} ({arch_name(arch)})"


def arch_name(arch: int) -> str:
    """A short name for an audit architecture value (``x86_64``, ``x86``, ...)."""
    sc = _sc()
    names = {
        sc.Arch.X86_64: "x86_64",
        sc.Arch.X86: "x86",
        sc.Arch.X32: "x32",
        sc.Arch.AARCH64: "aarch64",
        sc.Arch.ARM: "arm",
    }
    return names.get(arch, hex(arch))


def native_arch() -> int:
    """The audit architecture of this process."""
    return int(_sc().system_arch())


def _arg(c: ArgCondition) -> Any:
    sc = _sc()
    if c.equal:
        return sc.Arg(c.index, sc.MASKED_EQ, c.mask, c.value)
    if c.mask != 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError("a 'ne' argument condition cannot take a mask")
    return sc.Arg(c.index, sc.NE, c.value)


def _action(action: SeccompAction, err: int, kill: int) -> int:
    sc = _sc()
    if action is SeccompAction.ALLOW:
        return int(sc.ALLOW)
    if action is SeccompAction.ERRNO:
        return int(sc.ERRNO(err))
    return kill


def _guards(policy: SeccompPolicy, refuse: int) -> bytes:
    """The prefix: the argument guards for native x86_64 calls, ``refuse`` where they kill.

    Every other call, and every call of another architecture or ABI (x32 numbers have bit 30
    set, so none equals a native number), falls through to libseccomp's program, which starts
    with its own checks of the architecture. Written with labels; each jump's offset is computed
    as (target index) - (index of the jump + 1), since BPF counts from the next instruction.
    """
    sc = _sc()
    nr = {n: sc.resolve_syscall(sc.Arch.X86_64, n) for n in ("ioctl", "clone", "clone3", "socket")}
    # (code, true target, false target, k): a target is a label, None for the next instruction.
    prog: list[tuple[int, str | None, str | None, int] | str] = [
        (_LD_ABS, None, None, _ARCH),
        (_JEQ, None, "main", int(sc.Arch.X86_64)),
        (_LD_ABS, None, None, _NR),
        (_JEQ, "ioctl", None, nr["ioctl"]),
        (_JEQ, "clone", None, nr["clone"]),
        (_JEQ, "enosys", None, nr["clone3"]),
        (_JEQ, "socket", "main", nr["socket"]),
        # The kernel reads an ioctl command as 32 bits: compare those (CVE-2019-10063), and
        # refuse any command with high bits, which could only hide a command from a filter.
        "ioctl",
        (_LD_ABS, None, None, _arg_low(1)),
        (_JEQ, "eperm", None, termios.TIOCSTI),
        (_JEQ, "eperm", None, TIOCLINUX),
        (_LD_ABS, None, None, _arg_low(1) + 4),
        (_JEQ, "main", "refuse", 0),
        # All CLONE_NEW* flags are in the low 32 bits.
        "clone",
        (_LD_ABS, None, None, _arg_low(0)),
        (_JSET, "main" if policy.unsafe_namespace_clone else "refuse", "main", NAMESPACE_FLAGS),
        "socket",
        (_LD_ABS, None, None, _arg_low(0)),
        *((_JEQ, "main", None, family) for family in policy.socket_families),
        (_RET, None, None, int(sc.ERRNO(errno.EAFNOSUPPORT))),
        "eperm",
        (_RET, None, None, int(sc.ERRNO(errno.EPERM))),
        "enosys",  # clone3's flags live in memory: glibc falls back to clone on ENOSYS
        (_RET, None, None, int(sc.ERRNO(errno.ENOSYS))),
        "refuse",
        (_RET, None, None, refuse),
        "main",
    ]
    labels: dict[str, int] = {}
    insns: list[tuple[int, str | None, str | None, int]] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)

    def offset(i: int, target: str | None) -> int:
        return 0 if target is None else labels[target] - (i + 1)

    return b"".join(
        _INSN.pack(code, offset(i, jt), offset(i, jf), k)
        for i, (code, jt, jf, k) in enumerate(insns)
    )


@functools.lru_cache(maxsize=32)
def compile_filter(policy: SeccompPolicy, *, notify: bool) -> bytes:
    """Return the raw BPF (an array of ``struct sock_filter``) for ``policy``: the guards'
    prefix (see the module docstring), then libseccomp's program.

    ``notify`` makes the kill action a user notification (see the module docstring). Foreign
    architectures (x86 ``int 0x80``, x32) get the same kill action: the filter only admits the
    native ABI, whose numbers it was written for.

    A program compiled before is read back from the filter cache, under a key made of
    everything it depends on (:func:`_cache_key`); a stored file is used only if it is the
    caller's, closed to others and whole (see :func:`_load`), and anything wrong with the cache
    only means the filter is compiled again.
    """
    key = _cache_key(policy, notify)
    if key is not None:
        stored = _load(key)
        if stored is not None:
            return stored
    program = _compile(policy, notify)
    # Only a policy whose every name libseccomp knows is stored, so a stored filter also
    # vouches for its names (see filter_known); libseccomp accepts some unknown names (the
    # multiplexed pseudo-syscalls of other architectures) that the profile checks refuse.
    if key is not None and not any(unknown_syscalls(rule.syscalls) for rule in policy.rules):
        _store(key, program)
    return program


def filter_known(policy: SeccompPolicy) -> bool:
    """Whether a filter for ``policy`` is in the filter cache: then this libseccomp knows every
    syscall it names, and a profile check need not load pyseccomp to ask."""
    for notify in (True, False):
        key = _cache_key(policy, notify)
        if key is None:
            return False
        if _load(key) is not None:
            return True
    return False


def _compile(policy: SeccompPolicy, notify: bool) -> bytes:
    sc = _sc()
    kill = int(sc.NOTIFY) if notify else int(sc.KILL_PROCESS)
    default = kill if policy.default is SeccompAction.KILL else int(sc.ERRNO(policy.default_errno))
    f = sc.SyscallFilter(default)
    f.set_attr(sc.Attr.ACT_BADARCH, kill)
    f.set_attr(sc.Attr.CTL_NNP, 0)  # the child sets no_new_privs itself, as its own phase
    f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)  # binary tree: O(log n) per syscall, not O(n)
    # Later rules win over earlier ones for the same syscall; the allow list comes first.
    chosen: dict[str, tuple[SeccompAction, int, tuple[ArgCondition, ...]]] = {}
    for rule in policy.rules:
        for name in rule.syscalls:
            chosen[name] = (rule.action, rule.errno, rule.conditions)
    for name in SANDBOX_NEEDS:
        chosen[name] = (SeccompAction.ALLOW, 0, ())
    for name, (action, err, conditions) in chosen.items():
        if conditions:
            f.add_rule(_action(action, err, kill), name, *(_arg(c) for c in conditions))
        elif _action(action, err, kill) != default:
            f.add_rule(_action(action, err, kill), name)
    read_fd = os.memfd_create("sandbox-bpf", os.MFD_CLOEXEC)
    with os.fdopen(read_fd, "w+b") as out:
        f.export_bpf(out)
        out.seek(0)
        return _guards(policy, default) + out.read()


@functools.cache
def _toolchain() -> str | None:
    """What besides the policy and the notify flag determines a program: this package and
    this module's code, the machine, and libseccomp (its version, the API level it found in the
    kernel, and pyseccomp's module). None when libseccomp cannot be identified: then no filter
    is stored or read back.

    pyseccomp loads libseccomp by the soname ``ldconfig`` lists, libseccomp.so.2 (the soname
    of every libseccomp 2.x), so this process asks the same library for its version.
    """
    import ctypes
    from importlib.machinery import PathFinder

    from .. import __version__

    try:
        lib = ctypes.CDLL("libseccomp.so.2")
        lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)
        version = ".".join(str(n) for n in lib.seccomp_version().contents)
        api = int(lib.seccomp_api_get())
        with open(__file__, "rb") as source:
            code = hashlib.sha256(source.read()).hexdigest()
    except (OSError, AttributeError):
        return None
    spec = PathFinder.find_spec("pyseccomp")
    if spec is None or spec.origin is None:
        return None
    try:
        st = os.stat(spec.origin)
    except OSError:
        return None
    return "|".join(
        (
            _CACHE_MAGIC.decode().strip(),
            __version__,
            code,
            os.uname().machine,
            str(struct.calcsize("P")),
            f"libseccomp {version} api {api}",
            f"{spec.origin} {st.st_size} {st.st_mtime_ns}",
        )
    )


def _cache_key(policy: SeccompPolicy, notify: bool) -> str | None:
    """The filter cache's key (hex SHA-256) of ``policy``'s program, or None (no cache).

    The policy's repr holds every field the compiler reads: the default, every rule with its
    expanded syscalls, action, errno and argument conditions, the socket families and the
    guards' ``unsafe_`` keys.
    """
    toolchain = _toolchain()
    if toolchain is None:
        return None
    material = "\0".join((toolchain, f"notify={notify}", repr(policy)))
    return hashlib.sha256(material.encode()).hexdigest()


def _load(key: str) -> bytes | None:
    """The stored program of ``key``, or None when there is none or it cannot be trusted: not
    the caller's, open to others, a symlink, another key's, or cut short or damaged."""
    try:
        directory = state.open_private_dir(CACHE_DIR, create=False)  # a check makes no files
    except (OSError, SandboxError):
        return None
    try:
        data = state.read_private(
            directory, f"{key}.bpf", _CACHE_HEADER.size + BPF_MAXINSNS * _INSN.size
        )
    finally:
        os.close(directory)
    if data is None or len(data) < _CACHE_HEADER.size:
        return None
    magic, stored_key, length, digest = _CACHE_HEADER.unpack_from(data)
    program = data[_CACHE_HEADER.size :]
    if (
        magic != _CACHE_MAGIC
        or stored_key != bytes.fromhex(key)
        or length != len(program)
        or not _whole_program(program)
        or hashlib.sha256(program).digest() != digest
    ):
        return None
    return program


def _whole_program(program: bytes) -> bool:
    """Whole instructions, as many as the kernel takes in one filter."""
    return len(program) % _INSN.size == 0 and 0 < len(program) // _INSN.size <= BPF_MAXINSNS


def _store(key: str, program: bytes) -> None:
    """Keep ``program`` under ``key`` (replacing whatever is there); failures are ignored."""
    if not _whole_program(program):
        return  # the kernel refuses it anyway, and _load would never use it
    header = _CACHE_HEADER.pack(
        _CACHE_MAGIC, bytes.fromhex(key), len(program), hashlib.sha256(program).digest()
    )
    try:
        directory = state.open_private_dir(CACHE_DIR, create=True)
    except (OSError, SandboxError):
        return
    try:
        state.replace_private(directory, f"{key}.bpf", header + program)
        _prune(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def _prune(directory: int) -> None:
    """Keep the newest CACHE_ENTRIES files: profiles made on the fly must not fill the disk."""
    names = os.listdir(directory)
    if len(names) <= CACHE_ENTRIES:
        return
    written = []
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            written.append((st.st_mtime_ns, name))
    for _, name in sorted(written)[: len(written) - CACHE_ENTRIES]:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=directory)


# --- the listener (supervisor side) -------------------------------------------------------
# The seccomp listener's receiver: a small process that keeps one NOTIF_RECV always blocked
# (``boxinit receive``, sandbox/native/boxinit.c, which says why one must).
#
# A process, not a thread: the supervisor forks the box, and may run many boxes in one process
# (the image builder), and forking a process with threads is forbidden here. It is forked before
# any of the box's processes exist, as the native receiver straight away, so it costs the host
# a few hundred KiB rather than a copy of the interpreter; it keeps only its socket, and dies
# with the supervisor (PR_SET_PDEATHSIG).

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
        # posix_spawn (a vfork in glibc): no copy of this interpreter's page tables, which a
        # fork would make only for the execve to throw away. The receiver's only inheritable
        # descriptors are stdio and its socket; it closes all but the socket first thing.
        try:
            os.set_inheritable(theirs.fileno(), True)
            argv = ("boxinit", "receive", str(theirs.fileno()), str(os.getpid()))
            # As root, at the lowest real-time priority: it then takes a notification the
            # moment it is queued, before most callers could die and take theirs with them
            # (docs/seccomp.md, the known gap). It only ever runs to read one notification.
            if os.geteuid() == 0:
                realtime = (os.SCHED_FIFO, os.sched_param(1))
                self.pid = os.posix_spawn(boxinit.PATH, argv, {}, scheduler=realtime)
            else:
                self.pid = os.posix_spawn(boxinit.PATH, argv, {})
        finally:
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


def listener_supported() -> bool:
    """seccomp user notification exists since Linux 5.0; this project requires 5.12+ anyway."""
    release = os.uname().release.split(".")
    return (int(release[0]), int(release[1].split("-")[0])) >= (5, 0)


# --- child side: the filter, installed last -------------------------------------------------


def child_install(k: KernelOps, plan: ChildPlan) -> int:
    """Install the compiled filter; returns the listener's descriptor (-1 without one). Only
    ``sendmsg`` and ``execve`` run after it (:data:`SANDBOX_NEEDS`)."""
    return k.install_seccomp(plan.bpf, listener=plan.listener)
