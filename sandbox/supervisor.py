"""The parent side of a run: prepare, start the box, enforce limits while it runs, account.

Runs in a single-threaded process (the CLI, or a fork of the library's helper). One loop waits
on everything at once: messages from the box, its stdout/stderr pipes, the seccomp listener and a
pidfd of the setup process; its timeout is computed from the remaining wall and CPU budgets, so a
limit is noticed when it is due, not at the next tick of a fixed poll.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import boxinit, child, protocol, sched, streams
from .box import cgroups, rlimits, seccomp, treelimits, userns, uts
from .box.mounts import plan_root, plan_run_binds, run_binds
from .errors import ConfigError, HostError
from .hostinfo import host_facts
from .kernel import Kernel
from .limits import LIMITS, Limits
from .report import AppliedLimit, CgroupHierarchy, Report, SetupFailure, StopReason
from .spec import Fallback, NetworkMode, Spec
from .storelock import hold_store
from .streams import MAX_BACKLOG, BufferSink, Sink
from .verdict import Observed, decide

SETUP_TIMEOUT = 30.0
DRAIN_TIMEOUT = 2.0
MIN_WAIT = 0.0002  # the loop's shortest sleep: bounds how late a CPU limit can be noticed
PRECISE_WAIT = 0.001  # below this, wait with nanosleep rather than epoll's whole milliseconds
CHUNK = 1 << 16


@dataclass
class _Stream:
    fd: int  # the read end of the program's pipe
    sink: Sink
    limit: int | None
    count: int = 0
    truncated: bool = False
    paused: bool = False  # not read while its sink's consumer is behind (back-pressure)


@dataclass
class _Run:
    """Mutable state of one run (never part of the Spec)."""

    started: float
    exec_at: float | None = None  # CLOCK_MONOTONIC of the program's execve, from the box
    exited_at: float | None = None  # ... of its end, from the box's init
    killed_at: float | None = None
    cpu_baseline: float = 0.0
    status: int | None = None
    program_usage: tuple[float, float, int] | None = None  # utime, stime, max RSS (bytes)
    tree_usage: tuple[float, float, int] | None = None  # no cgroup: user, system, memory peak
    setup_error: SetupFailure | None = None
    exec_errno: int | None = None
    killed_for: StopReason | None = None
    forbidden: str | None = None
    listeners: list[int] = field(default_factory=list)
    streams: list[_Stream | None] = field(default_factory=list)  # stdout, stderr (None: direct)


def _check_host(spec: Spec, backend: cgroups.CgroupBackend | HostError) -> None:
    """Fail closed: refuse limits this host cannot enforce, unless the profile allows a fallback."""
    if (spec.profile.network is NetworkMode.LINKED) != (spec.link is not None):
        raise ConfigError(
            spec.profile.source,
            "box.network",
            "'linked' boxes run in a linked group (sandbox group run FILE), "
            "and a linked group's boxes need a profile with network = 'linked'",
        )
    if not isinstance(backend, HostError):
        return
    # The registry says what enforces each limit without a cgroup: nothing (refused), or a
    # per-process rlimit in the cgroup's place, which the profile must allow (fallback).
    asked = [name for name in LIMITS if getattr(spec.limits, name) is not None]
    impossible = [name for name in asked if not LIMITS[name].without_cgroup]
    if impossible:
        raise HostError(
            f"cannot enforce {' or '.join(impossible)} without cgroups: {backend.message}",
            hint=backend.hint,
        )
    fallback = [name for name in asked if LIMITS[name].needs_fallback]
    if fallback and spec.profile.fallback is not Fallback.RLIMIT:
        raise HostError(
            f"cannot enforce the {' and '.join(fallback)} limits: {backend.message}",
            hint=backend.hint,
        )


def run_box(
    spec: Spec,
    stdin_fd: int,
    stdout: Sink | int,
    stderr: Sink | int,
    cancel_fd: int | None = None,
    before_start: Callable[[int, int], None] | None = None,
) -> Report:
    """Run ``spec`` to completion and return its report. Raises only for sandbox failures.

    ``stdout``/``stderr`` given as a descriptor go to the program as they are (a pipe to
    another box): no output limit and no count then, and run_box closes them once the box has
    them, so its peer sees end of file as soon as the box is gone. ``cancel_fd`` stops the run
    when it becomes readable: a byte ``p`` means a peer of the box ended (``peer_exited``),
    end of file that the caller went away (``cancelled``). ``before_start`` is called with the
    box's host uid and gid once they are known, before the program starts (to hand it files).
    """
    # The copier of a socket stdin is forked first, so it has its data in the pipe long before
    # the program starts (and holds none of the box's descriptors).
    stdin_fd, copier = streams.private_stdin(stdin_fd)
    try:
        with PreparedBox(spec) as box:
            if before_start is not None:
                before_start(box.ids.uid, box.ids.gid)
            return box.run(spec, stdin_fd, stdout, stderr, cancel_fd, stdin_is_private=True)
    finally:
        os.close(stdin_fd)
        streams.stop_copier(copier)


class PreparedBox:
    """One box, built as far as it can be before its run is known (Core v2's warm box).

    With a cgroup (the native path), construction builds everything: namespaces, root,
    cgroup, and pid 1's runner waiting inside the cgroup; :meth:`run` then sends only what
    differs per run (argv, environment, working directory, stdio) and supervises it. Without a
    cgroup, init stays in Python and needs stdio at its start, so the box starts in
    :meth:`run`. A box runs once; leaving the ``with`` block (or :meth:`close`) tears down
    whatever is left.
    """

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.stack = contextlib.ExitStack()
        self.used = False
        try:
            self._prepare(spec)
        except BaseException:
            self.stack.close()
            raise

    def __enter__(self) -> PreparedBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill and remove whatever is left of the box."""
        self.stack.close()

    @staticmethod
    def shape(spec: Spec) -> Spec:
        """What a box built ahead is built from: ``spec`` without argv, environment, working
        directory, and the binds it can take at its run (:func:`mounts.run_binds`)."""
        late = run_binds(spec)
        return dataclasses.replace(
            spec, argv=(), env=(), cwd=None, binds=tuple(b for b in spec.binds if b not in late)
        )

    def matches(self, spec: Spec) -> bool:
        """Whether ``spec`` may run in this box: a box still alive, of the same shape, and
        every layer and bind source it mounted still the very inode it was."""
        alive = self.supervisor is not None and self.supervisor.ended is None
        return alive and self.shape(spec) == self.shape(self.spec) and self.root.still_current()

    def _prepare(self, spec: Spec) -> None:
        stack = self.stack
        self.backend = backend = cgroups.backend()
        _check_host(spec, backend)
        self.listener = seccomp.listener_supported()
        self.bpf = seccomp.compile_filter(spec.profile.seccomp, notify=self.listener)
        fallback = isinstance(backend, HostError)
        self.rlimits, self.applied = rlimits.table(spec.limits, fallback)
        # Forked first, while the process holds the fewest descriptors and none of the box's
        # processes exist; stopped last, after the box is killed (see seccomp.Receiver.stop).
        self.receiver = seccomp.Receiver() if self.listener else None
        if self.receiver is not None:
            stack.callback(self.receiver.stop)
        if spec.image is not None and spec.image.upper is not None:
            # A build step: root of its namespace, as the owner of the image's files.
            self.ids = userns.build_step_ids()
        elif spec.workspace is not None:  # every run in a workspace owns its files
            ws = spec.workspace
            self.ids = userns.workspace_ids(ws.uid, ws.gid, ws.init)
        else:
            self.ids = userns.allocate()
        stack.callback(self.ids.release)
        if spec.image is not None:  # prune waits until the run no longer needs its layers
            stack.callback(os.close, hold_store(spec.image.store))
        self.root = plan_root(spec)
        self.built_from = spec
        for tree in self.root.descriptors():
            stack.callback(os.close, tree)
        self.box = None if isinstance(backend, HostError) else backend.create(spec.limits)
        if self.box is not None:
            stack.callback(self.box.destroy)
        self.tree_limits = rlimits.tree_limits(spec.limits, self.box is None)
        if self.tree_limits is not None:
            self.applied |= treelimits.applied(self.tree_limits, spec.limits)
        self.applied |= self.root.applied()
        if spec.workspace is not None:  # the work dir is the workspace, bound over the tmpfs
            how = "workspace tmpfs size (kept across runs)"
            self.applied["work_size"] = AppliedLimit(spec.workspace.size, how)
        self.sock, self.child_sock = protocol.socketpair()
        stack.callback(self.sock.close)
        stack.callback(self.child_sock.close)
        self.run_state = _Run(started=time.monotonic())
        self.supervisor: _Supervisor | None = None
        if self.box is not None:
            self._start_native()

    def _plan(
        self, native_fd: int | None, stdio: tuple[int, ...], root_ready: tuple[int, ...]
    ) -> child.ChildPlan:
        spec = self.spec
        return child.ChildPlan(
            argv=spec.argv,
            env=spec.environment,
            hostname=uts.hostname(spec),
            network=spec.profile.network,
            address=(spec.link.address, spec.link.prefix) if spec.link else None,
            uid=spec.profile.uid,
            gid=spec.profile.gid,
            drop_groups=os.geteuid() == 0,
            creator_uid=self.ids.uid if os.geteuid() == 0 else None,
            counter_limits=userns.counter_rlimits(),
            root=self.root,
            rlimits=self.rlimits,
            stdio=stdio,
            sync=self.child_sock,
            bpf=self.bpf,
            listener=self.listener,
            supervisor_pid=os.getpid(),
            root_ready=root_ready,
            tree_limits=self.tree_limits,
            native_init=native_fd,
            init_ids=(userns.INIT_INSIDE,) * 2 if self.ids.init is not None else None,
        )

    def _start(self, plan: child.ChildPlan, handoff: _Handoff | None) -> _Supervisor:
        try:
            pid = child.start(Kernel(), plan)
        finally:
            self.child_sock.close()
        supervisor = _Supervisor(
            self.spec, self.run_state, pid, self.sock, self.ids, self.box, self.receiver, handoff
        )
        self.stack.callback(supervisor.close)
        return supervisor

    def _start_native(self) -> None:
        """Start the box and wait until its runner is ready (native pid 1, see boxinit.py)."""
        if self.box is None:
            raise HostError("a native box needs a cgroup")
        native_fd = boxinit.open_binary()
        self.stack.callback(os.close, native_fd)
        entry = self.box.open_entry()
        handoff = _Handoff(entry=entry, ours=entry)
        self.stack.callback(lambda: handoff.release(handoff.ours))
        self.supervisor = self._start(self._plan(native_fd, (), ()), handoff)
        self.supervisor.until_ready()

    def run(
        self,
        spec: Spec,
        stdin_fd: int,
        stdout: Sink | int,
        stderr: Sink | int,
        cancel_fd: int | None = None,
        requested_at: float | None = None,
        deliver: Callable[[Report], None] | None = None,
        stdin_is_private: bool = False,
    ) -> Report:
        """Run ``spec`` (see :func:`run_box`) in this box; once. ``requested_at``: when the
        run was asked for, if the box was built before (its report's setup time starts
        there, not when the box was built). ``deliver`` gets the report before the box is
        torn down. ``stdin_is_private``: the caller has made ``stdin_fd`` the program's own
        (:func:`streams.private_stdin`) and closes it."""
        if self.used:
            raise HostError("a box runs only once")
        self.used = True
        stack, limits = self.stack, self.spec.limits
        run = self.run_state
        if requested_at is not None:
            run.started = requested_at
        if not stdin_is_private:  # before the program's pipes exist: a copier is forked here
            stdin_fd, copier = streams.private_stdin(stdin_fd)
            stack.callback(os.close, stdin_fd)
            stack.callback(streams.stop_copier, copier)
        program_fds: list[int] = []
        ours: list[int] = []  # pipe ends we made for the program, closed once it has them
        for sink in (stdout, stderr):
            if isinstance(sink, int):
                program_fds.append(sink)
                run.streams.append(None)
                continue
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            stack.callback(os.close, read_end)
            program_fds.append(write_end)
            ours.append(write_end)
            run.streams.append(_Stream(read_end, sink, limits.output))
        stdio = (stdin_fd, program_fds[0], program_fds[1])
        handed_over = [fd for fd in (stdout, stderr) if isinstance(fd, int)]
        if self.supervisor is not None:  # native: the runner waits for exactly this
            late = tuple(b for b in spec.binds if b not in self.built_from.binds)
            mounts = plan_run_binds(spec, late)
            trees = tuple(m.source.tree_fd for m in mounts if m.source.tree_fd is not None)
            for fd in trees:
                stack.callback(os.close, fd)
            request = boxinit.RunRequest(
                argv=spec.argv,
                env=spec.environment,
                cwd=spec.cwd or spec.profile.workdir,
                uid=spec.profile.uid,
                gid=spec.profile.gid,
                rlimits=self.rlimits,
                bpf=self.bpf,
                listener=self.listener,
                binds=tuple(boxinit.RunBind(m.target, m.is_dir, m.writable) for m in mounts),
            )
            supervisor = self.supervisor
            # stdio stays open here until the runner has it (closed once sent, or by the stack).
            if supervisor.ended is None:
                supervisor.hand_over(request, stdio, (*ours, *handed_over), trees)
            else:  # the box ended in its setup: its report says why, nothing is sent
                for fd in (*ours, *handed_over):
                    os.close(fd)
        else:
            root_ready = os.pipe2(os.O_CLOEXEC)
            try:
                supervisor = self._start(self._plan(None, stdio, root_ready), None)
            finally:
                for fd in (*ours, *root_ready, *handed_over):
                    os.close(fd)
        supervisor.attach(run.streams, cancel_fd)
        usage = supervisor.run()  # the box's processes are killed by its end
        report = _account(spec, run, usage, self.box, self.applied, stdout, stderr)
        # The verdict is final and nothing of the box runs: only now may a slow consumer make
        # us wait. The report goes out before the teardown (cgroup, mounts, id slot).
        for sink in (stdout, stderr):
            if not isinstance(sink, int):
                sink.finish()
        if deliver is not None:
            deliver(report)
            sched.background()  # the caller has its report: the rest yields to programs
        stack.close()
        return report


@dataclass
class _Handoff:
    """What the supervisor sends the native box (boxinit.py): the cgroup's entry files with
    PREPARE, then, once the runner is ready and the run known, the run with its stdio.
    Descriptors in ``ours`` are closed exactly once: when sent, or when the box is torn down."""

    entry: tuple[int, ...]
    ours: tuple[int, ...]
    ready: bool = False

    def release(self, fds: tuple[int, ...]) -> None:
        # Numbers are forgotten once closed: a later descriptor may reuse one.
        for fd in fds:
            if fd in self.ours:
                self.ours = tuple(o for o in self.ours if o != fd)
                os.close(fd)


def _account(
    spec: Spec,
    run: _Run,
    usage: resource.struct_rusage,
    box: cgroups.BoxCgroup | None,
    applied: dict[str, AppliedLimit],
    stdout: Sink | int,
    stderr: Sink | int,
) -> Report:
    """Read the box's figures (before its cgroup is removed) and decide the verdict."""
    utime, stime, max_rss = run.program_usage or (usage.ru_utime, usage.ru_stime, None)
    cpu_user, cpu_system = utime, stime
    if run.tree_usage is not None:  # no cgroup: the box init's figure for the whole tree
        cpu_user, cpu_system = run.tree_usage[:2]
    if box is not None:
        cg = box.cpu_usage()
        total = max(cg.total - run.cpu_baseline, 0.0)
        share = cg.user / cg.total if cg.total else 1.0
        cpu_user, cpu_system = total * share, total * (1 - share)
    # A killed run ends when its limit fired; the kill itself takes the kernel a little longer.
    end = run.killed_at or run.exited_at or time.monotonic()
    wall = max(end - run.exec_at, 0.0) if run.exec_at is not None else 0.0
    oom = box.oom_killed() if box else False
    decision = decide(
        Observed(
            limits=spec.limits,
            status=run.status,
            setup_error=run.setup_error,
            exec_errno=run.exec_errno,
            killed_for=run.killed_for,
            started=run.exec_at is not None,
            cpu_time=cpu_user + cpu_system,
            wall_time=wall,
            oom_killed=oom,
            argv0=spec.argv[0],
        )
    )
    cg_name = CgroupHierarchy.NONE if box is None else box.backend
    named = zip(("stdout", "stderr"), run.streams, strict=False)
    counted = tuple(name for name, stream in named if stream is not None)
    out, err = (s or _Stream(-1, BufferSink(), None) for s in run.streams)
    return Report(
        verdict=decision.verdict,
        exit_code=decision.exit_code,
        signal=decision.signal,
        cpu_time=round(cpu_user + cpu_system, 6),
        cpu_user=round(cpu_user, 6),
        cpu_system=round(cpu_system, 6),
        wall_time=round(wall, 6),
        memory_peak=box.memory_peak() if box else _tree_memory_peak(spec, run),
        max_rss=max_rss,
        pids_peak=box.pids_peak() if box else None,
        oom_killed=oom,
        forbidden_syscall=run.forbidden,
        profile=spec.profile.name,
        profile_hash=spec.profile.content_hash,
        cgroup=cg_name,
        limits=_applied_limits(spec.limits, box, applied, counted),
        stdout_bytes=out.count,
        stderr_bytes=err.count,
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        limit_fired=decision.limit_fired,
        error=decision.error,
        setup_error=decision.setup_error,
        setup_time=round((run.exec_at or end) - run.started, 6),
        clamped=spec.clamped,
        host=host_facts(),
        image=spec.image.digest if spec.image is not None and spec.image.digest else None,
        ended_at=end,
        stdout=bytes(stdout.buffer) if isinstance(stdout, BufferSink) else None,
        stderr=bytes(stderr.buffer) if isinstance(stderr, BufferSink) else None,
    )


def _tree_memory_peak(spec: Spec, run: _Run) -> int | None:
    """The box init's highest sampled memory, where it sampled memory (a memory limit)."""
    if run.tree_usage is None or spec.limits.memory is None:
        return None
    return run.tree_usage[2]


def _applied_limits(
    limits: Limits,
    box: cgroups.BoxCgroup | None,
    applied: dict[str, AppliedLimit],
    counted: tuple[str, ...],
) -> dict[str, AppliedLimit]:
    """Every limit as the run had it: what the supervisor itself enforces (``counted``: the
    output streams it reads), then what each backend reports it set (rlimits, the box init,
    the root's mounts, the cgroup); a limit nobody enforced shows ``none``."""
    out = {name: AppliedLimit(getattr(limits, name), "none") for name in LIMITS}
    out["wall_time"] = AppliedLimit(limits.wall_time, "supervisor deadline")
    out["extra_time"] = AppliedLimit(
        limits.extra_time, "added to the kill deadlines; over the limit is still over"
    )
    if limits.output is not None and counted:
        # A group box's stream piped straight to another box is not read here, so not counted.
        how = "supervisor pipe count (" + ", ".join(counted) + ")"
        out["output"] = AppliedLimit(limits.output, how)
    out |= applied
    if box is not None:
        if limits.cpu_time is not None:
            how = f"supervisor deadline on {box.cpu_source}"
            out["cpu_time"] = AppliedLimit(limits.cpu_time, how)
        out |= box.applied
    return out


class _Supervisor:
    """The event loop of one box, from fork to the setup process's exit."""

    def __init__(
        self,
        spec: Spec,
        run: _Run,
        pid: int,
        sock: socket.socket,
        ids: userns.HostIds,
        box: cgroups.BoxCgroup | None,
        receiver: seccomp.Receiver | None,
        handoff: _Handoff | None = None,
    ) -> None:
        self.spec, self.run_state, self.pid, self.sock = spec, run, pid, sock
        self.ids, self.box, self.receiver, self.handoff = ids, box, receiver, handoff
        self.pidfd = os.pidfd_open(pid)
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, "sync")
        self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.streams: dict[int, _Stream] = {}
        self.flushing: dict[int, int] = {}  # a sink's descriptor -> the paused program pipe
        self.closed = False
        self.ended: resource.struct_rusage | None = None  # the box ended before its run
        limits = spec.limits
        self.cpus: float = len(limits.cpus) if limits.cpus else len(os.sched_getaffinity(0))
        if limits.cpu_quota is not None:
            self.cpus = min(self.cpus, max(limits.cpu_quota, 0.01))

    def until_ready(self) -> None:
        """Loop until the native runner waits for its run, or the box ended in its setup
        (then :attr:`ended` holds its usage, and the run's report says why)."""
        handoff = self.handoff
        if handoff is None:
            raise HostError("only a native box can be prepared ahead of its run")
        while not handoff.ready and self.ended is None:
            self.ended = self._step()

    def hand_over(
        self,
        request: boxinit.RunRequest,
        stdio: tuple[int, int, int],
        ours: tuple[int, ...],
        trees: tuple[int, ...] = (),
    ) -> None:
        """Send the ready runner its run (and the detached trees of its binds); ``ours`` are
        closed once the runner has them."""
        handoff = self.handoff
        if handoff is None or not handoff.ready:
            raise HostError("the box is not ready for a run")
        handoff.ours = (*handoff.ours, *ours)
        try:
            boxinit.send_run(self.sock, request, stdio, trees)
        finally:
            handoff.release(ours)

    def attach(self, streams: list[_Stream | None], cancel_fd: int | None) -> None:
        """The run's output pipes and its cancel descriptor join the loop."""
        self.streams = {s.fd: s for s in streams if s is not None}
        for fd in self.streams:
            self.sel.register(fd, selectors.EVENT_READ, "output")
        if cancel_fd is not None:
            self.sel.register(cancel_fd, selectors.EVENT_READ, "cancel")

    def run(self) -> resource.struct_rusage:
        usage = self.ended
        while usage is None:
            usage = self._step()
        self._drain()
        return usage

    def close(self) -> None:
        """Release the loop's descriptors (the box itself is killed by the caller's stack)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ProcessLookupError):  # a box given up before its run
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self.sel.close()
        for fd in self.run_state.listeners:
            os.close(fd)
        os.close(self.pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)

    def _timeout(self) -> float:
        """Seconds until the next limit could be due; fires limits that are due now."""
        run, limits, now = self.run_state, self.spec.limits, time.monotonic()
        if run.killed_for is not None:
            return 0.05
        if run.exec_at is None:
            timeout = run.started + SETUP_TIMEOUT - now
            if timeout <= 0:
                run.setup_error = SetupFailure(
                    "supervise_setup",
                    "wait for the box's setup",
                    errno.ETIMEDOUT,
                    f"took longer than {SETUP_TIMEOUT:.0f}s",
                )
                self._kill(StopReason.SETUP)
            return max(timeout, MIN_WAIT)
        timeout = run.exec_at + limits.wall_time + limits.extra_time - now
        if timeout <= 0:
            self._kill(StopReason.WALL_TIME)
            return 0.05
        if limits.cpu_time is not None and self.box is not None:
            remaining = limits.cpu_time + limits.extra_time - self._cpu_used()
            if remaining <= 0:
                self._kill(StopReason.CPU_TIME)
                return 0.05
            # The box cannot burn CPU faster than on all its CPUs at once: check again when
            # the budget could be spent at the earliest.
            timeout = min(timeout, remaining / self.cpus)
        return max(timeout, MIN_WAIT)

    def _cpu_used(self) -> float:
        if self.box is None:
            return 0.0
        return self.box.cpu_usage().total - self.run_state.cpu_baseline

    def _wait(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        """select() with sub-millisecond precision: epoll's timeout is whole milliseconds,
        rounded up, so the last stretch before a deadline is slept with nanosleep instead."""
        if timeout > 2 * PRECISE_WAIT:
            return self.sel.select(timeout - PRECISE_WAIT)
        events = self.sel.select(0)
        if not events:
            time.sleep(min(timeout, PRECISE_WAIT))
        return events

    def _step(self) -> resource.struct_rusage | None:
        exited = False
        for key, _ in self._wait(self._timeout()):
            if key.data == "sync":
                self._receive()
            elif key.data == "output":
                self._copy_output(key.fd, enforce=True)
            elif key.data == "flush":
                self._flush(key.fd)
            elif key.data == "notify" and self.receiver is not None:
                self._forbidden(self.receiver)
            elif key.data == "cancel":
                self._cancel(key.fd)
            elif key.data == "exit":
                exited = True  # the rest of this batch first: a notification in it still counts
        return os.wait4(self.pid, 0)[2] if exited else None

    def _cancel(self, fd: int) -> None:
        self.sel.unregister(fd)
        try:
            why = os.read(fd, 1)
        except OSError:
            why = b""
        if why == b"p":
            self._kill(StopReason.PEER_EXITED)
        else:
            self._kill(StopReason.CANCELLED)

    def _kill(self, reason: StopReason) -> None:
        run = self.run_state
        if run.killed_for is None:
            run.killed_for = reason
            run.killed_at = time.monotonic()
        if self.box is not None:
            with contextlib.suppress(OSError, HostError):
                self.box.kill()
        # The setup process dies; its death signal kills the box's init, whose exit makes the
        # kernel kill everything left in the pid namespace (pid_namespaces(7)).
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def _forbidden(self, receiver: seccomp.Receiver) -> None:
        """The receiver reported: any report is a forbidden call (see seccomp.Receiver)."""
        name = receiver.read()
        self.sel.unregister(receiver.sock)
        if name is not None:
            # Kill before the listener is closed: closing it would let the blocked syscall
            # return ENOSYS and the program carry on (seccomp_unotify(2)).
            self.run_state.forbidden = name
            self._kill(StopReason.FORBIDDEN_SYSCALL)

    def _receive(self) -> None:
        try:
            received = protocol.receive(self.sock)
        except (protocol.ProtocolError, ConnectionError):
            received = None
        if received is None:
            self.sel.unregister(self.sock)
            return
        run, fds = self.run_state, received.fds
        match received.message:
            case protocol.Unshared():
                userns.write_maps(
                    received.pid, self.spec.profile.uid, self.spec.profile.gid, self.ids
                )
                if self.spec.link is not None:
                    from .box.network import attach

                    attach(self.spec.link, received.pid)
                protocol.send(self.sock, protocol.Go())
                if self.handoff is not None:  # queued for the box's pid 1, once it is native
                    boxinit.send_prepare(self.sock, self.handoff.entry)
                    self.handoff.release(self.handoff.entry)
            case protocol.Ready() if self.handoff is not None:
                self.handoff.ready = True
            case protocol.Exec(at=at, cpu_ns=cpu_ns):
                run.exec_at = at / 1e9
                run.cpu_baseline = cpu_ns / 1e9
                for fd in fds:
                    run.listeners.append(fd)
                if fds and self.receiver is not None:
                    self.receiver.hand_over(fds[0])
                    self.sel.register(self.receiver.sock, selectors.EVENT_READ, "notify")
            case protocol.SetupError(phase=phase, op=op, errno=err, detail=detail):
                run.setup_error = SetupFailure(phase, op, err, detail)
            case protocol.ExecError(errno=err):
                run.exec_errno = err
            case protocol.Tree() as tree:
                run.tree_usage = (tree.user_us / 1e6, tree.system_us / 1e6, tree.memory_peak)
                if tree.limit in (StopReason.CPU_TIME, StopReason.MEMORY) and not run.killed_for:
                    # Init has killed the tree already; the box ends with it as it ends for ours.
                    run.killed_for, run.killed_at = StopReason(tree.limit), tree.at / 1e9
                    self._kill(run.killed_for)
            case protocol.Exited() as exited:
                run.status = exited.status
                run.exited_at = exited.at / 1e9
                run.program_usage = (
                    exited.utime_us / 1e6,
                    exited.stime_us / 1e6,
                    exited.maxrss_kb * 1024,
                )

    def _drain(self) -> None:
        """After the setup process is gone: the last messages and the rest of the output."""
        if self.box is not None:
            with contextlib.suppress(OSError, HostError):
                self.box.kill()  # nothing of the box may outlive it, even outside its pid ns
        for fd, stream in self.streams.items():
            # The writers are dead: what is left in the pipes is bounded, so read it all.
            self._resume(fd, stream)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        # The receiver's last word too, where it has one: a call whose caller vanished just
        # before the program's end may still be on its way.
        waited = ("output", "sync", "notify") if seccomp.RECV_ENDS else ("output", "sync")
        while any(k.data in waited for k in self.sel.get_map().values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in self.sel.select(remaining):
                if key.data == "sync":
                    self._receive()
                elif key.data == "output":
                    self._copy_output(key.fd, enforce=False)
                elif key.data == "notify" and self.receiver is not None:
                    self._forbidden(self.receiver)
                elif key.data in ("cancel", "flush"):
                    self.sel.unregister(key.fd)

    def _copy_output(self, fd: int, *, enforce: bool) -> None:
        stream = self.streams[fd]
        data = os.read(fd, CHUNK)
        if not data:
            self.sel.unregister(fd)
            return
        if stream.limit is not None and stream.count + len(data) > stream.limit:
            if not stream.truncated:
                stream.sink.write(data[: max(stream.limit - stream.count, 0)])
            stream.truncated = True
            stream.count += len(data)
            if enforce:
                self._kill(StopReason.OUTPUT)
            return
        stream.sink.write(data)
        stream.count += len(data)
        wait_fd = stream.sink.wait_fd()
        if enforce and stream.sink.backlog > MAX_BACKLOG and wait_fd is not None:
            # The consumer is behind: stop reading the program's pipe (its writes block in the
            # box) and wait for the consumer instead; this loop keeps enforcing the limits.
            self.sel.unregister(fd)
            stream.paused = True
            self.flushing[wait_fd] = fd
            self.sel.register(wait_fd, selectors.EVENT_WRITE, "flush")

    def _flush(self, wait_fd: int) -> None:
        fd = self.flushing[wait_fd]
        stream = self.streams[fd]
        stream.sink.flush()
        if stream.sink.backlog <= MAX_BACKLOG // 2:
            self._resume(fd, stream)

    def _resume(self, fd: int, stream: _Stream) -> None:
        if not stream.paused:
            return
        wait_fd = next(w for w, f in self.flushing.items() if f == fd)
        del self.flushing[wait_fd]
        with contextlib.suppress(KeyError):
            self.sel.unregister(wait_fd)
        self.sel.register(fd, selectors.EVENT_READ, "output")
        stream.paused = False
