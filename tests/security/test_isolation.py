"""Attacks on the host from inside the box, each shown to work without the sandbox first."""

import ctypes
import os
import pty
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sandbox
from sandbox import Verdict
from tests.conftest import SANDBOX

PY = "import os, sys, socket, fcntl, termios, errno\n"


def box_python(code: str, **kw: object) -> sandbox.Report:
    return sandbox.run(["python3", "-c", PY + code], **kw)  # type: ignore[arg-type]


def host_python(code: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["/usr/bin/python3", "-c", PY + code], capture_output=True)


READ = "try:\n print(open(sys.argv[1] if len(sys.argv) > 1 else {path!r}).read()[:40])\n" \
       "except OSError as e:\n print('refused', e.errno)\n"


@pytest.mark.skipif(not os.path.exists("/etc/shadow"), reason="host has no /etc/shadow")
def test_host_shadow_file_is_not_in_the_box():
    assert b"root:" in host_python(READ.format(path="/etc/shadow")).stdout
    assert box_python(READ.format(path="/etc/shadow")).stdout == b"refused 2\n"


def test_a_host_marker_file_is_invisible_unless_bound(tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("top secret")
    os.chmod(tmp_path, 0o755)
    os.chmod(marker, 0o644)
    assert b"top secret" in host_python(READ.format(path=str(marker))).stdout
    assert box_python(READ.format(path=str(marker))).stdout == b"refused 2\n"
    bound = box_python(READ.format(path="/data/marker"), binds=[(str(tmp_path), "/data")])
    assert b"top secret" in bound.stdout  # the read method works when access is granted


def test_proc_pid_root_does_not_reach_the_host():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = "print(sorted(os.listdir(sys.argv[1]))[:3])"
        host = subprocess.run(["/usr/bin/python3", "-c", PY + code, f"/proc/{victim.pid}/root"],
                              capture_output=True)
        assert b"bin" in host.stdout  # on the host, /proc/PID/root is a way into its root
        guarded = "try:\n " + code + "\nexcept OSError as e:\n print('refused', e.errno)"
        report = sandbox.run(["python3", "-c", PY + guarded, "/proc/1/root"])
        assert report.stdout == b"refused 13\n"  # the box's init is not dumpable
        shadow = box_python("print(os.path.exists('/proc/self/root/etc/shadow'))")
        assert shadow.stdout == b"False\n"
    finally:
        victim.kill()
        victim.wait()


def test_another_processes_environment_is_not_visible():
    env = {**os.environ, "SANDBOX_TEST_SECRET": "hunter2"}
    victim = subprocess.Popen(["sleep", "30"], env=env)
    try:
        path = Path(f"/proc/{victim.pid}/environ")
        deadline = time.monotonic() + 5
        while b"hunter2" not in path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the victim has exec'd
        assert b"hunter2" in path.read_bytes()
        code = ("found = []\nfor p in os.listdir('/proc'):\n if p.isdigit():\n  try:\n"
                "   found.append(b'hunter2' in open(f'/proc/{p}/environ','rb').read())\n"
                "  except OSError: pass\nprint(any(found), len(os.listdir('/proc')) > 0)")
        assert box_python(code).stdout == b"False True\n"
    finally:
        victim.kill()
        victim.wait()


def test_killing_a_host_process_is_impossible():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = f"try:\n os.kill({victim.pid}, 9); print('killed')\nexcept OSError as e:\n" \
               " print('refused', e.errno)"
        assert box_python(code).stdout == b"refused 3\n"  # ESRCH: not in its pid namespace
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -9  # killing works from the host


@pytest.mark.parametrize("path", ["/usr/x", "/etc/passwd", "/x", "/dev/x",
                                  "/proc/sys/kernel/hostname", "/proc/sys/net/ipv4/ip_forward"])
def test_writes_outside_writable_mounts_fail(path):
    code = f"try:\n open({path!r}, 'w').write('1'); print('wrote')\nexcept OSError as e:\n" \
           " print('refused', errno.errorcode[e.errno])"
    # EROFS, not EACCES: the mount itself is read-only, whatever the file modes would allow.
    assert box_python(code).stdout == b"refused EROFS\n"
    assert box_python(code.replace(path, "/tmp/x")).stdout == b"wrote\n"


def test_a_read_only_bind_cannot_be_written_even_when_its_modes_allow(tmp_path):
    os.chmod(tmp_path, 0o777)
    code = "try:\n open('/data/x', 'w').write('1'); print('wrote')\nexcept OSError as e:\n" \
           " print('refused', errno.errorcode[e.errno])"
    assert box_python(code, binds=[(str(tmp_path), "/data")]).stdout == b"refused EROFS\n"
    assert not (tmp_path / "x").exists()
    writable = box_python(code, binds=[(str(tmp_path), "/data", True)])
    assert writable.stdout == b"wrote\n" and (tmp_path / "x").read_text() == "1"


def test_masked_proc_files_hide_the_hosts_data():
    code = "print(len(open('/proc/interrupts').read()))"
    assert int(host_python(code).stdout) > 0  # readable by any uid on the host
    assert box_python(code).stdout == b"0\n"  # /dev/null is bound over it
    if os.path.isdir("/proc/acpi"):
        listing = "try:\n print(len(os.listdir('/proc/acpi')))\nexcept OSError as e:\n" \
                  " print('refused', e.errno)"
        assert not host_python(listing).stdout.startswith(b"refused")
        assert box_python(listing).stdout == b"refused 13\n"  # an empty mode-0 tmpfs over it


def test_the_hosts_sysv_ipc_is_invisible():
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x5B000000 + os.getpid() % 0x1000000
    shmid = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT, open to every uid
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        code = "print(any(l.split()[0] == sys.argv[1] for l in open('/proc/sysvipc/shm')))"
        host = subprocess.run(["/usr/bin/python3", "-c", PY + code, str(key)],
                              capture_output=True)
        assert host.stdout == b"True\n"
        report = sandbox.run(["python3", "-c", PY + code, str(key)])
        assert report.stdout == b"False\n"  # its own IPC namespace
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_the_box_has_no_controlling_terminal(tmp_path):
    """Started from a terminal, the program still cannot reach it through /dev/tty (its own
    session: no controlling terminal to write escapes to, or inject input into)."""
    code = ("import os\ntry:\n os.close(os.open('/dev/tty', os.O_WRONLY)); print('opened')\n"
            "except OSError as e:\n print('refused', e.errno)\nprint(os.getsid(0) == os.getpid())")
    master, slave = pty.openpty()
    try:
        def on_a_terminal(*argv: str) -> bytes:
            return subprocess.run(["setsid", "--ctty", *argv], stdin=slave,
                                  capture_output=True).stdout
        assert on_a_terminal("/usr/bin/python3", "-c", code) == b"opened\nTrue\n"
        assert on_a_terminal(str(Path(sys.executable).parent / "sandbox"), "exec", "--",
                             "python3", "-c", code) == b"refused 6\nTrue\n"  # ENXIO
    finally:
        os.close(master)
        os.close(slave)


def test_raw_and_packet_sockets_are_refused_but_work_on_the_host():
    code = ("for fam, kind in ((socket.AF_INET, socket.SOCK_RAW), (socket.AF_PACKET, "
            "socket.SOCK_RAW), (socket.AF_NETLINK, socket.SOCK_RAW)):\n"
            " try:\n  socket.socket(fam, kind, 1 if fam == socket.AF_INET else 0).close();"
            " print('ok')\n except OSError as e:\n  print(errno.errorcode[e.errno])")
    if os.geteuid() == 0:
        assert host_python(code).stdout == b"ok\nok\nok\n"
    assert box_python(code).stdout == b"EPERM\nEAFNOSUPPORT\nEAFNOSUPPORT\n"


@pytest.fixture
def host_listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn.recv(16))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.mark.parametrize("profile", ["strict", "standard"])
def test_host_loopback_listener_is_unreachable(host_listener, profile):
    port, accepted = host_listener
    code = (f"s = socket.socket()\ns.settimeout(2)\ntry:\n s.connect(('127.0.0.1', {port}));"
            " s.send(b'hi'); print('connected')\nexcept OSError as e:\n"
            " print(errno.errorcode.get(e.errno, e))")
    assert host_python(code).stdout == b"connected\n"
    out = box_python(code, profile=profile).stdout
    # strict: no interface is up at all; standard: its own loopback, with nothing listening.
    assert out == (b"ENETUNREACH\n" if profile == "strict" else b"ECONNREFUSED\n")
    assert accepted == [b"hi"]  # only the host's own connection arrived


# Probed from C: CPython's fcntl.ioctl truncates the request to 32 bits. This profile's own
# ioctl rule (with conditions, allowing every command but 0) must not replace the guard.
IOCTL_RULE = ('extends = "strict"\n[[seccomp.rule]]\nsyscalls = ["ioctl"]\naction = "allow"\n'
              'args = [{ index = 1, op = "ne", value = 0 }]\n')


@pytest.mark.parametrize("call", ["tiocsti", "tiocsti_high"])
@pytest.mark.parametrize("rule", [False, True])
def test_tiocsti_is_refused_by_the_filter_in_every_profile(cprog, tmp_path, call, rule):
    prog = cprog("syscall")
    # Outside, with stdin not a terminal, the kernel answers ENOTTY (25), high bit or not.
    host = subprocess.run([str(prog / "syscall"), call], stdin=subprocess.DEVNULL,
                          capture_output=True)
    assert host.stdout.startswith(f"{call} returned -1 errno 25 ".encode()), host.stdout
    profile = tmp_path / "ioctl.toml"
    profile.write_text(IOCTL_RULE)
    report = sandbox.run(["/box/bin/syscall", call], binds=[(str(prog), "/box/bin")],
                         profile=str(profile) if rule else "strict")
    assert report.stdout.startswith(f"{call} returned -1 errno 1 ".encode()), report  # EPERM


def test_the_box_has_no_capabilities_no_new_privs_and_a_filter():
    status = sandbox.run(["cat", "/proc/self/status"]).stdout.decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[cap].strip() == "0000000000000000", cap
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    host = Path("/proc/self/status").read_text()
    assert "NoNewPrivs:\t0" in host  # the fields are read the same way on the host


def test_no_descriptor_leaks_into_the_box(tmp_path):
    leaked = tmp_path / "leak"
    leaked.write_text("x")
    fd = os.open(leaked, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        script = "import os; print(sorted(os.listdir('/proc/self/fd')))"
        host = subprocess.run([sys.executable, "-c", script], pass_fds=[fd], capture_output=True)
        assert str(fd).encode() in host.stdout  # an inherited fd is visible like this
        cli = subprocess.run([SANDBOX, "exec", "--", "python3", "-c", script], pass_fds=[fd],
                             capture_output=True)
        assert cli.stdout == b"['0', '1', '2', '3']\n"  # 3 is listdir's own directory fd
    finally:
        os.close(fd)
    # The library passes stdin to its helper as a descriptor of its own (inheritable once
    # received): after it is in place as 0, the original must be gone too.
    api = sandbox.run(["python3", "-c", script], stdin=b"x")
    assert api.stdout == b"['0', '1', '2', '3']\n"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _holds(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f) == str(path) for f in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def test_no_process_of_the_box_keeps_the_callers_descriptors(tmp_path):
    """Not even the box's init and setup processes, which the program could one day reach."""
    leaked = tmp_path / "leak"
    leaked.write_text("x")
    fd = os.open(leaked, os.O_RDONLY)
    os.set_inheritable(fd, True)
    proc = subprocess.Popen([SANDBOX, "exec", "--", "sleep", "30"], pass_fds=[fd])
    os.close(fd)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x0030\x00"
                for p in _descendants(proc.pid) if Path(f"/proc/{p}/cmdline").exists()):
            time.sleep(0.01)
        box = _descendants(proc.pid)
        assert len(box) >= 3  # setup, init, program
        assert _holds(proc.pid, leaked)  # the supervisor did inherit it: the probe works
        assert [p for p in box if _holds(p, leaked)] == []
    finally:
        proc.kill()
        proc.wait()


def test_setuid_binaries_do_not_raise_privileges(tmp_path):
    out = sandbox.run(["sh", "-c", "ls -l /usr/bin/passwd | cut -c4; su -c id root </dev/null "
                       "2>&1 | head -1; id -u"])
    assert out.stdout.endswith(b"1000\n")
    assert b"uid=0" not in out.stdout


def forkbomb(cprog, **kw: object) -> sandbox.Report:
    """tests/programs/forkbomb.c in the box: forks until 200 children live or fork fails."""
    return sandbox.run(["/box/bin/forkbomb", "200"], binds=[(str(cprog("forkbomb")), "/box/bin")],
                       wall_time="10s", **kw)  # type: ignore[arg-type]


def test_fork_bomb_is_contained_and_the_host_can_still_fork(cprog, tmp_path):
    report = forkbomb(cprog, pids=16)
    # 16 pids: the bomb itself and 15 children; the 16th fork is refused by pids.max.
    assert report.stdout == b"forked 15 errno 11 (Resource temporarily unavailable)\n"
    assert report.verdict is Verdict.OK and report.pids_peak == 16
    # Control: the same program under a profile with a large pids limit forks all it wants.
    loose = tmp_path / "loose.toml"
    loose.write_text('extends = "strict"\n[limits]\npids = 512\n')
    control = forkbomb(cprog, profile=str(loose))
    assert control.stdout == b"forked 200 errno 0 (none)\n"
    assert control.pids_peak == 201
    assert subprocess.run(["true"]).returncode == 0


def test_sethostname_is_forbidden_and_the_hostname_is_the_boxs():
    report = box_python("print(socket.gethostname(), flush=True); socket.sethostname('x')")
    assert report.stdout == b"box\n"
    assert report.verdict is Verdict.FORBIDDEN_SYSCALL
    assert report.forbidden_syscall == "sethostname"


def test_host_abstract_unix_sockets_are_unreachable():
    name = f"\0sandbox-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(name)
    server.listen()
    try:
        code = (f"s = socket.socket(socket.AF_UNIX)\ntry:\n s.connect({name!r}); print('connected')"
                "\nexcept OSError as e:\n print(errno.errorcode[e.errno])")
        assert host_python(code).stdout == b"connected\n"
        assert box_python(code).stdout == b"ECONNREFUSED\n"  # its own network namespace
    finally:
        server.close()
