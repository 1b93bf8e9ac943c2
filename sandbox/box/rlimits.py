"""Resource limits (setrlimit(2)): the supervisor's table for the program, the bounds on
per-user counters that setup sets before the user namespace exists, and, without a cgroup, the
limits the box's init enforces on the whole tree (treelimits.py)."""

from __future__ import annotations

import math
import resource

from ..kernel import KernelOps
from ..limits import LIMITS, Limits
from ..report import AppliedLimit
from . import treelimits
from .plan import ChildPlan


def table(
    limits: Limits, fallback: bool
) -> tuple[tuple[tuple[int, int], ...], dict[str, AppliedLimit]]:
    """The rlimit table for the program, and each limit it enforces as applied: the registry
    names each limit's rlimit, and its ``fallback_rlimit`` without a cgroup."""
    table: dict[int, int] = {resource.RLIMIT_CORE: 0}
    applied = {"core": AppliedLimit(0, "RLIMIT_CORE")}
    for name, entry in LIMITS.items():
        rlimit = entry.rlimit or (entry.fallback_rlimit if fallback else None)
        value = getattr(limits, name)
        if rlimit is not None and value is not None:
            which = getattr(resource, f"RLIMIT_{rlimit}")
            # Two limits on one rlimit (memory's fallback and address_space): the lower holds.
            table[which] = min(int(value), table.get(which, int(value)))
            applied[name] = AppliedLimit(value, f"RLIMIT_{rlimit}")
    if limits.cpu_time is not None:
        # Whole seconds only: a per-process backstop for the cgroup's or the box init's figure.
        table[resource.RLIMIT_CPU] = math.ceil(limits.cpu_time + limits.extra_time + 1)
    return tuple(table.items()), applied


def tree_limits(limits: Limits, fallback: bool) -> treelimits.TreeLimits | None:
    """Without a cgroup, the CPU and memory limits the box's init enforces on the whole tree."""
    if not fallback or (limits.cpu_time is None and limits.memory is None):
        return None
    cpu = None if limits.cpu_time is None else limits.cpu_time + limits.extra_time
    return treelimits.TreeLimits(cpu_time=cpu, memory=limits.memory)


def resource_name(which: int) -> str:
    """``RLIMIT_AS`` -> ``AS``."""
    for name in dir(resource):
        if name.startswith("RLIMIT_") and getattr(resource, name) == which:
            return name.removeprefix("RLIMIT_")
    return str(which)


def child_bound_counters(k: KernelOps, plan: ChildPlan) -> None:
    """Per-box bounds on per-user counters, before the user namespace snapshots them.

    A new user namespace records its creator's RLIMIT_SIGPENDING and RLIMIT_MSGQUEUE as the
    most its tasks may charge to the creator (kernel/ucount.c, ``inc_rlimit_ucounts``); the
    program inherits the same values as its own limits.
    """
    for which, value in plan.counter_limits:
        k.setrlimit(which, value)


def child_set_rlimits(k: KernelOps, plan: ChildPlan) -> None:
    """The program's limits, from :func:`table`."""
    for which, value in plan.rlimits:
        k.setrlimit(which, value)
