"""The sandbox's own work yields to programs (sched(7), SCHED_IDLE).

Boxes built ahead and boxes torn down after their report run while other boxes' programs run;
at normal priority they would take CPU from them, and on a small host stretch an empty
program's wall time by a millisecond or more. At SCHED_IDLE they only get CPU that no program
wants. Only as root: a process at SCHED_IDLE needs CAP_SYS_NICE (or an RLIMIT_NICE) to get
back, and a warm box must get back when its run comes.
"""

from __future__ import annotations

import contextlib
import os


def background() -> None:
    """This process (and what it forks from now on) runs at SCHED_IDLE."""
    if os.geteuid() == 0:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def raise_process(pid: int) -> None:
    """Back to the normal policy: ``pid`` only, if it is still at SCHED_IDLE."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):  # gone, or not ours to change
        if os.sched_getscheduler(pid) == os.SCHED_IDLE:
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


def foreground(pid: int) -> None:
    """Back to the normal policy: ``pid`` and every descendant still at SCHED_IDLE (a warm
    box's processes: the listener's receiver, setup, init, the runner). Parents first, so a
    child forked meanwhile inherits the normal policy; one forked while its parent was being
    raised may be missed, which is why a warm box raises itself again once it is ready."""
    if os.geteuid() != 0:
        return
    pending = [pid]
    while pending:
        current = pending.pop()
        raise_process(current)
        with (
            contextlib.suppress(OSError),  # gone
            open(f"/proc/{current}/task/{current}/children") as children,
        ):
            pending += [int(child) for child in children.read().split()]
