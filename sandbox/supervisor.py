"""The parent side of a run: prepare, start the box, enforce limits while it runs, account.

Runs in a single-threaded process (the CLI, or a fork of the library's helper). One loop waits
on everything at once: messages from the box, its stdout/stderr pipes, the seccomp listener and a
pidfd of the setup process; its timeout is computed from the remaining wall and CPU budgets, so a
limit is noticed when it is due, not at the next tick of a fixed poll.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import resource
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from . import cgroups, child, protocol, seccomp, userns
from .errors import HostError
from .kernel import Kernel
from .report import AppliedLimit, Report, Verdict, exec_failure_exit_code
from .rootfs import RootPlan, plan_root
from .spec import Fallback, Limits, Spec

SETUP_TIMEOUT = 30.0
DRAIN_TIMEOUT = 2.0
CHUNK = 1 << 16
# seccomp_unotify(2): struct seccomp_notif is {u64 id; u32 pid; u32 flags; struct seccomp_data}
# and seccomp_data is {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}.
_NOTIF = struct.Struct("=QIIiIQ6Q")
SECCOMP_IOCTL_NOTIF_RECV = 0xC0000000 | (_NOTIF.size << 16) | (ord("!") << 8)


class Sink(Protocol):
    """Where one output stream of the program goes."""

    def write(self, data: bytes) -> None: ...


class FdSink:
    """Copy to a file descriptor (the CLI passes its own stdout/stderr)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BrokenPipeError:
                return  # the reader went away; the program's output is still counted


class BufferSink:
    """Capture in memory (the library returns the bytes in the report)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data


@dataclass
class _Stream:
    sink: Sink
    limit: int | None
    count: int = 0
    truncated: bool = False


@dataclass
class _Run:
    """Mutable state of one run (never part of the Spec)."""

    started: float
    exec_at: float | None = None
    cpu_baseline: float = 0.0
    status: int | None = None
    setup_error: str | None = None
    exec_errno: int | None = None
    limit_fired: str | None = None
    forbidden: str | None = None
    setup_done: bool = False
    ended_at: float | None = None
    listeners: list[int] = field(default_factory=list)
    streams: dict[int, _Stream] = field(default_factory=dict)


_backend_cache: cgroups.CgroupBackend | HostError | None = None


def cgroup_backend() -> cgroups.CgroupBackend | HostError:
    """The host's cgroup backend (detected once per process), or why there is none."""
    global _backend_cache
    if _backend_cache is None:
        try:
            _backend_cache = cgroups.detect()
        except HostError as e:
            _backend_cache = e
    return _backend_cache


def listener_supported() -> bool:
    """seccomp user notification exists since Linux 5.0; this project requires 5.12+ anyway."""
    release = os.uname().release.split(".")
    return (int(release[0]), int(release[1].split("-")[0])) >= (5, 0)


def _rlimits(limits: Limits, fallback: bool) -> tuple[tuple[tuple[int, int], ...], dict[str, str]]:
    """The rlimit table for the program and the mechanism of each limit it enforces."""
    table: list[tuple[int, int]] = [(resource.RLIMIT_CORE, 0)]
    mechanisms: dict[str, str] = {}
    by_rlimit: tuple[tuple[str, int], ...] = (
        ("fsize", resource.RLIMIT_FSIZE),
        ("open_files", resource.RLIMIT_NOFILE),
        ("stack", resource.RLIMIT_STACK),
    )
    if fallback:
        by_rlimit += (("memory", resource.RLIMIT_AS), ("pids", resource.RLIMIT_NPROC))
    for name, which in by_rlimit:
        value = getattr(limits, name)
        if value is not None:
            table.append((which, int(value)))
            mechanisms[name] = f"RLIMIT_{resource_name(which)}"
    if limits.cpu_time is not None:
        # Whole seconds only: a backstop for the cgroup figure, or the limit itself without one.
        table.append((resource.RLIMIT_CPU, math.ceil(limits.cpu_time) + (0 if fallback else 1)))
    return tuple(table), mechanisms


def resource_name(which: int) -> str:
    """``RLIMIT_AS`` -> ``AS``."""
    for name in dir(resource):
        if name.startswith("RLIMIT_") and getattr(resource, name) == which:
            return name.removeprefix("RLIMIT_")
    return str(which)


def run_box(
    spec: Spec, stdin_fd: int, stdout: Sink, stderr: Sink, cancel_fd: int | None = None
) -> Report:
    """Run ``spec`` to completion and return its report. Raises only for sandbox failures.

    ``cancel_fd`` becoming readable (its peer closed: the caller is gone) stops the run.
    """
    started = time.monotonic()
    limits = spec.limits
    backend = cgroup_backend()
    use_fallback = isinstance(backend, HostError)
    needs_cgroup = limits.memory is not None or limits.pids is not None
    if (
        isinstance(backend, HostError)
        and needs_cgroup
        and spec.profile.fallback is not Fallback.RLIMIT
    ):
        raise HostError(
            f"cannot enforce the memory and pids limits: {backend.message}", hint=backend.hint
        )
    listener = listener_supported()
    bpf = seccomp.compile_filter(spec.profile.seccomp, notify=listener)
    rlimits, mechanisms = _rlimits(limits, use_fallback)
    with contextlib.ExitStack() as stack:
        ids = userns.allocate()
        stack.callback(ids.release)
        root: RootPlan = plan_root(spec)
        box = None if isinstance(backend, HostError) else backend.create(limits)
        if box is not None:
            stack.callback(box.destroy)
        parent_sock, child_sock = protocol.socketpair()
        stack.callback(parent_sock.close)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        root_ready = os.pipe2(os.O_CLOEXEC)
        entry = box.open_entry() if box is not None else ()
        plan = child.ChildPlan(
            argv=spec.argv,
            env=spec.environment,
            hostname=spec.profile.hostname,
            network=spec.profile.network,
            uid=spec.profile.uid,
            gid=spec.profile.gid,
            drop_groups=os.geteuid() == 0,
            root=root,
            rlimits=rlimits,
            stdio=(stdin_fd, out_w, err_w),
            sync=child_sock,
            bpf=bpf,
            listener=listener,
            supervisor_pid=os.getpid(),
            root_ready=root_ready,
            cgroup_entry=entry,
        )
        try:
            pid = child.start(Kernel(), plan)
        finally:
            child_sock.close()
            for fd in (out_w, err_w, *root_ready, *entry):
                os.close(fd)
        run = _Run(started=started)
        run.streams = {out_r: _Stream(stdout, limits.output), err_r: _Stream(stderr, limits.output)}
        usage = _supervise(spec, run, pid, parent_sock, ids, box, cancel_fd)
        memory_peak = box.memory_peak() if box else None
        oom = box.oom_killed() if box else False
        cpu_total = usage.ru_utime + usage.ru_stime
        cpu_user, cpu_system = usage.ru_utime, usage.ru_stime
        if box is not None:
            cg = box.cpu_usage()
            cpu_total = max(cg.total - run.cpu_baseline, 0.0)
            share = cg.user / cg.total if cg.total else 1.0
            cpu_user, cpu_system = cpu_total * share, cpu_total * (1 - share)
        for fd in run.streams:
            os.close(fd)
        ended = time.monotonic()
    cg_name = "none" if box is None else box.backend
    applied = _applied_limits(limits, cg_name, mechanisms)
    return _report(
        spec,
        run,
        ended,
        cpu_total,
        cpu_user,
        cpu_system,
        memory_peak,
        oom,
        cg_name,
        applied,
        stdout,
        stderr,
    )


def _applied_limits(limits: Limits, cg: str, rl: dict[str, str]) -> dict[str, AppliedLimit]:
    cg_mech = {
        "cgroup1": (
            "cgroup1 memory.limit_in_bytes+memsw",
            "cgroup1 pids.max",
            "cgroup1 cpuacct.usage",
        ),
        "cgroup2": ("cgroup2 memory.max (swap 0)", "cgroup2 pids.max", "cgroup2 cpu.stat"),
        "none": (rl.get("memory", "none"), rl.get("pids", "none"), "RLIMIT_CPU"),
    }[cg]
    mech = {
        "wall_time": "supervisor deadline",
        "cpu_time": cg_mech[2] if cg == "none" else f"supervisor deadline on {cg_mech[2]}",
        "memory": cg_mech[0],
        "pids": cg_mech[1],
        "fsize": rl.get("fsize", "none"),
        "open_files": rl.get("open_files", "none"),
        "stack": rl.get("stack", "none"),
        "output": "supervisor pipe count",
        "tmp_size": "tmpfs size",
        "work_size": "tmpfs size",
    }
    out = {name: AppliedLimit(getattr(limits, name), how) for name, how in mech.items()}
    out["core"] = AppliedLimit(0, "RLIMIT_CORE")
    return out


def _kill(run: _Run, reason: str, pidfd: int, box: cgroups.BoxCgroup | None) -> None:
    if run.limit_fired is None:
        run.limit_fired = reason
        run.ended_at = time.monotonic()
    if box is not None:
        with contextlib.suppress(OSError, HostError):
            box.kill()
    # The setup process dies; its death signal kills the box's init, whose exit makes the
    # kernel kill everything left in the pid namespace (pid_namespaces(7)).
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _on_message(
    spec: Spec,
    run: _Run,
    msg: protocol.Message,
    sock: socket.socket,
    ids: userns.HostIds,
    box: cgroups.BoxCgroup | None,
    sel: selectors.BaseSelector,
) -> None:
    if msg.kind == protocol.UNSHARED:
        userns.write_maps(msg.pid, spec.profile.uid, spec.profile.gid, ids)
        protocol.send(sock, protocol.GO)
    elif msg.kind == protocol.EXEC:
        run.exec_at = time.monotonic()
        run.setup_done = True
        if box is not None:
            run.cpu_baseline = box.cpu_usage().total
        for fd in msg.fds:
            run.listeners.append(fd)
            sel.register(fd, selectors.EVENT_READ, "notify")
    elif msg.kind == protocol.SETUP_ERROR:
        f = msg.fields
        reason = str(f["detail"]) or os.strerror(int(f["errno"]))
        run.setup_error = f"box setup failed in phase {f['phase']}: {f['op']}: {reason}"
    elif msg.kind == protocol.EXEC_ERROR:
        run.exec_errno = int(msg.fields["errno"])
    elif msg.kind == protocol.EXITED:
        run.status = int(msg.fields["status"])


def _read_notification(fd: int) -> tuple[int, int] | None:
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError:
        return None  # the notifying task is already gone (ENOENT)
    _, _, _, nr, arch, *_ = _NOTIF.unpack(buf)
    return nr, arch


def _supervise(
    spec: Spec,
    run: _Run,
    pid: int,
    sock: socket.socket,
    ids: userns.HostIds,
    box: cgroups.BoxCgroup | None,
    cancel_fd: int | None,
) -> resource.struct_rusage:
    limits = spec.limits
    pidfd = os.pidfd_open(pid)
    sel = selectors.DefaultSelector()
    try:
        sel.register(sock, selectors.EVENT_READ, "sync")
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        for fd in run.streams:
            sel.register(fd, selectors.EVENT_READ, "output")
        if cancel_fd is not None:
            sel.register(cancel_fd, selectors.EVENT_READ, "cancel")
        cpus = len(os.sched_getaffinity(0))
        usage = None
        while usage is None:
            now = time.monotonic()
            if run.exec_at is None:
                timeout = run.started + SETUP_TIMEOUT - now
            else:
                timeout = run.exec_at + limits.wall_time - now
                if limits.cpu_time is not None and box is not None:
                    used = box.cpu_usage().total - run.cpu_baseline
                    if used >= limits.cpu_time:
                        _kill(run, "cpu_time", pidfd, box)
                    timeout = min(timeout, (limits.cpu_time - used) / cpus)
            if timeout <= 0 and run.limit_fired is None:
                if run.exec_at is None:
                    run.setup_error = f"box setup took longer than {SETUP_TIMEOUT:.0f}s"
                    _kill(run, "setup", pidfd, box)
                else:
                    _kill(run, "wall_time", pidfd, box)
            for key, _ in sel.select(max(timeout, 0.0005) if run.limit_fired is None else 0.05):
                if key.data == "sync":
                    msg = _receive(sock)
                    if msg is None:
                        sel.unregister(sock)
                    else:
                        _on_message(spec, run, msg, sock, ids, box, sel)
                elif key.data == "output":
                    _copy_output(run, key.fd, sel, pidfd, box)
                elif key.data == "notify":
                    # Kill before the listener is closed: closing it would let the blocked
                    # syscall return ENOSYS and the program carry on (seccomp_unotify(2)).
                    call = _read_notification(key.fd)
                    sel.unregister(key.fd)
                    if call is not None:
                        nr, arch = call
                        name = seccomp.describe_syscall(arch, nr)
                        run.forbidden = name
                        _kill(run, "forbidden_syscall", pidfd, box)
                elif key.data == "cancel":
                    sel.unregister(key.fd)
                    run.setup_error = "the run was cancelled: its caller went away"
                    _kill(run, "cancelled", pidfd, box)
                elif key.data == "exit":
                    if run.ended_at is None:
                        run.ended_at = time.monotonic()
                    usage = os.wait4(pid, 0)[2]
        _drain(run, sock, sel, spec, ids, box)
        return usage
    finally:
        sel.close()
        for fd in run.listeners:
            os.close(fd)
        os.close(pidfd)


def _receive(sock: socket.socket) -> protocol.Message | None:
    try:
        return protocol.receive(sock)
    except (protocol.ProtocolError, ConnectionError):
        return None


def _drain(
    run: _Run,
    sock: socket.socket,
    sel: selectors.BaseSelector,
    spec: Spec,
    ids: userns.HostIds,
    box: cgroups.BoxCgroup | None,
) -> None:
    """After the setup process is gone: the last messages and the rest of the output."""
    if box is not None:
        with contextlib.suppress(OSError, HostError):
            box.kill()  # nothing of the box may outlive it, even outside its pid namespace
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while any(k.data in ("output", "sync") for k in sel.get_map().values()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for key, _ in sel.select(remaining):
            if key.data == "sync":
                msg = _receive(sock)
                if msg is None:
                    sel.unregister(sock)
                else:
                    _on_message(spec, run, msg, sock, ids, None, sel)
            elif key.data == "output":
                _copy_output(run, key.fd, sel, -1, None)
            elif key.data == "notify":
                sel.unregister(key.fd)


def _copy_output(
    run: _Run, fd: int, sel: selectors.BaseSelector, pidfd: int, box: cgroups.BoxCgroup | None
) -> None:
    stream = run.streams[fd]
    data = os.read(fd, CHUNK)
    if not data:
        sel.unregister(fd)
        return
    if stream.limit is not None and stream.count + len(data) > stream.limit:
        keep = max(stream.limit - stream.count, 0)
        stream.sink.write(data[:keep])
        stream.count += len(data)
        stream.truncated = True
        if pidfd >= 0:
            _kill(run, "output", pidfd, box)
        return
    if not stream.truncated:
        stream.sink.write(data)
    stream.count += len(data)


_LIMIT_VERDICTS = {
    "wall_time": Verdict.WALL_TIME_LIMIT,
    "cpu_time": Verdict.CPU_TIME_LIMIT,
    "output": Verdict.OUTPUT_LIMIT,
    "forbidden_syscall": Verdict.FORBIDDEN_SYSCALL,
}


def _report(
    spec: Spec,
    run: _Run,
    ended: float,
    cpu: float,
    cpu_user: float,
    cpu_system: float,
    memory_peak: int | None,
    oom: bool,
    cg: str,
    applied: dict[str, AppliedLimit],
    stdout: Sink,
    stderr: Sink,
) -> Report:
    exit_code: int | None = None
    sig: int | None = None
    error = run.setup_error
    if run.status is not None:
        if os.WIFSIGNALED(run.status):
            sig = os.WTERMSIG(run.status)
        else:
            exit_code = os.WEXITSTATUS(run.status)
    limit = run.limit_fired
    if limit == "cancelled" or (run.setup_error is not None and not run.setup_done):
        verdict = Verdict.SANDBOX_ERROR
    elif run.exec_errno is not None:
        verdict, sig = Verdict.RUNTIME_ERROR, None
        exit_code = exec_failure_exit_code(run.exec_errno)
        error = f"cannot execute {spec.argv[0]!r}: {os.strerror(run.exec_errno)}"
    elif limit in _LIMIT_VERDICTS:
        verdict = _LIMIT_VERDICTS[limit]
        exit_code = None
        sig = signal.SIGSYS if verdict is Verdict.FORBIDDEN_SYSCALL else signal.SIGKILL
    elif run.status is None:
        verdict, error = Verdict.SANDBOX_ERROR, error or "the box ended without reporting a status"
    elif oom and (sig == signal.SIGKILL or exit_code not in (None, 0)):
        verdict, limit = Verdict.MEMORY_LIMIT, "memory"
    elif sig == signal.SIGSYS:
        verdict, limit = Verdict.FORBIDDEN_SYSCALL, "forbidden_syscall"
    elif sig == signal.SIGXCPU:
        verdict, limit = Verdict.CPU_TIME_LIMIT, "cpu_time"
    elif sig is not None:
        verdict = Verdict.SIGNALED
    else:
        verdict = Verdict.OK if exit_code == 0 else Verdict.RUNTIME_ERROR
    wall = (run.ended_at or ended) - run.exec_at if run.exec_at is not None else 0.0
    setup = (run.exec_at or ended) - run.started
    out, err = run.streams.values()
    return Report(
        verdict=verdict,
        exit_code=exit_code,
        signal=int(sig) if sig is not None else None,
        cpu_time=round(cpu, 6),
        cpu_user=round(cpu_user, 6),
        cpu_system=round(cpu_system, 6),
        wall_time=round(wall, 6),
        memory_peak=memory_peak,
        oom_killed=oom,
        forbidden_syscall=run.forbidden,
        profile=spec.profile.name,
        profile_hash=spec.profile.content_hash,
        cgroup=cg,
        limits=applied,
        stdout_bytes=out.count,
        stderr_bytes=err.count,
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        limit_fired=limit,
        error=error,
        setup_time=round(setup, 6),
        stdout=bytes(stdout.buffer) if isinstance(stdout, BufferSink) else None,
        stderr=bytes(stderr.buffer) if isinstance(stderr, BufferSink) else None,
    )
