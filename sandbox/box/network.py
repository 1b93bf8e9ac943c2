"""Linked networking for a group of boxes (parent side, pyroute2 over netlink).

A group gets its own network namespace, owned by the sandbox, holding one bridge with no
address: a pure layer-2 segment with no route to the host, to other groups or anywhere else.
Each box's own network namespace receives one end of a veth pair as ``eth0`` (the other end is
a port of the bridge), and its init gives ``eth0`` the box's address (:func:`child_set_up_network`).
Members find each other by name through the group's ``/etc/hosts``, bound over the box's.

No member may speak as another, or as an address nobody has: the kernel refuses a non-local
IPv4 source to a socket without ``IP_TRANSPARENT`` (``CAP_NET_ADMIN``), but ``IPV6_FREEBIND``
needs no capability and lets any program send from any IPv6 address (ipv6(7)). So the bridge,
in the group's namespace and out of every box's reach, drops each frame a port receives unless
its source MAC and IPv4, ARP or IPv6 source are those the sandbox gave that port's box
(``port_ruleset``, nftables' bridge family), and the group's own stack neither hears nor speaks
on the segment.

Named namespaces live in ``/run/netns`` as ``sandbox-<pid>-<start>-<n>``; a runner that starts
removes those of runners that died (their veths died with their boxes' namespaces).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import HostError
from ..kernel import KernelOps
from ..spec import Link, NetworkMode
from ..state import ensure_dir, state_dir, take_slot
from .plan import ChildPlan

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
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
        self.links: dict[str, Link] = {}
        for index, member in enumerate(members):
            address = str(subnet.network_address + index + 2)
            hosts.append(f"{address}\t{member}")
            self.links[member] = Link(self.name, index, address, PREFIX, str(self.dir / "hosts"))
        try:
            netns.create(self.name)
            # The filter is in place before the bridge is up and before any port exists.
            filter_ports(self.name, list(self.links.values()))
            with NetNS(self.name) as ns:
                ns.link("add", ifname="br0", kind="bridge")
                ns.link("set", index=ns.link_lookup(ifname="br0")[0], state="up")
        except BaseException:
            self.close()
            raise
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

    peer = {"ifname": "eth0", "net_ns_pid": pid, "address": mac_address(link.address)}
    with NetNS(link.netns) as ns:
        ns.link("add", ifname=port_name(link), kind="veth", peer=peer)
        index = ns.link_lookup(ifname=port_name(link))[0]
        bridge = ns.link_lookup(ifname="br0")[0]
        ns.link("set", index=index, master=bridge, state="up")


def port_name(link: Link) -> str:
    """The name of the bridge port whose veth peer is the box's ``eth0``."""
    return f"sbx{link.index}"


def mac_address(address: str) -> str:
    """The MAC of the box whose IPv4 address is ``address``: locally administered (02:00), then
    the address's four bytes, so it is unique in the group and known before the box exists."""
    return ":".join(f"{b:02x}" for b in (2, 0, *ipaddress.IPv4Address(address).packed))


def link_local(address: str) -> str:
    """The IPv6 link-local address the kernel gives the box's ``eth0`` from its MAC (modified
    EUI-64, RFC 4291 appendix A): the only IPv6 source its port lets through."""
    mac = bytes.fromhex(mac_address(address).replace(":", ""))
    eui = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


def port_ruleset(links: list[Link]) -> str:
    """The nftables ruleset of a group's namespace (bridge family).

    Hooked at prerouting, so it sees every frame a port receives before it is forwarded or
    delivered, with policy drop: a frame passes only if its port, source MAC and source
    address (IPv4, IPv6 link-local, or ARP sender MAC and IPv4) are one member's. Anything
    else (another member's or an unassigned source, a changed MAC, VLAN tags, other
    protocols) is dropped. The input and output hooks drop everything: the group's namespace
    (its bridge's own IPv6 link-local) is no peer on the segment."""
    v4, v6, arp = [], [], []
    for link in links:
        port, mac = f'"{port_name(link)}"', mac_address(link.address)
        v4.append(f"{port} . {mac} . {link.address}")
        v6.append(f"{port} . {mac} . {link_local(link.address)}")
        arp.append(f"{port} . {mac} . {mac} . {link.address}")
    accepts = (
        f"ether type ip iifname . ether saddr . ip saddr {{ {', '.join(v4)} }} accept",
        f"ether type ip6 iifname . ether saddr . ip6 saddr {{ {', '.join(v6)} }} accept",
        "ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip"
        f" {{ {', '.join(arp)} }} accept",
    )
    return "\n".join((
        "table bridge sandbox {",
        "  chain ports {",
        "    type filter hook prerouting priority filter; policy drop;",
        *(f"    {rule}" for rule in accepts),
        "  }",
        "  chain local { type filter hook input priority filter; policy drop; }",
        "  chain own { type filter hook output priority filter; policy drop; }",
        "}",
    )) + "\n"


def filter_ports(netns: str, links: list[Link]) -> None:
    """Load ``port_ruleset`` into the named network namespace; fail closed without nft."""
    missing = [tool for tool in ("nsenter", "nft") if shutil.which(tool) is None]
    if missing:
        raise HostError(
            f"linked networking needs {' and '.join(missing)} to stop source spoofing"
            " (apt-get install nftables util-linux)"
        )
    done = subprocess.run(
        ["nsenter", f"--net={NETNS_DIR / netns}", "nft", "-f", "-"],
        input=port_ruleset(links), capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        raise HostError(f"cannot filter the linked network (nft): {detail}")


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


def child_set_up_network(k: KernelOps, plan: ChildPlan) -> None:
    """The new network namespace has only a down ``lo``; bring it up only when asked.

    In a linked group the supervisor has put one end of a veth pair here as ``eth0``
    (:func:`attach`); the box gives it its address and no route: its segment is all it can
    reach."""
    if plan.network in (NetworkMode.LOOPBACK, NetworkMode.LINKED):
        k.set_loopback_up()
    if plan.address is not None:
        k.set_interface_address("eth0", *plan.address)
