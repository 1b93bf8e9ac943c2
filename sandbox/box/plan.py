"""What the box's processes are given before ``fork`` (:class:`ChildPlan`, with the root's
:class:`RootPlan`), and how a step of theirs fails (:class:`PhaseError`). Shared by every
concern module's ``child_`` steps; the supervisor fills it in (mounts.plan_root for the root)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..hostpath import CheckedPath, PathRefused, check_source
from ..kernel import KernelOps
from ..report import AppliedLimit
from ..spec import NetworkMode

if TYPE_CHECKING:  # an annotation only
    from .treelimits import TreeLimits


@dataclass(frozen=True)
class HostDir:
    """A checked host path for the root: a detached mount tree (root) or its identity only."""

    checked: CheckedPath
    tree_fd: int | None = None  # from clone_tree; None: the box's init opens and re-checks it

    @property
    def is_dir(self) -> bool:
        return self.checked.is_dir


@dataclass(frozen=True)
class MountSource:
    """A checked host path to bind at ``target``."""

    source: HostDir
    target: str
    writable: bool

    @property
    def is_dir(self) -> bool:
        return self.source.is_dir


@dataclass(frozen=True)
class RootPlan:
    """Everything the child needs to build the root."""

    layers: tuple[HostDir, ...]
    binds: tuple[MountSource, ...]
    tmp_size: int
    work_size: int
    workdir: str
    noexec_tmp: bool
    uid: int
    gid: int
    cwd: str | None = None  # where the program starts; the work dir if None
    root_size: int | None = None  # writable root of this size; read-only if None
    build_dir: HostDir | None = None  # a build step's host dir holding upper/ and work/

    def applied(self) -> dict[str, AppliedLimit]:
        """The size limits this root's tmpfs mounts carry (``child_mount_root`` mounts them
        with these sizes), as the report shows them."""
        out = {"tmp_size": AppliedLimit(self.tmp_size, "tmpfs size")}
        if self.build_dir is None:  # a build step's work dir is the image's, on its upper
            out["work_size"] = AppliedLimit(self.work_size, "tmpfs size")
        if self.root_size is not None:
            how = "tmpfs size of the writable root's upper (+1M for overlayfs's work dir)"
            out["root_size"] = AppliedLimit(self.root_size, how)
        return out

    def still_current(self) -> bool:
        """Whether every host path of the root still names the inode that was checked (a box
        built ahead of its run must not bind what a path named before it was replaced)."""
        dirs = (*self.layers, *(b.source for b in self.binds), self.build_dir)
        for host in dirs:
            if host is None:
                continue
            try:
                fd, checked = check_source(host.checked.path)
            except (PathRefused, OSError):
                return False
            os.close(fd)
            if (checked.device, checked.inode) != (host.checked.device, host.checked.inode):
                return False
        return True

    def descriptors(self) -> tuple[int, ...]:
        """The detached trees the child attaches (the parent closes them once it has forked)."""
        dirs = (*self.layers, *(b.source for b in self.binds), self.build_dir)
        return tuple(d.tree_fd for d in dirs if d is not None and d.tree_fd is not None)


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
