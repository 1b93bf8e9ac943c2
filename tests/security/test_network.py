"""Linked networks: members reach each other and nothing else; nothing is left behind."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import sandbox
from sandbox import Verdict, network

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
from sandbox import network
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
