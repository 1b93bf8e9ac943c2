"""Compile a profile's :class:`~sandbox.spec.SeccompPolicy` into a BPF program (parent side).

The filter is an allowlist built with libseccomp (through pyseccomp) and exported as raw BPF,
which the child installs with one ``seccomp(2)`` call right before ``execve``. Compilation runs
in the supervisor, once per policy per process (``functools.lru_cache``), never in the child.

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

import errno
import functools
import os
import struct
import termios

import pyseccomp as sc

from . import kernel
from .spec import ArgCondition, SeccompAction, SeccompPolicy

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


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` (the high half is 4 bytes further)."""
    return 16 + 8 * index


def unknown_syscalls(names: tuple[str, ...]) -> list[str]:
    """Names libseccomp does not know on this architecture."""
    return [n for n in names if sc.resolve_syscall(sc.Arch.NATIVE, n) < 0]


def syscall_name(arch: int, number: int) -> str:
    """The name of syscall ``number`` on audit architecture ``arch`` (``"#N"`` when unknown)."""
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
    return int(sc.system_arch())


def _arg(c: ArgCondition) -> sc.Arg:
    if c.equal:
        return sc.Arg(c.index, sc.MASKED_EQ, c.mask, c.value)
    if c.mask != 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError("a 'ne' argument condition cannot take a mask")
    return sc.Arg(c.index, sc.NE, c.value)


def _action(action: SeccompAction, err: int, kill: int) -> int:
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
    """
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
