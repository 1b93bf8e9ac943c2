"""Linked networks: members reach each other and nothing else; nothing is left behind."""

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandbox
from sandbox import Verdict
from sandbox.box import network
from sandbox.spec import Link
from tests.conftest import SANDBOX

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="linked networks need root")

# argv: HOST PORT KIND (tcp, udp, or once: a single TCP try). Prints the answer or the errno.
CONNECT = """
import errno, socket, sys, time
host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
last = "timeout"
for attempt in range(1 if kind == "once" else 60):
    try:
        if kind == "udp":
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.2)
            u.sendto(b"ping", (host, port)); print(u.recvfrom(16)[0].decode()); break
        s = socket.create_connection((host, port), timeout=2); s.send(b"ping")
        print(s.recv(16).decode()); break
    except OSError as e:
        last = errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"
        time.sleep(0.05)
else:
    print(last)
"""
SERVE = """
import socket
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 5000)); t.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5000))
c, _ = t.accept(); c.send(c.recv(16).upper()); c.close()
m, a = u.recvfrom(16); u.sendto(m.upper(), a)
"""
BOTH = 'import subprocess, sys\nfor kind in ("tcp", "udp"):\n' \
       '    subprocess.run(["python3", "/box/src/connect.py", "server", "5000", kind])\n'


def write_group(directory: Path, boxes: dict[str, tuple[str, list[str]]],
                grace: str = "1s") -> Path:
    """A linked group: each box runs its own script (written here, bound at /box/src)."""
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    (directory / "connect.py").write_text(CONNECT)
    lines = ['network = "linked"', f'peer_grace = "{grace}"']
    for name, (script, args) in boxes.items():
        (directory / f"{name}.py").write_text(script)
        lines += ["[[box]]", f'name = "{name}"', 'profile = "linked"',
                  f"command = {json.dumps(['python3', f'/box/src/{name}.py', *args])}",
                  'limits = { wall_time = "5s" }',
                  "[[box.bind]]", f"source = {json.dumps(str(directory))}",
                  'target = "/box/src"']
    path = directory / "group.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def client_output(report: sandbox.GroupReport) -> str:
    return (report.reports["client"].stdout or b"").decode().strip()


def linked_client(directory: Path, host: str, port: int, kind: str = "once") -> str:
    path = write_group(directory, {"client": (CONNECT, [host, str(port), kind])})
    return client_output(sandbox.run_group(path))


def test_members_talk_over_tcp_and_udp_by_name(tmp_path):
    path = write_group(tmp_path / "g", {"server": (SERVE, []), "client": (BOTH, [])})
    report = sandbox.run_group(path)
    assert report.reports["server"].verdict is Verdict.OK
    assert client_output(report).split() == ["PING", "PING"]


def test_the_hosts_loopback_is_unreachable(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port)).close()  # reachable from the host
        assert linked_client(tmp_path / "c", "127.0.0.1", port) == "ECONNREFUSED"  # its own lo
    finally:
        server.close()


@pytest.fixture
def internet():
    """A listener in a network namespace of its own, reachable from the host by a veth: a
    stand-in for the rest of the world."""
    name, host_if = f"sbxtest-inet-{os.getpid()}", f"sbxh{os.getpid() % 100000}"
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "inet0", "netns", name],
        ["ip", "addr", "add", "10.250.0.1/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", name, "addr", "add", "10.250.0.2/24", "dev", "inet0"],
        ["ip", "-n", name, "link", "set", "inet0", "up"],
    ]
    for command in commands:
        if subprocess.run(command, capture_output=True).returncode != 0:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            pytest.skip(f"cannot build the test network: {' '.join(command)}")
    listener = subprocess.Popen(["ip", "netns", "exec", name, "python3", "-c",
                                 "import socket; s = socket.socket(); s.bind(('0.0.0.0', 8080));"
                                 "s.listen()\nwhile True: s.accept()[0].send(b'world')"])
    try:
        yield "10.250.0.2", 8080
    finally:
        listener.kill()
        listener.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_the_outside_world_is_unreachable(tmp_path, internet):
    host, port = internet
    for _ in range(100):  # the listener may take a moment to start
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                assert s.recv(5) == b"world"  # the host reaches it ...
            break
        except ConnectionRefusedError:
            threading.Event().wait(0.05)
    else:
        pytest.fail("the test listener did not start")
    assert linked_client(tmp_path / "c", host, port) == "ENETUNREACH"  # ... a box does not


def test_another_groups_members_are_unreachable(tmp_path):
    # Group a's server waits for a client for its wall time; meanwhile a box of another group
    # tries the addresses group a could have: its own subnet differs and it has no other route.
    path = write_group(tmp_path / "a", {"server": (SERVE, [])})
    results: dict[str, sandbox.GroupReport] = {}
    thread = threading.Thread(target=lambda: results.update(a=sandbox.run_group(path)))
    thread.start()
    try:
        outputs = {linked_client(tmp_path / f"c{slot}", f"10.213.{slot}.2", 5000)
                   for slot in range(4)}
    finally:
        thread.join()
    assert results["a"].reports["server"].verdict is Verdict.WALL_TIME_LIMIT  # nobody came
    # Other subnets are unreachable; in its own subnet, .2 is the client itself (refused).
    assert outputs == {"ENETUNREACH", "ECONNREFUSED"}


def test_boxes_cannot_change_addresses_routes_or_open_raw_sockets(tmp_path):
    code = (
        "import errno, fcntl, socket, struct\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "addr = struct.pack('=H2s4s8x', socket.AF_INET, b'', socket.inet_aton('10.9.9.9'))\n"
        "try:\n    fcntl.ioctl(s, 0x8916, struct.pack('16s16s8x', b'eth0', addr))\n"
        "    print('changed')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
        "for fam, kind, proto in ((socket.AF_INET, socket.SOCK_RAW, 1),\n"
        "                         (socket.AF_NETLINK, socket.SOCK_RAW, 0)):\n"
        "    try:\n        socket.socket(fam, kind, proto); print('opened')\n"
        "    except OSError as e:\n        print(errno.errorcode[e.errno])\n"
    )
    path = write_group(tmp_path / "g", {"client": (code, [])})
    out = client_output(sandbox.run_group(path)).split()
    assert out == ["EPERM", "EPERM", "EAFNOSUPPORT"]  # no CAP_NET_ADMIN/RAW; no netlink


# Runs a group RUNS times in namespaces of the test's own (see below) and prints, after each
# run, what is left: network namespaces, their mounts, links, the group's state files.
LEFTOVERS = """
import json, os, subprocess, sys
from pathlib import Path
import sandbox
from sandbox.box import network
path, runs = sys.argv[1], int(sys.argv[2])
groups = Path(os.environ["SANDBOX_HOME"]) / "groups"
seen = []
for _ in range(runs):
    ok = sandbox.run_group(path).ok
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    mounts = [line for line in open("/proc/self/mountinfo") if " /run/netns/" in line]
    files = sorted(os.listdir(groups)) if groups.is_dir() else []
    seen.append((ok, network.objects(), len(links.splitlines()), len(mounts), files))
print(json.dumps(sorted(set(json.dumps(s) for s in seen))))
"""


def leftovers_of_linked_runs(path: Path, runs: int) -> list[object]:
    """The distinct states left after each of ``runs`` runs of the group at ``path``.

    The runs happen in a mount namespace with a /run/netns of their own and in a network
    namespace of their own: what is found there is the sandbox's, never another program's."""
    network.NETNS_DIR.mkdir(parents=True, exist_ok=True)  # as `ip netns add` would
    result = subprocess.run(
        ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs sbxtest {network.NETNS_DIR} && exec "$0" -c "$1" "$2" "$3"',
         sys.executable, LEFTOVERS, str(path), str(runs)],
        capture_output=True, timeout=30 + runs * 5)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(s) for s in json.loads(result.stdout)]


@pytest.mark.slow
def test_500_linked_runs_leave_no_network_objects(tmp_path):
    path = write_group(tmp_path / "g", {"a": ("print(1)", []), "b": ("print(2)", [])})
    # Each run succeeded and left no namespace, no nsfs mount, no link but lo, no files.
    assert leftovers_of_linked_runs(path, 500) == [[True, [], 1, 0, []]]


# --- source spoofing ---------------------------------------------------------------------

# argv: OWN VICTIM OTHER (names or IPv4 addresses). Waits until IPv6 works (DAD), then sends
# the victim genuine packets and spoofed ones; prints each attempt's outcome ("sent" or the
# errno). The link-local addresses are the ones the sandbox's MACs give (network.link_local).
ATTACK = r"""
import errno, fcntl, ipaddress, socket, struct, sys, time
own, victim, other = (socket.gethostbyname(n) for n in sys.argv[1:4])
eth0 = socket.if_nametoindex("eth0")
print("own", own)
def mac(v4): return b"\x02\x00" + socket.inet_aton(v4)
def ll(v4):
    m = mac(v4)
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes([m[0] ^ 2]) + m[1:3]
                                     + b"\xff\xfe" + m[3:]))
def v6(source, payload, freebind=True):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    if freebind:
        s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND: needs no capability
    s.bind((source, 0, 0, eth0 if source.startswith("fe80") else 0))
    s.sendto(payload, (ll(victim), 6000, 0, eth0))
    return s
def v4(source, payload, option=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if option:
        s.setsockopt(socket.SOL_IP, option, 1)
    s.bind((source, 0))
    s.sendto(payload, (victim, 6000))
def set_mac(value):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, 0x8924, struct.pack("16sH6s8x", b"eth0", 1, value))  # SIOCSIFHWADDR
def pin_victim():  # a MAC change flushes the ARP cache: file the victim's MAC (SIOCSARP)
    arp = struct.pack("=H2s4s8x", socket.AF_INET, b"", socket.inet_aton(victim))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, 0x8955, struct.pack("16sH14si16s16s", arp, 1, mac(victim), 6,
                                           bytes(16), b"eth0"))
def impersonate():
    set_mac(mac(other))
    try:
        pin_victim(); v4(own, b"mac-member")
    finally:
        set_mac(mac(own)); pin_victim()  # no ARP of ours may follow (it would undo poison())
def poison():  # "who has VICTIM? tell SENDER at MAC": the victim files SENDER at MAC
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind(("eth0", 0))
        for sender, at in ((other, mac(own)), (own, b"\x02\x00\xde\xad\xbe\xef")):
            s.send(mac(victim) + mac(own) + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x800, 6, 4, 1)
                   + at + socket.inet_aton(sender) + bytes(6) + socket.inet_aton(victim))
for _ in range(80):  # until our link-local address is out of DAD and the victim answers
    try:
        s = v6(ll(own), b"hello", freebind=False); s.settimeout(0.1); s.recv(8); break
    except OSError:
        time.sleep(0.05)
else:
    print("ready no")
attacks = [
    ("v4-true", lambda: v4(own, b"v4-true")),
    ("v6-member", lambda: v6(ll(other), b"v6-member")),  # another member's link-local
    ("v6-nobody", lambda: v6("fe80::dead:beef", b"v6-nobody")),  # nobody's
    ("v6-global", lambda: v6("2001:db8::1", b"v6-global")),
    ("v4-member", lambda: v4(other, b"v4-member", 15)),  # IP_FREEBIND
    ("v4-transparent", lambda: v4(other, b"v4-transparent", 19)),  # IP_TRANSPARENT
    ("mac-member", impersonate),  # the other member's MAC (would steal its frames)
    ("arp-member", poison),  # ARP as the other member, or at a forged MAC
    ("done", lambda: v4(own, b"done")),
]
for name, attack in attacks:
    try:
        attack(); print(name, "sent", flush=True)
    except OSError as e:
        print(name, errno.errorcode[e.errno], flush=True)
"""
# Prints "SOURCE PAYLOAD" for every datagram on port 6000 (IPv4 or IPv6) until "done", then
# "ADDRESS arp-poisoned" for each ARP entry whose MAC is not the one the sandbox gives ADDRESS.
LISTEN = r"""
import socket
def arp_check():
    for line in open("/proc/net/arp").read().splitlines()[1:]:
        address, mac = line.split()[0], line.split()[3]
        if mac != "02:00:" + ":".join("%02x" % int(b) for b in address.split(".")):
            print(address, "arp-poisoned")
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 6000)); s.settimeout(4)
try:
    while True:
        data, source = s.recvfrom(64)
        print(source[0].removeprefix("::ffff:"), data.decode(), flush=True)
        try:
            s.sendto(b"ack", source)
        except OSError:
            pass
        if data == b"done":
            arp_check(); break
except TimeoutError:
    print("timeout")
"""
OWN, VICTIM, OTHER = "10.251.0.2", "10.251.0.3", "10.251.0.4"


def heard(output: str) -> set[tuple[str, str]]:
    return {(line.split()[0], line.split()[1]) for line in output.splitlines() if " " in line}


def outcomes(output: str) -> dict[str, str]:
    return dict(line.split() for line in output.splitlines() if " " in line)


GENUINE = {(network.link_local(OWN), "hello"), (OWN, "v4-true"), (OWN, "done")}
SPOOFED_V6 = {(network.link_local(OTHER), "v6-member"), ("fe80::dead:beef", "v6-nobody"),
              ("2001:db8::1", "v6-global")}


def test_a_member_cannot_send_as_another_member_or_as_nobody(tmp_path):
    path = write_group(tmp_path / "g", {"server": (LISTEN, []),
                                        "peer": ("import time; time.sleep(5)", []),
                                        "client": (ATTACK, ["client", "server", "peer"])})
    report = sandbox.run_group(path)
    attacker = outcomes(client_output(report))
    assert "ready" not in attacker  # printed only if IPv6 never worked
    received = (report.reports["server"].stdout or b"").decode()
    # IPV6_FREEBIND lets the program send as anyone (the kernel checks no IPv6 source) ...
    assert {attacker[k] for k in ("v6-member", "v6-nobody", "v6-global")} == {"sent"}
    # ... the kernel refuses a non-local IPv4 source; IP_TRANSPARENT and a MAC need caps,
    # and the seccomp policy has no packet sockets.
    assert attacker["v4-member"] == "ENETUNREACH"  # no route from a non-local source
    assert attacker["v4-transparent"] == attacker["mac-member"] == "EPERM"
    assert attacker["arp-member"] == "EAFNOSUPPORT"
    # The victim hears only the attacker's true addresses: the bridge dropped every spoof.
    own = attacker["own"]
    assert heard(received) == {(network.link_local(own), "hello"), (own, "v4-true"),
                               (own, "done")}


def segment(filtered: bool) -> Iterator[list[str]]:
    """A segment built like a group's (bridge, veth ports, the sandbox's MACs) in network
    namespaces of the test's own, for three members OWN, VICTIM, OTHER; with the group's port
    filter or without it. Yields the bridge's namespace and the members' names."""
    tag = f"{os.getpid()}-{int(filtered)}"
    seg, members = f"sbxtest-seg-{tag}", [f"sbxtest-m{i}-{tag}" for i in range(3)]
    links = [Link(seg, i, address, 24, "") for i, address in enumerate((OWN, VICTIM, OTHER))]
    commands = [["ip", "netns", "add", name] for name in (seg, *members)]
    commands += [["ip", "-n", seg, "link", "add", "br0", "type", "bridge"],
                 ["ip", "-n", seg, "link", "set", "br0", "up"]]
    for name, link in zip(members, links, strict=True):
        port = network.port_name(link)
        commands += [
            ["ip", "-n", seg, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", name, "address", network.mac_address(link.address)],
            ["ip", "-n", seg, "link", "set", port, "master", "br0", "up"],
            ["ip", "-n", name, "addr", "add", f"{link.address}/24", "dev", "eth0"],
            ["ip", "-n", name, "link", "set", "eth0", "up"],
        ]
    try:
        for command in commands:
            if subprocess.run(command, capture_output=True).returncode != 0:
                pytest.skip(f"cannot build the test segment: {' '.join(command)}")
        if filtered:
            network.filter_ports(seg, links)
        yield seg, members
    finally:
        for name in (seg, *members):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def attack_on_segment(members: list[str], as_root: bool) -> tuple[dict[str, str], str]:
    """Run ATTACK in the first member's namespace (as root, or as nobody with no capability)
    against LISTEN in the second's; returns the attacker's outcomes and what the victim heard."""
    python = ["/usr/bin/python3"] if as_root else [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]
    listener = subprocess.Popen(["ip", "netns", "exec", members[1], "/usr/bin/python3", "-c",
                                 LISTEN], stdout=subprocess.PIPE, text=True)
    attacker = subprocess.run(["ip", "netns", "exec", members[0], *python, "-c", ATTACK,
                               OWN, VICTIM, OTHER], capture_output=True, text=True, timeout=30)
    received, _ = listener.communicate(timeout=30)
    return outcomes(attacker.stdout), received


@pytest.fixture
def open_segment():
    yield from segment(filtered=False)


@pytest.fixture
def filtered_segment():
    yield from segment(filtered=True)


def test_control_without_the_filter_a_member_sends_as_anyone(open_segment):
    attacker, received = attack_on_segment(open_segment[1], as_root=False)
    assert "ready" not in attacker  # printed only if IPv6 never worked
    assert heard(received) >= GENUINE | SPOOFED_V6  # no capability needed, as in a box
    assert attacker["v4-member"] == "ENETUNREACH"  # the kernel's own IPv4 check holds
    attacker, received = attack_on_segment(open_segment[1], as_root=True)
    assert {attacker[k] for k in ("v4-transparent", "mac-member", "arp-member")} == {"sent"}
    # The victim hears all; a socket does not show a source MAC, but a bridge that let it
    # through has learnt OTHER's MAC on the attacker's port.
    assert heard(received) >= {(OTHER, "v4-transparent"), (OWN, "mac-member"),
                               (OTHER, "arp-poisoned"), (OWN, "arp-poisoned")}


def test_the_filter_holds_even_against_a_member_with_every_capability(filtered_segment):
    for as_root in (False, True):
        attacker, received = attack_on_segment(filtered_segment[1], as_root)
        assert "ready" not in attacker  # printed only if IPv6 never worked
        if as_root:
            assert {attacker[k] for k in ("v4-transparent", "mac-member", "arp-member")} \
                == {"sent"}
        assert heard(received) == GENUINE  # nothing spoofed arrives, even from root


# argv: INTERFACE. Sends "bridge" to every IPv6 node on INTERFACE (ff02::1), port 6000, for a
# second once its own address is out of DAD, then "done".
KNOCK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
payloads = [b"bridge"] * 20 + [b"done"]
for _ in range(100):
    try:
        s.sendto(payloads[0], ("ff02::1", 6000, 0, socket.if_nametoindex(sys.argv[1])))
        payloads.pop(0)
        if not payloads:
            break
    except OSError:  # EADDRNOTAVAIL while our link-local address is tentative
        pass
    time.sleep(0.05)
"""


def knock(sender: str, interface: str, listener_ns: str) -> str:
    """What a listener in ``listener_ns`` hears when ``sender`` multicasts on ``interface``."""
    listener = subprocess.Popen(["ip", "netns", "exec", listener_ns, "/usr/bin/python3", "-c",
                                 LISTEN], stdout=subprocess.PIPE, text=True)
    threading.Event().wait(0.2)
    subprocess.run(["ip", "netns", "exec", sender, "/usr/bin/python3", "-c", KNOCK, interface],
                   check=True, timeout=30)
    return listener.communicate(timeout=30)[0]


def test_the_bridges_namespace_is_no_peer_on_the_segment(open_segment, filtered_segment):
    # Its bridge has an IPv6 link-local address: without the filter it hears members and
    # speaks to them ...
    (seg, members), (fseg, fmembers) = open_segment, filtered_segment
    assert "bridge" in knock(members[0], "eth0", seg)
    assert "bridge" in knock(seg, "br0", members[1])
    # ... with it, it does neither.
    assert knock(fmembers[0], "eth0", fseg) == "timeout\n"
    assert knock(fseg, "br0", fmembers[1]) == "timeout\n"


def test_without_nft_a_linked_group_is_refused(tmp_path):
    # A runner of its own (the library's helper may have started with another PATH), whose
    # PATH has neither nsenter nor nft.
    group = write_group(tmp_path / "g", {"client": ("print(1)", [])})
    result = subprocess.run([SANDBOX, "group", "run", str(group)], capture_output=True,
                            env={**os.environ, "PATH": str(tmp_path)}, timeout=60)
    assert result.returncode == 125
    assert b"needs nsenter and nft to stop source spoofing" in result.stderr
    # The namespace made before the filter is gone again: any left belongs to a live runner
    # (other runs on this host), not to the group runner that just failed.
    assert all(Path(f"/proc/{n.split('-')[1]}").is_dir() for n in network.objects())
