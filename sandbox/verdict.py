"""From what was observed during a run to a verdict, with the limit that fired first."""

from __future__ import annotations

import os
import signal
from typing import NamedTuple

from .limits import LIMITS, Limits
from .report import SetupFailure, StopReason, Verdict, exec_failure_exit_code

#: Why the supervisor killed a box, and the verdict that gives: each limit's own from the
#: registry (memory is killed for by the box init without a cgroup, box/treelimits.py), then
#: the reasons that are not limits.
KILL_VERDICTS: dict[StopReason, Verdict] = {
    **{e.reason: e.verdict for e in LIMITS.values() if e.reason is not None and e.verdict},
    StopReason.FORBIDDEN_SYSCALL: Verdict.FORBIDDEN_SYSCALL,
    # In a group: still running a grace period after a peer ended (waiting for it, or hung).
    StopReason.PEER_EXITED: Verdict.WALL_TIME_LIMIT,
}

CANCELLED = "the run was cancelled: its caller went away"
NO_STATUS = "the box ended without reporting a status"


# A NamedTuple rather than a dataclass: made at import several times faster, and every run
# imports this module (docs/performance.md).
class Observed(NamedTuple):
    """What the supervisor saw; the input of :func:`decide`."""

    limits: Limits
    status: int | None  # the program's wait status, as its init reported it
    setup_error: SetupFailure | None
    exec_errno: int | None
    killed_for: StopReason | None  # why the supervisor killed the box, first
    started: bool  # the program's execve was reached
    cpu_time: float
    wall_time: float
    oom_killed: bool
    argv0: str


class Decision(NamedTuple):
    """The verdict and the figures that go with it."""

    verdict: Verdict
    exit_code: int | None
    signal: int | None
    limit_fired: StopReason | None
    error: str | None
    setup_error: SetupFailure | None = None  # where the setup failed, when ``error`` says so


def decide(o: Observed) -> Decision:
    """Apply the documented order (docs/report.md): setup failure, exec failure, the first limit
    the supervisor enforced, a limit exceeded within its grace time, the kernel's OOM kill,
    SIGSYS and SIGXCPU, another signal, the exit code."""
    if o.killed_for is StopReason.CANCELLED:
        return Decision(Verdict.SANDBOX_ERROR, None, None, o.killed_for, CANCELLED)
    if o.killed_for is StopReason.SETUP or (o.setup_error is not None and not o.started):
        error = o.setup_error.message() if o.setup_error else None
        return Decision(Verdict.SANDBOX_ERROR, None, None, o.killed_for, error, o.setup_error)
    if o.exec_errno is not None:
        return Decision(
            Verdict.RUNTIME_ERROR,
            exec_failure_exit_code(o.exec_errno),
            None,
            None,
            f"cannot execute {o.argv0!r}: {os.strerror(o.exec_errno)}",
        )
    if o.killed_for is not None and o.killed_for in KILL_VERDICTS:
        by_seccomp = o.killed_for is StopReason.FORBIDDEN_SYSCALL
        killed_by = signal.SIGSYS if by_seccomp else signal.SIGKILL
        return Decision(KILL_VERDICTS[o.killed_for], None, int(killed_by), o.killed_for, None)
    if o.status is None:
        error = o.setup_error.message() if o.setup_error else NO_STATUS
        return Decision(Verdict.SANDBOX_ERROR, None, None, None, error, o.setup_error)
    exit_code = os.WEXITSTATUS(o.status) if os.WIFEXITED(o.status) else None
    sig: int | None = os.WTERMSIG(o.status) if os.WIFSIGNALED(o.status) else None
    # Within the grace time (extra_time) a program may still finish, but over its limit.
    if o.limits.cpu_time is not None and o.cpu_time > o.limits.cpu_time:
        return Decision(Verdict.CPU_TIME_LIMIT, exit_code, sig, StopReason.CPU_TIME, None)
    if o.wall_time > o.limits.wall_time:
        return Decision(Verdict.WALL_TIME_LIMIT, exit_code, sig, StopReason.WALL_TIME, None)
    if o.oom_killed and (sig == signal.SIGKILL or exit_code not in (None, 0)):
        return Decision(Verdict.MEMORY_LIMIT, exit_code, sig, StopReason.MEMORY, None)
    if sig == signal.SIGSYS:
        return Decision(Verdict.FORBIDDEN_SYSCALL, None, sig, StopReason.FORBIDDEN_SYSCALL, None)
    if sig == signal.SIGXCPU:
        return Decision(Verdict.CPU_TIME_LIMIT, None, sig, StopReason.CPU_TIME, None)
    if sig is not None:
        return Decision(Verdict.SIGNALED, None, sig, None, None)
    verdict = Verdict.OK if exit_code == 0 else Verdict.RUNTIME_ERROR
    return Decision(verdict, exit_code, None, None, None)
