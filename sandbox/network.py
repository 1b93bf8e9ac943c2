"""Linked networking for a group of boxes (parent side, pyroute2 over netlink).

A group gets its own network namespace, owned by the sandbox, holding one bridge with no
address: a pure layer-2 segment with no route to the host, to other groups or anywhere else.
Each box's own network namespace receives one end of a veth pair as ``eth0`` (the other end is
a port of the bridge), and its init gives ``eth0`` the box's address (``child.set_up_network``).
Members find each other by name through the group's ``/etc/hosts``, bound over the box's.

Named namespaces live in ``/run/netns`` as ``sandbox-<pid>-<start>-<n>``; a runner that starts
removes those of runners that died (their veths died with their boxes' namespaces).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
from pathlib import Path

from .errors import HostError
from .spec import Link
from .state import ensure_dir, state_dir, take_slot

NETNS_DIR = Path("/run/netns")
PREFIX = 24
SUBNETS = 256
_SEQ = itertools.count()


def _start_time(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _stale(name: str) -> bool:
    parts = name.split("-")
    return len(parts) == 4 and parts[0] == "sandbox" and _start_time(parts[1]) != parts[2]


class LinkedNetwork:
    """The segment of one group: create it, attach boxes, remove it (a context manager)."""

    def __init__(self, members: list[str]) -> None:
        if os.geteuid() != 0:
            raise HostError("linked networking needs root (it creates network namespaces)")
        from pyroute2 import NetNS, netns  # late: 250 ms of imports, only for linked groups

        self._netns_module = netns
        remove_stale()
        self.name = f"sandbox-{os.getpid()}-{_start_time('self')}-{next(_SEQ)}"
        self._slot_fd, subnet = _take_subnet()
        self.dir = ensure_dir(state_dir() / "groups") / self.name
        self.dir.mkdir(mode=0o755)
        try:
            netns.create(self.name)
            with NetNS(self.name) as ns:
                ns.link("add", ifname="br0", kind="bridge")
                ns.link("set", index=ns.link_lookup(ifname="br0")[0], state="up")
        except BaseException:
            self.close()
            raise
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
        self.links: dict[str, Link] = {}
        for index, member in enumerate(members):
            address = str(subnet.network_address + index + 2)
            hosts.append(f"{address}\t{member}")
            self.links[member] = Link(self.name, index, address, PREFIX, str(self.dir / "hosts"))
        (self.dir / "hosts").write_text("\n".join(hosts) + "\n")
        os.chmod(self.dir / "hosts", 0o644)

    def close(self) -> None:
        """Remove the namespace (and with it the bridge) and the group's files."""
        with contextlib.suppress(OSError):
            self._netns_module.remove(self.name)
        with contextlib.suppress(OSError):
            (self.dir / "hosts").unlink()
            self.dir.rmdir()
        os.close(self._slot_fd)

    def __enter__(self) -> LinkedNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(link: Link, pid: int) -> None:
    """Give the box whose network namespace ``pid`` is in its ``eth0`` on the group's bridge."""
    from pyroute2 import NetNS

    port = f"sbx{link.index}"
    with NetNS(link.netns) as ns:
        ns.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_pid": pid})
        index = ns.link_lookup(ifname=port)[0]
        bridge = ns.link_lookup(ifname="br0")[0]
        ns.link("set", index=index, master=bridge, state="up")


def _take_subnet() -> tuple[int, ipaddress.IPv4Network]:
    """A /24 of 10.213.0.0/16 no running group uses, held by a lock for the group's life."""
    taken = take_slot("subnets", SUBNETS)
    if taken is None:
        raise HostError("all linked-network subnets are in use")
    fd, slot = taken
    return fd, ipaddress.IPv4Network(f"10.213.{slot}.0/{PREFIX}")


def remove_stale() -> None:
    """Remove the namespaces and files of group runners that no longer exist."""
    from pyroute2 import netns

    names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    for name in names:
        if _stale(name):
            with contextlib.suppress(OSError):
                netns.remove(name)
    groups = state_dir() / "groups"
    if groups.is_dir():
        for entry in groups.iterdir():
            if _stale(entry.name):
                with contextlib.suppress(OSError):
                    (entry / "hosts").unlink()
                    entry.rmdir()


def objects() -> list[str]:
    """The sandbox's network namespaces on this host (for tests and doctor)."""
    names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    return sorted(n for n in names if n.startswith("sandbox-"))
