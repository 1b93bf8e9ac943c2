"""Compile a profile's :class:`~sandbox.spec.SeccompPolicy` into a BPF program (parent side).

The filter is an allowlist built with libseccomp (through pyseccomp) and exported as raw BPF,
which the child installs with one ``seccomp(2)`` call right before ``execve``. Compilation runs
in the supervisor, once per policy per process (``functools.lru_cache``), never in the child.

Denied syscalls are reported, not just killed: the "kill" action is ``SECCOMP_RET_USER_NOTIF``,
so the supervisor learns the syscall's number and architecture from the kernel and then kills the
box; the syscall itself never runs (seccomp_unotify(2)). On kernels without listeners the action
is ``SECCOMP_RET_KILL_PROCESS`` and the report only knows a SIGSYS.

Argument guards (seccomp(2) can only inspect register arguments, never memory):

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
_LOW32 = 0xFFFF_FFFF
_HIGH32 = 0xFFFF_FFFF_0000_0000
_AF_MAX = 46


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


def _add_guarded(f: sc.SyscallFilter, name: str, policy: SeccompPolicy) -> bool:
    """Add the argument-checked form of an allowed ``name``; False if it has no guard."""
    if name == "clone" and not policy.allow_namespace_clone:
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, NAMESPACE_FLAGS, 0))
    elif name == "clone3":
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    elif name == "ioctl":
        for cmd in (termios.TIOCSTI, TIOCLINUX):
            f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW32, cmd))
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, _HIGH32, 0))
    elif name == "socket":
        for family in range(_AF_MAX):
            action = sc.ALLOW if family in policy.socket_families else sc.ERRNO(errno.EAFNOSUPPORT)
            f.add_rule(action, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, family))
    else:
        return False
    return True


@functools.lru_cache(maxsize=32)
def compile_filter(policy: SeccompPolicy, *, notify: bool) -> bytes:
    """Return the raw BPF (an array of ``struct sock_filter``) for ``policy``.

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
        elif action is SeccompAction.ALLOW and _add_guarded(f, name, policy):
            continue
        elif _action(action, err, kill) != default:
            f.add_rule(_action(action, err, kill), name)
    read_fd = os.memfd_create("sandbox-bpf", os.MFD_CLOEXEC)
    with os.fdopen(read_fd, "w+b") as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
