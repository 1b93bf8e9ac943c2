"""File descriptors and the terminal: what the box's processes keep open, the program's stdio,
and its session. Child side only; the supervisor opens what the plan names (stdio pipes, the
sync socket, the cgroup's entry files, the root's mount trees)."""

from __future__ import annotations

from ..kernel import KernelOps
from .plan import ChildPlan


def child_isolate_fds(k: KernelOps, plan: ChildPlan) -> None:
    """Keep only what the box needs: the caller's other fds must never reach it."""
    k.close_fds_except(
        (
            *plan.stdio,
            plan.sync.fileno(),
            *plan.root_ready,
            *plan.root.descriptors(),
            *((plan.native_init,) if plan.native_init is not None else ()),
        )
    )


def child_new_session(k: KernelOps, plan: ChildPlan) -> None:
    """No controlling terminal, so TIOCSTI cannot reach the caller's (CVE-2017-5226)."""
    k.setsid()


def child_set_stdio(k: KernelOps, plan: ChildPlan) -> None:
    for target, fd in enumerate(plan.stdio):
        k.dup2(fd, target)


def child_close_fds(k: KernelOps, plan: ChildPlan) -> None:
    """Late, so nothing opened during setup leaks in (runc CVE-2024-21626 leaked a cgroup fd)."""
    k.close_fds_except((0, 1, 2, plan.sync.fileno()))
