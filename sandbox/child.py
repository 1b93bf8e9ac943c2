"""The child side of a run: three processes, each a straight list of phases, then ``execve``.

::

    supervisor
      └─ setup (A): drops host ids, unshares namespaces, waits for its id maps, forks, then
         becomes ``boxinit hold`` (it only waits):
          └─ init (B): pid 1 of the new pid namespace; builds the root, then becomes the native
             ``boxinit init`` (sandbox/native/boxinit.c), which forks, reaps and reports:
              └─ runner (C): joins the box cgroup, receives its run, drops every privilege,
                 seccomp, execve (native; its steps are listed in boxinit.c)

The two ``execve`` into the static boxinit binary replace the interpreter: an idle box costs the
host a few hundred KiB, and the program starts from a small process, so its rusage is its own.
Without a cgroup (a rootless host without delegation), init stays in Python to sample the whole
tree (treelimits.py), and C is a fork of it running :data:`PROGRAM_PHASES`.

The order is data (:data:`SETUP_PHASES`, :data:`INIT_PHASES`, :data:`PROGRAM_PHASES`) so unit
tests can check it with a recording kernel. Rules this code keeps (docs/architecture.md,
"Processes and threads" and "Why this shape"):

* it never logs, never takes a lock and never returns into the caller's stack: every process
  ends in ``os._exit``; a failure is sent to the supervisor as a structured message;
* the box cgroup holds only the program's process tree, so setup costs no CPU or memory there;
* seccomp is installed last, right before ``execve``, after ``no_new_privs`` and the capability
  drop (seccomp(2): without no_new_privs an unprivileged filter install fails, and anything
  between the filter and execve would have to be allowed by it).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import kernel, protocol
from .box import treelimits
from .box.mounts import RootPlan, build_root
from .kernel import KernelOps
from .spec import NetworkMode

NAMESPACES = (
    kernel.CLONE_NEWUSER  # first: the others are then owned by (and only admin-able from) it
    | kernel.CLONE_NEWNS
    | kernel.CLONE_NEWPID
    | kernel.CLONE_NEWNET
    | kernel.CLONE_NEWIPC
    | kernel.CLONE_NEWUTS
)
EXIT_SETUP_FAILED = 125


@dataclass(frozen=True)
class ChildPlan:
    """Everything the child processes need, prepared by the supervisor before ``fork``."""

    argv: tuple[str, ...]
    env: dict[str, str]
    hostname: str
    network: NetworkMode
    address: tuple[str, int] | None  # linked groups: eth0's address and prefix length
    uid: int
    gid: int
    drop_groups: bool  # root: shed supplementary groups before the user namespace exists
    creator_uid: int | None  # root: the box's host uid, effective when the user ns is made
    counter_limits: tuple[tuple[int, int], ...]  # rlimits on per-user counters, set before it
    root: RootPlan
    rlimits: tuple[tuple[int, int], ...]
    stdio: tuple[int, ...]  # the Python init's program: stdin, stdout, stderr; () if native
    sync: socket.socket
    bpf: bytes
    listener: bool
    supervisor_pid: int
    root_ready: tuple[int, ...]  # Python init: pipe, one byte when the root is built; () if native
    cgroup_entry: tuple[int, ...]  # files that move their writer into the box cgroup
    tree_limits: treelimits.TreeLimits | None = None  # no cgroup: init enforces CPU and memory
    native_init: int | None = None  # boxinit's descriptor; None: the Python init (no cgroup)
    init_ids: tuple[int, int] | None = None  # as root: pid 1's own ids inside (userns.py)


class PhaseError(Exception):
    """A phase failed; carries what the supervisor needs to explain it."""

    def __init__(self, phase: str, op: str, err: int, detail: str = "") -> None:
        super().__init__(phase, op, err, detail)
        self.phase, self.op, self.err, self.detail = phase, op, err, detail


def _wait_for_go(plan: ChildPlan, phase: str) -> None:
    reply = plan.sync.recv(protocol.MAX_MESSAGE)
    if not reply or protocol.decode(reply).kind != protocol.GO:
        raise PhaseError(phase, "wait for the supervisor", 0, "supervisor went away")


# --- setup process (A) -------------------------------------------------------------------


def die_with_supervisor(k: KernelOps, plan: ChildPlan) -> None:
    """SIGKILL when the supervisor dies; if it died before this took effect, stop now."""
    k.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != plan.supervisor_pid:
        raise PhaseError("die_with_supervisor", "supervisor is gone", 0)


def isolate_fds(k: KernelOps, plan: ChildPlan) -> None:
    """Keep only what the box needs: the caller's other fds must never reach it."""
    k.close_fds_except(
        (
            *plan.stdio,
            plan.sync.fileno(),
            *plan.root_ready,
            *plan.cgroup_entry,
            *plan.root.descriptors(),
            *((plan.native_init,) if plan.native_init is not None else ()),
        )
    )


def drop_groups(k: KernelOps, plan: ChildPlan) -> None:
    """As root: shed supplementary groups now (it takes CAP_SETGID in the initial namespace).

    Otherwise the box would keep root's groups, and ``setgroups=deny`` would make that final.
    """
    if plan.drop_groups:
        k.setgroups([])


def become_box_owner(k: KernelOps, plan: ChildPlan) -> None:
    """As root: make the box's host uid the effective uid, so it creates the user namespace.

    The kernel charges per-user counters (pending signals, POSIX message-queue bytes, inotify
    instances and watches, processes) up the namespace chain to the uid that created each user
    namespace (user_namespaces(7); kernel/ucount.c): created as root, one box could exhaust
    root's. The real and saved uids stay 0, so the program (uid = the box's host uid) can
    neither signal nor prlimit this process or the box's init (kill(2), prlimit(2)). Nothing
    after this opens a host path by name: the root is made of the supervisor's detached mount
    trees. The credential change clears the parent-death signal (prctl(2)): set it again.
    """
    if plan.creator_uid is None:
        return
    k.seteuid(plan.creator_uid)
    die_with_supervisor(k, plan)


def bound_counters(k: KernelOps, plan: ChildPlan) -> None:
    """Per-box bounds on per-user counters, before the user namespace snapshots them.

    A new user namespace records its creator's RLIMIT_SIGPENDING and RLIMIT_MSGQUEUE as the
    most its tasks may charge to the creator (kernel/ucount.c, ``inc_rlimit_ucounts``); the
    program inherits the same values as its own limits.
    """
    for which, value in plan.counter_limits:
        k.setrlimit(which, value)


def unshare_namespaces(k: KernelOps, plan: ChildPlan) -> None:
    """New user namespace first (the kernel creates it before the others in one call)."""
    k.unshare(NAMESPACES)


def await_id_maps(k: KernelOps, plan: ChildPlan) -> None:
    """The supervisor writes ``setgroups=deny``, ``uid_map`` and ``gid_map`` from outside."""
    protocol.send(plan.sync, protocol.UNSHARED)
    _wait_for_go(plan, "await_id_maps")


SETUP_PHASES: tuple[Callable[[KernelOps, ChildPlan], None], ...] = (
    die_with_supervisor,
    isolate_fds,
    drop_groups,
    bound_counters,
    become_box_owner,
    unshare_namespaces,
    await_id_maps,
)


# --- init process (B), pid 1 of the box --------------------------------------------------


def die_with_parent(k: KernelOps, plan: ChildPlan) -> None:
    """SIGKILL when the setup process dies (it dies with the supervisor, the same way).

    If the supervisor died before this took effect, every other holder of the sync socket is
    gone too and it reads as hung up: stop instead of running unsupervised.
    """
    k.set_pdeathsig(signal.SIGKILL)
    poller = select.poll()
    poller.register(plan.sync.fileno(), select.POLLIN)
    if any(events & select.POLLHUP for _, events in poller.poll(0)):
        raise PhaseError("die_with_parent", "supervisor is gone", 0)


def mount_root(k: KernelOps, plan: ChildPlan) -> None:
    build_root(k, plan.root)


def announce_root(k: KernelOps, plan: ChildPlan) -> None:
    """Tell the program's process (forked early, waiting) that the root is ready."""
    os.write(plan.root_ready[1], b"1")
    os.close(plan.root_ready[1])


def rearm_death_signal(k: KernelOps, plan: ChildPlan) -> None:
    """Building the root changed the filesystem uid, which clears the parent-death signal
    (prctl(2), PR_SET_PDEATHSIG): set it again, and check again that setup is still there."""
    die_with_parent(k, plan)


def set_hostname(k: KernelOps, plan: ChildPlan) -> None:
    k.sethostname(plan.hostname)


def set_up_network(k: KernelOps, plan: ChildPlan) -> None:
    """The new network namespace has only a down ``lo``; bring it up only when asked.

    In a linked group the supervisor has put one end of a veth pair here as ``eth0``; the box
    gives it its address and no route: its segment is all it can reach."""
    if plan.network in (NetworkMode.LOOPBACK, NetworkMode.LINKED):
        k.set_loopback_up()
    if plan.address is not None:
        k.set_interface_address("eth0", *plan.address)


def protect_init(k: KernelOps, plan: ChildPlan) -> None:
    """Make pid 1 unreadable and untraceable by the program (same uid): not dumpable."""
    k.set_dumpable(False)


#: What init keeps across execve into boxinit: mounts (per-run binds), ids and the bounding set
#: for the runner's privilege drop, rlimits above the current ones, signals to every process of
#: the box at its end (capabilities(7); the runner drops them all before the program runs).
NATIVE_INIT_CAPABILITIES = (
    5,  # CAP_KILL
    6,  # CAP_SETGID
    7,  # CAP_SETUID
    8,  # CAP_SETPCAP
    21,  # CAP_SYS_ADMIN
    24,  # CAP_SYS_RESOURCE
)


def become_native_init(k: KernelOps, plan: ChildPlan) -> None:
    """Replace this interpreter with ``boxinit init``, keeping the sync socket and the
    capabilities above (pid 1 stays pid 1 across execve; the parent-death signal stays too,
    since no credential changes, prctl(2))."""
    if plan.native_init is None:
        raise PhaseError("become_native_init", "no native init", 0)
    sync = plan.sync.fileno()
    k.close_fds_except((sync, plan.native_init))
    os.set_inheritable(sync, True)
    # execve clears the ambient set of what it counts as a set-id exec: a real id other
    # than the effective one, or a filesystem id other than it (building the root set the
    # fsids; capabilities(7), security/commoncap.c), and it makes the saved ids the effective
    # ones. So every id becomes the one pid 1 keeps: as root, ids of its own that the program
    # never has, so the program cannot prlimit(2), signal or renice it; rootless only one id
    # can be mapped and pid 1 shares the program's (it ignores the signals the program could
    # send, pid_namespaces(7), and its own figures are not the program's).
    k.set_real_ids(*(plan.init_ids or (plan.uid, plan.gid)))
    k.keep_capabilities_across_exec(NATIVE_INIT_CAPABILITIES)
    die_with_parent(k, plan)  # the uid change may have cleared the parent-death signal
    k.exec_fd(plan.native_init, ("boxinit", "init", str(sync)))


#: Before init forks the program's process. It is forked this early so the (slow) move into
#: the box cgroup, which costs the kernel an RCU grace period, overlaps building the root.
INIT_EARLY_PHASES: tuple[Callable[[KernelOps, ChildPlan], None], ...] = (die_with_parent,)
INIT_PHASES: tuple[Callable[[KernelOps, ChildPlan], None], ...] = (
    mount_root,
    rearm_death_signal,
    set_hostname,
    set_up_network,
    protect_init,
    announce_root,
)


# --- program process (C) -----------------------------------------------------------------


_joined_at_cpu_ns = 0


def join_cgroup(k: KernelOps, plan: ChildPlan) -> None:
    """Move into the box cgroup through the files the supervisor opened ("0" is the writer)."""
    global _joined_at_cpu_ns
    for fd in plan.cgroup_entry:
        k.join_cgroup(fd)
    _joined_at_cpu_ns = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)


def _cpu_since_join(plan: ChildPlan) -> int:
    if not plan.cgroup_entry:
        return 0
    return time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID) - _joined_at_cpu_ns


def await_root(k: KernelOps, plan: ChildPlan) -> None:
    """Wait for init to build the root, then enter the work dir.

    pivot_root(2) moved this process's root (it was the old root) but not its working
    directory, which was the caller's: it must be replaced before anything else runs here.
    """
    read_end, write_end = plan.root_ready
    os.close(write_end)
    if os.read(read_end, 1) != b"1":
        raise PhaseError("await_root", "wait for the root", 0, "init failed to build it")
    os.close(read_end)
    k.chdir(plan.root.cwd or plan.root.workdir)


def unshare_cgroup(k: KernelOps, plan: ChildPlan) -> None:
    """After joining: the box's cgroup becomes the root of its cgroup namespace."""
    k.unshare(kernel.CLONE_NEWCGROUP)


def switch_ids(k: KernelOps, plan: ChildPlan) -> None:
    """Become the box's uid/gid, mapped to its unprivileged host ids (never root anywhere).

    Setup ran as the caller's host uid so it could reach the caller's bind sources; from here
    on the program's process cannot signal, trace or read the box's init.
    """
    k.setresgid(plan.gid)
    k.setresuid(plan.uid)


def new_session(k: KernelOps, plan: ChildPlan) -> None:
    """No controlling terminal, so TIOCSTI cannot reach the caller's (CVE-2017-5226)."""
    k.setsid()


def set_rlimits(k: KernelOps, plan: ChildPlan) -> None:
    for which, value in plan.rlimits:
        k.setrlimit(which, value)


def set_stdio(k: KernelOps, plan: ChildPlan) -> None:
    for target, fd in enumerate(plan.stdio):
        k.dup2(fd, target)


def close_fds(k: KernelOps, plan: ChildPlan) -> None:
    """Late, so nothing opened during setup leaks in (runc CVE-2024-21626 leaked a cgroup fd)."""
    k.close_fds_except((0, 1, 2, plan.sync.fileno()))


def no_new_privs(k: KernelOps, plan: ChildPlan) -> None:
    k.set_no_new_privs()


def drop_capabilities(k: KernelOps, plan: ChildPlan) -> None:
    k.drop_capabilities()


PROGRAM_PHASES: tuple[Callable[[KernelOps, ChildPlan], None], ...] = (
    join_cgroup,
    await_root,
    unshare_cgroup,
    switch_ids,
    new_session,
    set_rlimits,
    set_stdio,
    close_fds,
    no_new_privs,
    drop_capabilities,
)
#: pid 1 with the native init: the root, then boxinit does the rest (boxinit.c).
NATIVE_INIT_PHASES: tuple[Callable[[KernelOps, ChildPlan], None], ...] = (
    die_with_parent,
    mount_root,
    rearm_death_signal,
    set_hostname,
    set_up_network,
    become_native_init,
)

#: The two steps after every phase above: the filter, then execve (see :func:`exec_program`).
FINAL_STEPS = ("install_seccomp", "execve")


def _run_phases(
    k: KernelOps, plan: ChildPlan, phases: tuple[Callable[[KernelOps, ChildPlan], None], ...]
) -> None:
    for phase in phases:
        try:
            phase(k, plan)
        except PhaseError:
            raise
        except OSError as e:
            raise PhaseError(
                phase.__name__, str(e.filename or phase.__name__), e.errno or 0, e.strerror or ""
            ) from None
        except Exception as e:  # report anything; this process must not unwind
            raise PhaseError(phase.__name__, type(e).__name__, 0, str(e)) from None


def resolve_program(argv0: str, env: dict[str, str]) -> str:
    """Find ``argv0`` like execvp(3) does, inside the box's root and with the box's PATH."""
    if "/" in argv0:
        return argv0
    for directory in env.get("PATH", "/usr/bin:/bin").split(":"):
        candidate = os.path.join(directory or ".", argv0)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, "not found", argv0)


def exec_program(k: KernelOps, plan: ChildPlan) -> None:
    """Install seccomp and execve. Between the two only ``sendmsg`` and ``execve`` run."""
    try:
        path = resolve_program(plan.argv[0], plan.env)
    except FileNotFoundError:
        protocol.send(plan.sync, protocol.EXEC_ERROR, errno=2)
        return
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # Python ignores these; execve keeps ignored signals
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        listener = k.install_seccomp(plan.bpf, listener=plan.listener)
    except OSError as e:
        raise PhaseError("install_seccomp", "seccomp", e.errno or 0) from None
    # CLOCK_MONOTONIC is one clock for every namespace (no time namespace is made), so the
    # supervisor can measure wall time from this instant rather than from its own wake-up.
    # The CPU this process used since joining the box cgroup is the sandbox's, not the
    # program's: it is reported so the supervisor can subtract it exactly.
    protocol.send(
        plan.sync,
        protocol.EXEC,
        fds=(listener,) if plan.listener else (),
        at=time.monotonic_ns(),
        cpu_ns=_cpu_since_join(plan),
    )
    try:
        k.execve(path, plan.argv, plan.env)
    except OSError as e:
        protocol.send(plan.sync, protocol.EXEC_ERROR, errno=e.errno or 0)


def _report(plan: ChildPlan, e: PhaseError) -> None:
    with contextlib.suppress(OSError):  # the supervisor is gone: exiting is all that is left
        protocol.send(
            plan.sync,
            protocol.SETUP_ERROR,
            phase=e.phase,
            op=e.op[:200],
            errno=e.err,
            detail=e.detail[:500],
        )


def _program(k: KernelOps, plan: ChildPlan) -> None:
    _run_phases(k, plan, PROGRAM_PHASES)
    exec_program(k, plan)


def _init(k: KernelOps, plan: ChildPlan) -> int:
    """pid 1: fork the program's process early, set up, reap every child until it exits."""
    if plan.native_init is not None:
        _run_phases(k, plan, NATIVE_INIT_PHASES)
        raise PhaseError("become_native_init", "execve returned", 0)
    _run_phases(k, plan, INIT_EARLY_PHASES)
    program = os.fork()
    if program == 0:
        _in_child(k, plan, _program)
    for fd in (plan.root_ready[0], *plan.cgroup_entry):
        os.close(fd)
    _run_phases(k, plan, INIT_PHASES)
    # pid 1 ignores signals it has no handler for, sent from inside its namespace; drop the
    # handlers Python installed so the program cannot make init raise (pid_namespaces(7)).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    watch = treelimits.TreeWatch(plan.tree_limits) if plan.tree_limits is not None else None
    while True:
        if watch is None:
            pid, status, usage = os.wait4(-1, 0)
        else:
            fired, reaped = watch.step()
            if fired is not None:
                protocol.send(plan.sync, protocol.TREE, (), limit=fired, **watch.figures())
            if reaped is None:
                continue
            pid, status, usage = reaped
        if pid == program:
            if watch is not None:  # the program's process is reaped: its CPU is init's now
                watch.sample()
                protocol.send(plan.sync, protocol.TREE, (), limit="", **watch.figures())
            protocol.send(
                plan.sync,
                protocol.EXITED,
                status=status,
                at=time.monotonic_ns(),
                utime_us=int(usage.ru_utime * 1e6),
                stime_us=int(usage.ru_stime * 1e6),
                maxrss_kb=usage.ru_maxrss,
            )
            return 0


def _setup(k: KernelOps, plan: ChildPlan) -> int:
    _run_phases(k, plan, SETUP_PHASES)
    init = os.fork()
    if init == 0:
        _in_child(k, plan, _init)
    if plan.native_init is not None:
        # Nothing is left for Python here: wait as the small native program instead, with
        # init's ids: the parent-death signal is a signal like any other, checked against the
        # sender's ids (kill(2)), and A keeps no capability across this execve to override it.
        try:
            if plan.init_ids is not None:
                k.set_real_ids(*plan.init_ids)
            k.exec_fd(plan.native_init, ("boxinit", "hold", str(plan.supervisor_pid)))
        except OSError as e:
            raise PhaseError("hold", "execve boxinit", e.errno or 0) from None
    _, status = os.waitpid(init, 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


def _in_child(
    k: KernelOps, plan: ChildPlan, body: Callable[[KernelOps, ChildPlan], object]
) -> None:
    """Run ``body`` in a freshly forked process and never return into the caller's stack."""
    code = EXIT_SETUP_FAILED
    try:
        result = body(k, plan)
        code = result if isinstance(result, int) else EXIT_SETUP_FAILED
    except PhaseError as e:
        _report(plan, e)
    except BaseException as e:
        _report(plan, PhaseError("child", type(e).__name__, 0, str(e)))
    finally:
        os._exit(code)


def start(k: KernelOps, plan: ChildPlan) -> int:
    """Fork the setup process; returns its pid. Call only from a single-threaded process."""
    pid = os.fork()
    if pid == 0:
        _in_child(k, plan, _setup)
    return pid
