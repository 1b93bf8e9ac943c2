"""What the box's processes are given before ``fork`` (:class:`ChildPlan`), and how a step of
theirs fails (:class:`PhaseError`). Shared by every concern module's ``child_`` steps."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..kernel import KernelOps
from ..spec import NetworkMode

if TYPE_CHECKING:  # annotations only: the concern modules import this one
    from .mounts import RootPlan
    from .treelimits import TreeLimits


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
    tree_limits: TreeLimits | None = None  # no cgroup: init enforces CPU and memory
    native_init: int | None = None  # boxinit's descriptor; None: the Python init (no cgroup)
    init_ids: tuple[int, int] | None = None  # as root: pid 1's own ids inside (userns.py)


class PhaseError(Exception):
    """A phase failed; carries what the supervisor needs to explain it."""

    def __init__(self, phase: str, op: str, err: int, detail: str = "") -> None:
        super().__init__(phase, op, err, detail)
        self.phase, self.op, self.err, self.detail = phase, op, err, detail


#: One step of a box process: the kernel to ask, and the plan.
Phase = Callable[[KernelOps, ChildPlan], None]
