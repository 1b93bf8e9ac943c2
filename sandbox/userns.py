"""User namespace, parent side: which host ids a box runs as, and writing its id maps.

As root, each concurrent box gets its own unprivileged host uid/gid (``ID_BASE + slot``), held by
an ``flock`` on a slot file for the run's lifetime (released by the kernel even after SIGKILL).
Without root, the only id a user may map is its own (user_namespaces(7), "Defining user and
group ID mappings"), so every box of that user shares it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import HostError
from .state import take_slot

ID_BASE = 100_000_000
SLOTS = 65536
#: As root, the host id that owns unpacked image layers and that a build step's box runs as
#: (mapped to 0 inside, so it may change any file of the image, as a build's root does). Run
#: boxes never get it: they see layer files as owned by nobody, read-only.
IMAGE_OWNER = ID_BASE - 1


@dataclass
class HostIds:
    """The host uid/gid a box runs as; ``lock_fd`` is held while the box exists."""

    uid: int
    gid: int
    lock_fd: int | None = None

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
    return HostIds(ID_BASE + slot, ID_BASE + slot, fd)


def image_owner() -> tuple[int, int]:
    """(uid, gid) owning unpacked layers: :data:`IMAGE_OWNER` as root, the caller otherwise."""
    if os.geteuid() == 0:
        return IMAGE_OWNER, IMAGE_OWNER
    return os.geteuid(), os.getegid()


def write_maps(pid: int, inside_uid: int, inside_gid: int, ids: HostIds) -> None:
    """Map exactly one id each way; ``setgroups`` is denied first (CVE-2014-8989) and for good."""
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{inside_uid} {ids.uid} 1\n"),
        ("gid_map", f"{inside_gid} {ids.gid} 1\n"),
    ):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
