"""User namespace: which host ids a box runs as, its id maps, and its per-user counters.

As root, each concurrent box gets its own unprivileged host uid/gid (``ID_BASE + slot``), held by
an ``flock`` on a slot file for the run's lifetime (released by the kernel even after SIGKILL).
Without root, the only id a user may map is its own (user_namespaces(7), "Defining user and
group ID mappings"), so every box of that user shares it.

Per-user kernel counters (pending signals, message-queue bytes, inotify, processes) are charged
up the chain of user namespaces to the uid that created each one. As root, the box's own host
uid creates its namespace (:func:`child_become_box_owner`), so a box only ever exhausts its own
counters; rootless, they are the caller's, of which a box may take at most the bounds below.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass

from .. import kernel, protocol
from ..errors import HostError
from ..kernel import KernelOps
from ..state import take_slot
from . import pidns
from .plan import ChildPlan, PhaseError

ID_BASE = 100_000_000
SLOTS = 65536
#: As root, the host id that owns unpacked image layers and that a build step's box runs as
#: (mapped to 0 inside, so it may change any file of the image, as a build's root does). Run
#: boxes never get it: they see layer files as owned by nobody, read-only.
IMAGE_OWNER = ID_BASE - 1
#: As root, the box's pid 1 runs as a host id of its own (``INIT_BASE + slot``; a build step's,
#: ``IMAGE_OWNER - 1``), mapped inside to :data:`INIT_INSIDE`: execve makes every id of a
#: process equal, so with the program's ids the program could prlimit(2) its init (prlimit(2):
#: all of the caller's ids must match the target's) and have the kernel kill it.
INIT_BASE = ID_BASE + SLOTS
INIT_INSIDE = 4_000_000_000
#: As root, a workspace's files and every box run in it belong to ``WORKSPACE_BASE + slot``
#: (its pid 1 to ``WORKSPACE_INIT_BASE + slot``), an id no other box gets: a compiled program
#: written by one run can be run and rewritten by the next (sandbox/workspace.py).
WORKSPACE_BASE = INIT_BASE + SLOTS
WORKSPACE_INIT_BASE = WORKSPACE_BASE + SLOTS
#: Per-box bounds of per-user counters: rlimits set before the namespace exists ...
COUNTER_RLIMITS = (
    (resource.RLIMIT_SIGPENDING, 1024),  # queued signals, POSIX timers included
    (resource.RLIMIT_MSGQUEUE, 256 << 10),  # bytes of POSIX message queues
)
#: ... and the box namespace's own ceilings (/proc/sys/user, written by the box's init).
COUNTER_SYSCTLS = (
    ("max_inotify_instances", 32),
    ("max_inotify_watches", 8192),
    ("max_fanotify_groups", 8),
    ("max_fanotify_marks", 8192),
)


@dataclass
class HostIds:
    """The host uid/gid a box runs as; ``lock_fd`` is held while the box exists."""

    uid: int
    gid: int
    lock_fd: int | None = None
    init: int | None = None  # as root: the host uid and gid of the box's pid 1

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def allocate() -> HostIds:
    """Take a free id slot as root, or the caller's own ids otherwise."""
    if os.geteuid() != 0:
        return HostIds(os.geteuid(), os.getegid())
    # The lowest free slot: lock files are reused, so their number stays at the most boxes
    # ever run at once instead of growing towards SLOTS.
    taken = take_slot("ids", SLOTS)
    if taken is None:
        raise HostError("all box id slots are in use")
    fd, slot = taken
    return HostIds(ID_BASE + slot, ID_BASE + slot, fd, INIT_BASE + slot)


def workspace_ids(uid: int, gid: int, init: int) -> HostIds:
    """A workspace run's ids: its workspace's, held by the workspace for its whole life."""
    return HostIds(uid, gid, init=init)


def image_owner() -> tuple[int, int]:
    """(uid, gid) owning unpacked layers: :data:`IMAGE_OWNER` as root, the caller otherwise."""
    if os.geteuid() == 0:
        return IMAGE_OWNER, IMAGE_OWNER
    return os.geteuid(), os.getegid()


def build_step_ids() -> HostIds:
    """A build step's ids: :func:`image_owner`, and as root its pid 1's own."""
    uid, gid = image_owner()
    return HostIds(uid, gid, init=IMAGE_OWNER - 1 if os.geteuid() == 0 else None)


def write_maps(pid: int, inside_uid: int, inside_gid: int, ids: HostIds) -> None:
    """Map the box's id each way (and, as root, its pid 1's); ``setgroups`` is denied first
    (CVE-2014-8989) and for good."""
    extra = f"{INIT_INSIDE} {ids.init} 1\n" if ids.init is not None else ""
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{inside_uid} {ids.uid} 1\n{extra}"),
        ("gid_map", f"{inside_gid} {ids.gid} 1\n{extra}"),
    ):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def counter_rlimits() -> tuple[tuple[int, int], ...]:
    """:data:`COUNTER_RLIMITS`, never above what this process already has."""
    out = []
    for which, bound in COUNTER_RLIMITS:
        soft, _ = resource.getrlimit(which)
        out.append((which, bound if soft == resource.RLIM_INFINITY else min(bound, soft)))
    return tuple(out)


def bound_counters_from_inside(proc: str) -> None:
    """Child side (the box's init, which holds CAP_SYS_RESOURCE in the box's namespace): set
    the namespace's ceilings in its fresh ``/proc`` before ``/proc/sys`` is made read-only."""
    for name, value in COUNTER_SYSCTLS:
        with contextlib.suppress(FileNotFoundError):  # fanotify's exist since Linux 5.13
            fd = os.open(f"{proc}/sys/user/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(value).encode())
            finally:
                os.close(fd)


# --- child side: the setup process (A) makes the namespaces, the program's process enters its ids

#: New user namespace first: the kernel creates it before the others in one call, and they are
#: then owned by (and only admin-able from) it.
NAMESPACES = (
    kernel.CLONE_NEWUSER
    | kernel.CLONE_NEWNS
    | kernel.CLONE_NEWPID
    | kernel.CLONE_NEWNET
    | kernel.CLONE_NEWIPC
    | kernel.CLONE_NEWUTS
)


def child_drop_groups(k: KernelOps, plan: ChildPlan) -> None:
    """As root: shed supplementary groups now (it takes CAP_SETGID in the initial namespace).

    Otherwise the box would keep root's groups, and ``setgroups=deny`` would make that final.
    """
    if plan.drop_groups:
        k.setgroups([])


def child_become_box_owner(k: KernelOps, plan: ChildPlan) -> None:
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
    pidns.child_die_with_supervisor(k, plan)


def child_unshare_namespaces(k: KernelOps, plan: ChildPlan) -> None:
    k.unshare(NAMESPACES)


def child_await_id_maps(k: KernelOps, plan: ChildPlan) -> None:
    """The supervisor writes ``setgroups=deny``, ``uid_map`` and ``gid_map`` from outside
    (:func:`write_maps`)."""
    protocol.send(plan.sync, protocol.Unshared())
    reply = plan.sync.recv(protocol.MAX_MESSAGE)
    if not reply or not isinstance(protocol.decode(reply), protocol.Go):
        raise PhaseError("await_id_maps", "wait for the supervisor", 0, "supervisor went away")


def child_switch_ids(k: KernelOps, plan: ChildPlan) -> None:
    """Become the box's uid/gid, mapped to its unprivileged host ids (never root anywhere).

    Setup ran as the caller's host uid so it could reach the caller's bind sources; from here
    on the program's process cannot signal, trace or read the box's init.
    """
    k.setresgid(plan.gid)
    k.setresuid(plan.uid)
