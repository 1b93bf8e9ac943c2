"""The only module that makes raw system calls (ctypes, python-prctl).

Everything else talks to :class:`Kernel`, so the child's phases can be run against a recording
fake in unit tests, and the order of privileged operations is checked without root.
Python 3.11 has no ``os.unshare``/``os.mount``; glibc wrappers are used where glibc has them and
``syscall(2)`` numbers (x86_64) where it does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import resource
import select
import signal
import socket
import struct
from typing import NoReturn, Protocol

import prctl

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 syscall numbers for calls glibc 2.36 does not wrap.
SYS_PIVOT_ROOT = 155
SYS_SECCOMP = 317
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_CLOSE_RANGE = 436
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442

# sched.h: namespace flags (os.CLONE_* only exists from Python 3.12).
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
# openat2(2): resolve flags.
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C


def _interface_up(name: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh22x", name, 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh22x", name, flags | _IFF_UP))


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2) (Linux 5.6+): open ``path`` under ``dirfd`` with ``RESOLVE_*`` rules.

    Host-side code opens every path a box could have influenced through this (see
    :mod:`sandbox.hostpath`); it is a plain function because it runs in the supervisor, not in
    the child's recorded phases.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(
        _libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)),
        path,
    )


def clone_tree(fd: int) -> int:
    """A detached copy of the mount tree at ``fd`` (``open_tree(OPEN_TREE_CLONE)``, 5.2+).

    It needs CAP_SYS_ADMIN where ``fd``'s mount lives, so only root's supervisor makes them; a
    box's init attaches them with :meth:`Kernel.attach_tree` inside its own mount namespace,
    which a bind from a path opened before ``unshare`` cannot do (the kernel refuses a bind
    whose source mount belongs to another namespace).
    """
    flags = OPEN_TREE_CLONE | AT_RECURSIVE | AT_EMPTY_PATH | os.O_CLOEXEC
    return _check(_libc.syscall(SYS_OPEN_TREE, fd, b"", flags), "open_tree")


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


class KernelOps(Protocol):
    """What the child's phases may ask of the kernel (real: :class:`Kernel`; tests: a fake)."""

    def setgroups(self, groups: list[int]) -> None: ...
    def setresgid(self, gid: int) -> None: ...
    def setresuid(self, uid: int) -> None: ...
    def seteuid(self, uid: int) -> None: ...
    def set_real_ids(self, uid: int, gid: int) -> None: ...
    def unshare(self, flags: int) -> None: ...
    def set_fsids(self, uid: int, gid: int) -> None: ...
    def set_pdeathsig(self, sig: int) -> None: ...
    def set_dumpable(self, dumpable: bool) -> None: ...
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: int,
        data: str | None = None,
    ) -> None: ...
    def mount_setattr(self, path: str, attr_set: int, *, recursive: bool) -> None: ...
    def attach_tree(self, tree_fd: int, target: str) -> None: ...
    def pivot_root(self, new_root: str, put_old: str) -> None: ...
    def umount2(self, target: str, flags: int) -> None: ...
    def sethostname(self, name: str) -> None: ...
    def set_loopback_up(self) -> None: ...
    def set_interface_address(self, ifname: str, address: str, prefix: int) -> None: ...
    def setsid(self) -> None: ...
    def setrlimit(self, which: int, value: int) -> None: ...
    def dup2(self, fd: int, target: int) -> None: ...
    def close_fds_except(self, keep: tuple[int, ...]) -> None: ...
    def set_no_new_privs(self) -> None: ...
    def drop_capabilities(self) -> None: ...
    def install_seccomp(self, bpf: bytes, *, listener: bool) -> int: ...
    def keep_capabilities_across_exec(self, caps: tuple[int, ...]) -> None: ...
    def exec_fd(self, fd: int, argv: tuple[str, ...]) -> None: ...
    def chdir(self, path: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def make_dirs(self, path: str) -> None: ...
    def make_file(self, path: str) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def execve(self, path: str, argv: tuple[str, ...], env: dict[str, str]) -> None: ...
    # Processes and the descriptors between them.
    def fork(self) -> int: ...
    def wait4(self, pid: int, options: int) -> tuple[int, int, resource.struct_rusage]: ...
    def kill(self, pid: int, sig: int) -> None: ...
    def exit(self, code: int) -> NoReturn: ...
    def write(self, fd: int, data: bytes) -> None: ...
    def read(self, fd: int, size: int) -> bytes: ...
    def close(self, fd: int) -> None: ...
    def set_inheritable(self, fd: int) -> None: ...
    def hung_up(self, fd: int) -> bool: ...
    def parent_pid(self) -> int: ...
    def default_signal(self, sig: int) -> None: ...
    def unblock_signals(self) -> None: ...


class Kernel:
    """Real system calls. Methods raise OSError with the kernel's errno."""

    def setgroups(self, groups: list[int]) -> None:
        os.setgroups(groups)

    def setresgid(self, gid: int) -> None:
        os.setresgid(gid, gid, gid)

    def setresuid(self, uid: int) -> None:
        os.setresuid(uid, uid, uid)

    def seteuid(self, uid: int) -> None:
        os.setresuid(-1, uid, -1)

    def set_real_ids(self, uid: int, gid: int) -> None:
        """Real, effective, saved and filesystem ids ``uid``/``gid``, keeping the permitted
        capabilities (a build step's box leaves uid 0, which would clear them; prctl(2),
        PR_SET_KEEPCAPS); :meth:`keep_capabilities_across_exec` restores the effective set."""
        prctl.set_keepcaps(True)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    def unshare(self, flags: int) -> None:
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")

    def set_fsids(self, uid: int, gid: int) -> None:
        # setfsuid(2) reports no errors; asking again with -1 returns the value in force.
        _libc.setfsgid(gid)
        _libc.setfsuid(uid)
        if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != gid:
            raise OSError(1, "setfsuid/setfsgid did not take effect")

    def set_pdeathsig(self, sig: int) -> None:
        prctl.set_pdeathsig(sig)

    def set_dumpable(self, dumpable: bool) -> None:
        prctl.set_dumpable(dumpable)

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: int,
        data: str | None = None,
    ) -> None:
        _check(
            _libc.mount(
                source.encode() if source is not None else None,
                target.encode(),
                fstype.encode() if fstype is not None else None,
                ctypes.c_ulong(flags),
                data.encode() if data is not None else None,
            ),
            f"mount {target}",
        )

    def mount_setattr(self, path: str, attr_set: int, *, recursive: bool) -> None:
        attr = _MountAttr(attr_set, 0, 0, 0)
        flags = AT_RECURSIVE if recursive else 0
        _check(
            _libc.syscall(
                SYS_MOUNT_SETATTR,
                -100,
                path.encode(),
                flags,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"mount_setattr {path}",
        )

    def attach_tree(self, tree_fd: int, target: str) -> None:
        """Mount a detached tree (from :func:`clone_tree`) at ``target`` (move_mount(2))."""
        _check(
            _libc.syscall(
                SYS_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
            ),
            f"move_mount {target}",
        )

    def pivot_root(self, new_root: str, put_old: str) -> None:
        _check(_libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")

    def umount2(self, target: str, flags: int) -> None:
        _check(_libc.umount2(target.encode(), flags), f"umount {target}")

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        _check(_libc.sethostname(raw, len(raw)), "sethostname")

    def set_loopback_up(self) -> None:
        _interface_up(b"lo")

    def set_interface_address(self, ifname: str, address: str, prefix: int) -> None:
        # Plain ioctls (netdevice(7)): this runs in the box's init, which must stay small.
        name = ifname.encode()
        mask = (0xFFFF_FFFF << (32 - prefix)) & 0xFFFF_FFFF
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for request, value in (
                (_SIOCSIFADDR, socket.inet_aton(address)),
                (_SIOCSIFNETMASK, mask.to_bytes(4, "big")),
            ):
                sockaddr = struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", value)
                fcntl.ioctl(s, request, struct.pack("16s16s8x", name, sockaddr))
        _interface_up(name)

    def setsid(self) -> None:
        os.setsid()

    def setrlimit(self, which: int, value: int) -> None:
        resource.setrlimit(which, (value, value))

    def dup2(self, fd: int, target: int) -> None:
        if fd == target:  # dup2 onto itself changes nothing, close-on-exec included
            os.set_inheritable(fd, True)
        else:
            os.dup2(fd, target, inheritable=True)

    def close_fds_except(self, keep: tuple[int, ...]) -> None:
        # close_range(2) closes whole ranges in one call; gaps are the fds we keep.
        start = 0
        for fd in sorted(keep):
            if fd > start:
                _check(_libc.syscall(SYS_CLOSE_RANGE, start, fd - 1, 0), "close_range")
            start = fd + 1
        _check(_libc.syscall(SYS_CLOSE_RANGE, start, 0xFFFF_FFFF, 0), "close_range")

    def set_no_new_privs(self) -> None:
        prctl.set_no_new_privs(True)

    def drop_capabilities(self) -> None:
        # Ambient first (it needs the permitted set), then the bounding set (needs CAP_SETPCAP),
        # then securebits so no uid change can ever restore anything, and capset last because
        # it removes CAP_SETPCAP itself (capabilities(7), "Thread capability sets").
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
        for cap in range(prctl.CAP_LAST_CAP + 1):
            prctl.capbset.drop(cap)
        prctl.set_securebits(
            prctl.SECURE_NOROOT
            | prctl.SECURE_NOROOT_LOCKED
            | prctl.SECURE_NO_SETUID_FIXUP
            | prctl.SECURE_NO_SETUID_FIXUP_LOCKED
            | prctl.SECURE_KEEP_CAPS_LOCKED
        )
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _check(_libc.capset(ctypes.byref(header), data), "capset")

    def keep_capabilities_across_exec(self, caps: tuple[int, ...]) -> None:
        # A process that is not uid 0 in its namespace loses every capability at execve
        # unless they are ambient; raising one needs it in the inheritable set first
        # (capabilities(7), "Transformation of capabilities during execve()").
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _check(_libc.capget(ctypes.byref(header), data), "capget")
        for word in data:
            word.effective = word.permitted
        for cap in caps:
            data[cap // 32].inheritable |= 1 << (cap % 32)
        _check(_libc.capset(ctypes.byref(header), data), "capset")
        for cap in caps:
            _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "raise ambient")

    def exec_fd(self, fd: int, argv: tuple[str, ...]) -> None:
        # fexecve: the file the supervisor opened, found by no path inside the box.
        os.execve(fd, argv, {})  # noqa: S606 - argv as given, never through a shell

    def install_seccomp(self, bpf: bytes, *, listener: bool) -> int:
        buf = ctypes.create_string_buffer(bpf, len(bpf))
        prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
        flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
        return _check(
            _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)),
            "seccomp",
        )

    def chdir(self, path: str) -> None:
        os.chdir(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def make_dirs(self, path: str) -> None:
        os.makedirs(path, 0o755, exist_ok=True)

    def make_file(self, path: str) -> None:
        """An empty file (a mount point for a bound file); refuses to follow a symlink."""
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    def execve(self, path: str, argv: tuple[str, ...], env: dict[str, str]) -> None:
        os.execve(path, argv, env)  # noqa: S606 - argv as given, never through a shell

    def fork(self) -> int:
        return os.fork()

    def wait4(self, pid: int, options: int) -> tuple[int, int, resource.struct_rusage]:
        return os.wait4(pid, options)

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def exit(self, code: int) -> NoReturn:
        # Never unwind into the caller's stack (atexit handlers, buffered files) after fork.
        os._exit(code)

    def write(self, fd: int, data: bytes) -> None:
        os.write(fd, data)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def set_inheritable(self, fd: int) -> None:
        os.set_inheritable(fd, True)

    def hung_up(self, fd: int) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def parent_pid(self) -> int:
        return os.getppid()

    def default_signal(self, sig: int) -> None:
        signal.signal(sig, signal.SIG_DFL)

    def unblock_signals(self) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
