"""The pid namespace and its init: who dies with whom, pid 1's protection, its execve into the
native init, and the Python init's loop (pid_namespaces(7)).

Every box process dies with the one that made it (PR_SET_PDEATHSIG, re-armed whenever a
credential change cleared it) and checks that its maker had not died already. With a cgroup,
pid 1 becomes the native ``boxinit init`` (sandbox/native/boxinit.c), which forks the runner,
reaps, reports and kills what is left; without one it stays in Python
(:func:`child_reap_until_the_program_exits`), and samples the tree's CPU and memory
(treelimits.py). Supervisor side: the setup process's pid is the supervisor's child
(supervisor.py waits for it); the box's own pids are never used from outside.
"""

from __future__ import annotations

import signal
import time

from .. import protocol
from ..kernel import KernelOps
from . import caps
from .plan import ChildPlan, PhaseError
from .treelimits import TreeWatch


def child_die_with_supervisor(k: KernelOps, plan: ChildPlan) -> None:
    """SIGKILL when the supervisor dies; if it died before this took effect, stop now."""
    k.set_pdeathsig(signal.SIGKILL)
    if k.parent_pid() != plan.supervisor_pid:
        raise PhaseError("die_with_supervisor", "supervisor is gone", 0)


def child_die_with_parent(k: KernelOps, plan: ChildPlan) -> None:
    """SIGKILL when the setup process dies (it dies with the supervisor, the same way).

    If the supervisor died before this took effect, every other holder of the sync socket is
    gone too and it reads as hung up: stop instead of running unsupervised.
    """
    k.set_pdeathsig(signal.SIGKILL)
    if k.hung_up(plan.sync.fileno()):
        raise PhaseError("die_with_parent", "supervisor is gone", 0)


def child_rearm_death_signal(k: KernelOps, plan: ChildPlan) -> None:
    """Building the root changed the filesystem uid, which clears the parent-death signal
    (prctl(2), PR_SET_PDEATHSIG): set it again, and check again that setup is still there."""
    child_die_with_parent(k, plan)


def child_protect_init(k: KernelOps, plan: ChildPlan) -> None:
    """Make pid 1 unreadable and untraceable by the program (same uid): not dumpable."""
    k.set_dumpable(False)


def child_become_native_init(k: KernelOps, plan: ChildPlan) -> None:
    """Replace this interpreter with ``boxinit init``, keeping the sync socket and
    :data:`caps.NATIVE_INIT_CAPABILITIES` (pid 1 stays pid 1 across execve; the parent-death
    signal stays too, since no credential changes, prctl(2))."""
    if plan.native_init is None:
        raise PhaseError("become_native_init", "no native init", 0)
    sync = plan.sync.fileno()
    k.close_fds_except((sync, plan.native_init))
    k.set_inheritable(sync)
    # execve clears the ambient set of what it counts as a set-id exec: a real id other
    # than the effective one, or a filesystem id other than it (building the root set the
    # fsids; capabilities(7), security/commoncap.c), and it makes the saved ids the effective
    # ones. So every id becomes the one pid 1 keeps: as root, ids of its own that the program
    # never has, so the program cannot prlimit(2), signal or renice it; rootless only one id
    # can be mapped and pid 1 shares the program's (it ignores the signals the program could
    # send, pid_namespaces(7), and its own figures are not the program's).
    k.set_real_ids(*(plan.init_ids or (plan.uid, plan.gid)))
    caps.child_keep_for_native_init(k, plan)
    child_die_with_parent(k, plan)  # the uid change may have cleared the parent-death signal
    k.exec_fd(plan.native_init, ("boxinit", "init", str(sync)))


def child_hold(k: KernelOps, plan: ChildPlan) -> None:
    """The setup process, once init is forked: wait as the small native program instead, with
    init's ids: the parent-death signal is a signal like any other, checked against the
    sender's ids (kill(2)), and A keeps no capability across this execve to override it."""
    if plan.native_init is None:
        raise PhaseError("hold", "no native init", 0)
    if plan.init_ids is not None:
        k.set_real_ids(*plan.init_ids)
    k.exec_fd(plan.native_init, ("boxinit", "hold", str(plan.supervisor_pid)))


def child_reset_signals(k: KernelOps, plan: ChildPlan) -> None:
    """The program starts with default dispositions and an empty mask: Python ignores
    SIGPIPE, SIGXFSZ and SIGINT, and execve keeps ignored signals (signal(7))."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        k.default_signal(sig)
    k.unblock_signals()


def child_reap_until_the_program_exits(k: KernelOps, plan: ChildPlan, program: int) -> None:
    """The Python init's loop: reap every child until the program's process exits, then report
    its status and rusage (and, without a cgroup, the tree's figures)."""
    # pid 1 ignores signals it has no handler for, sent from inside its namespace; drop the
    # handler Python installed so the program cannot make init raise (pid_namespaces(7)).
    k.default_signal(signal.SIGINT)
    watch = TreeWatch(plan.tree_limits, k) if plan.tree_limits is not None else None
    while True:
        if watch is None:
            pid, status, usage = k.wait4(-1, 0)
        else:
            fired, reaped = watch.step()
            if fired is not None:
                protocol.send(plan.sync, watch.message(fired))
            if reaped is None:
                continue
            pid, status, usage = reaped
        if pid == program:
            if watch is not None:  # the program's process is reaped: its CPU is init's now
                watch.sample()
                protocol.send(plan.sync, watch.message(""))
            protocol.send(
                plan.sync,
                protocol.Exited(
                    status=status,
                    at=time.monotonic_ns(),
                    utime_us=int(usage.ru_utime * 1e6),
                    stime_us=int(usage.ru_stime * 1e6),
                    maxrss_kb=usage.ru_maxrss,
                ),
            )
            return
