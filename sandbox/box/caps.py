"""Capabilities and no_new_privs (capabilities(7), prctl(2)). Child side only: the supervisor
grants nothing; the box's processes hold the capabilities of their own user namespace and
give them up here."""

from __future__ import annotations

from ..kernel import KernelOps
from .plan import ChildPlan

#: What pid 1 keeps across its execve into boxinit, as ambient capabilities: mounts (per-run
#: binds), ids and the bounding set for the runner's privilege drop, rlimits above the current
#: ones, signals to every process of the box at its end (capabilities(7); the runner drops
#: them all before the program runs).
NATIVE_INIT_CAPABILITIES = (
    5,  # CAP_KILL
    6,  # CAP_SETGID
    7,  # CAP_SETUID
    8,  # CAP_SETPCAP
    21,  # CAP_SYS_ADMIN
    24,  # CAP_SYS_RESOURCE
)


def child_keep_for_native_init(k: KernelOps, plan: ChildPlan) -> None:
    """Raise :data:`NATIVE_INIT_CAPABILITIES` into the ambient set, so execve keeps them."""
    k.keep_capabilities_across_exec(NATIVE_INIT_CAPABILITIES)


def child_no_new_privs(k: KernelOps, plan: ChildPlan) -> None:
    """Before the filter: seccomp(2) refuses an unprivileged filter without it, and it keeps
    any set-id file from granting anything (prctl(2))."""
    k.set_no_new_privs()


def child_drop_capabilities(k: KernelOps, plan: ChildPlan) -> None:
    """Every capability of every set (ambient, bounding, then the rest), securebits locked."""
    k.drop_capabilities()
