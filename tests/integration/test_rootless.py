"""Rootless use: the same CLI as an unprivileged user (uid 65534) via setpriv."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from sandbox.limits import Limits
from tests.conftest import ROOT

NOBODY = 65534


def _reachable_by_nobody(path: Path) -> bool:
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if not mode & 0o001:
            return False
    return True


@pytest.fixture
def as_nobody():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to become an unprivileged user")
    python = Path("/usr/bin/python3")
    site = Path(sysconfig.get_paths()["purelib"])
    if sys.version_info[:2] != (3, 11) or not python.exists():
        pytest.skip("rootless test reuses this venv's packages with the system python3.11")
    for needed in (ROOT, site):
        if not _reachable_by_nobody(needed):
            pytest.skip(f"{needed} is not reachable by uid {NOBODY}")
    top = Path(tempfile.mkdtemp(prefix="sandbox-rootless-", dir="/tmp"))
    os.chmod(top, 0o755)
    home = top / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    profile = home / "rootless.toml"
    profile.write_text('extends = "strict"\n[limits]\nfallback = "rlimit"\n')

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SANDBOX_HOME": str(home / "state"),
               "PYTHONPATH": f"{ROOT}:{site}"}
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             str(python), "-m", "sandbox", *args], env=env, capture_output=True, timeout=60)

    yield run, profile
    shutil.rmtree(top)


def test_strict_fails_closed_without_cgroups(as_nobody):
    run, _ = as_nobody
    result = run("exec", "--profile", "strict", "--", "true")
    assert result.returncode == 125
    assert b"cannot enforce the memory and pids limits" in result.stderr


def test_rootless_box_with_explicit_fallback(as_nobody):
    run, profile = as_nobody
    result = run("exec", "--profile", str(profile), "--", "sh", "-c",
                 "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
                 "python3 -c 'print(6*7)'; touch /x /usr/x 2>&1 | grep -c 'Read-only file system'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\n")[:5] == [b"1000", b"CapEff:\t0000000000000000",
                                                b"NoNewPrivs:\t1", b"Seccomp:\t2", b"42"]
    assert result.stdout.endswith(b"42\n2\n")  # the root and the host's /usr, both read-only


def test_rootless_forbidden_syscall_and_wall_limit(as_nobody):
    run, profile = as_nobody
    forbidden = run("exec", "--profile", str(profile), "--", "python3", "-c",
                    "import ctypes; ctypes.CDLL(None).unshare(0x10000000)")
    assert forbidden.returncode == 128 + 31
    slow = run("exec", "--profile", str(profile), "--wall-time", "0.3", "--", "sleep", "5")
    assert slow.returncode == 137


def test_rootless_image_build_and_run(as_nobody):
    """Layers unpacked without root (whiteouts as 0/0 devices, opaque dirs as user xattrs),
    a RUN step in a rootless box, and a run on the result."""
    run, profile = as_nobody
    home = profile.parent
    build_profile = home / "rootless-build.toml"
    build_profile.write_text('extends = "build"\n[limits]\nfallback = "rlimit"\n')
    context = home / "ctx"
    context.mkdir()
    (context / "f").write_text("copied\n")
    (context / "Sandboxfile").write_text(
        "FROM scratch\nBUNDLE /bin/sh /usr/bin/cat /usr/bin/rm /usr/bin/mkdir\nCOPY f /data/f\n"
        "RUN mkdir /made && echo by-run > /made/x && rm /usr/bin/rm\n"
        'CMD ["/bin/sh", "-c", "cat /data/f /made/x; test -e /usr/bin/rm || echo no-rm"]\n')
    os.chown(context, NOBODY, NOBODY)
    built = run("image", "build", "--run-profile", str(build_profile), "-t", "rootless/img",
                str(context))
    assert built.returncode == 0, built.stderr
    result = run("exec", "--profile", str(profile), "--image", "rootless/img")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"copied\nby-run\nno-rm\n"
    layers = list((home / "state" / "images" / "layers").iterdir())
    assert layers and all(p.stat().st_uid == NOBODY for p in layers)


def test_rootless_plants_are_refused_and_bind_sources_are_the_checked_inode(as_nobody):
    """The supervisor checks without following symlinks; the box's init opens again and
    mounts only what was checked (the rootless path: no detached mount trees)."""
    run, profile = as_nobody
    home = profile.parent
    shared = home / "shared"
    shared.mkdir()
    os.chown(shared, NOBODY, NOBODY)
    (shared / "data").mkdir()
    (shared / "data" / "f").write_text("real\n")
    os.symlink("/etc", shared / "out")  # what an earlier box of this user left here
    ok = run("exec", "--profile", str(profile), "--ro-bind", f"{shared}/data:/box/d", "--",
             "cat", "/box/d/f")
    assert ok.returncode == 0 and ok.stdout == b"real\n", ok.stderr
    planted = run("exec", "--profile", str(profile), "--ro-bind", f"{shared}/out:/box/d", "--",
                  "cat", "/box/d/passwd")
    assert planted.returncode == 125 and b"is a symlink" in planted.stderr


def test_rootless_box_takes_only_its_share_of_the_callers_counters(as_nobody, cprog):
    _, profile = as_nobody
    home = profile.parent
    tools = home / "tools"
    tools.mkdir()
    shutil.copy(cprog("counters") / "counters", tools / "counters")
    os.chmod(tools, 0o755)
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c",
         f"PYTHONPATH={ROOT}:{sysconfig.get_paths()['purelib']} SANDBOX_HOME={home}/state "
         f"/usr/bin/python3 -m sandbox exec --profile {profile} --ro-bind {tools}:/box/t -- "
         "/box/t/counters sigpending hold 4"], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().split()
        assert line[0] == b"held" and 0 < int(line[1]) <= 1024
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                "--clear-groups", str(tools / "counters"), "sigpending",
                                "probe"], capture_output=True, timeout=30)
        assert probe.stdout == b"ok\n"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the CLI too: its box dies with it
        holder.wait()
        # Until the box's processes are gone they count against uid NOBODY's RLIMIT_NPROC,
        # which the tests after this one measure.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and subprocess.run(
                ["pgrep", "-u", str(NOBODY)], capture_output=True).returncode == 0:
            time.sleep(0.05)


# Children that each stay under the per-process limits but together pass the tree's: 12 x 240
# MiB under memory = 256M, and 4 x 0.6 s of CPU under cpu_time = 1 s. Each prints "escaped"
# only once the whole tree has passed the limit (every child holding its memory at once).
SPREAD_MEMORY = """
import os
ready_r, ready_w = os.pipe()
hold_r, hold_w = os.pipe()
for _ in range(12):
    if os.fork() == 0:
        os.close(hold_w)  # so the read below ends when the parent does, whatever happens
        block = bytearray(240 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        os.write(ready_w, b"1")
        os.read(hold_r, 1)
        os._exit(0)
got = b""
while len(got) < 12:
    got += os.read(ready_r, 12)
print("escaped", flush=True)
os.write(hold_w, b"x" * 12)
for _ in range(12):
    os.wait()
"""
SPREAD_CPU = """
import os, resource, time
for _ in range(4):
    if os.fork() == 0:
        while time.process_time() < 0.6:
            pass
        os._exit(0)
for _ in range(4):
    os.wait()
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print("escaped", usage.ru_utime + usage.ru_stime, flush=True)
"""


def _per_process_only(limits):
    """prlimit arguments for exactly the rlimits the fallback gives the program."""
    from sandbox.box.rlimits import table
    names = {resource.RLIMIT_AS: "as", resource.RLIMIT_NPROC: "nproc", resource.RLIMIT_CPU: "cpu",
             resource.RLIMIT_CORE: "core", resource.RLIMIT_FSIZE: "fsize",
             resource.RLIMIT_NOFILE: "nofile", resource.RLIMIT_STACK: "stack"}
    rlimits, _ = table(limits, True)
    return [f"--{names[which]}={value}" for which, value in rlimits]


def _as_nobody_plain(args, limits):
    """The control: the same program as the same user with the same rlimits, no box."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "prlimit",
         *_per_process_only(limits), *args], capture_output=True, timeout=120, cwd="/tmp")


def _report(run, profile, *args):
    report = profile.parent / "report.json"
    result = run("exec", "--profile", str(profile), "--report", str(report), *args)
    return result, json.loads(report.read_text())


def test_rootless_memory_spread_over_processes_is_limited_for_the_tree(as_nobody):
    run, profile = as_nobody
    limits = Limits(memory=256 << 20, pids=16, cpu_time=5.0)
    control = _as_nobody_plain(["python3", "-c", SPREAD_MEMORY], limits)
    assert control.stdout == b"escaped\n", control.stderr  # RLIMIT_AS alone: 2.8 GiB in all
    result, report = _report(run, profile, "--", "python3", "-c", SPREAD_MEMORY)
    assert result.returncode == 137, result.stderr
    assert b"escaped" not in result.stdout
    assert (report["verdict"], report["limit_fired"]) == ("memory_limit", "memory")
    assert report["cgroup"] == "none"
    assert report["limits"]["memory"]["mechanism"].startswith("box init sampling /proc")
    assert 256 << 20 < report["memory_peak"] < 2 * (256 << 20)


def test_rootless_cpu_spread_over_children_is_limited_for_the_tree(as_nobody):
    run, profile = as_nobody
    limits = Limits(cpu_time=1.0, memory=256 << 20, pids=16)
    control = _as_nobody_plain(["python3", "-c", SPREAD_CPU], limits)
    assert control.stdout.startswith(b"escaped"), control.stderr
    assert float(control.stdout.split()[1]) > 2.0  # RLIMIT_CPU alone: 2.4 s in all
    result, report = _report(run, profile, "--cpu-time", "1", "--", "python3", "-c", SPREAD_CPU)
    assert result.returncode == 137, result.stderr
    assert b"escaped" not in result.stdout
    assert (report["verdict"], report["limit_fired"]) == ("cpu_time_limit", "cpu_time")
    assert report["limits"]["cpu_time"]["mechanism"].startswith("box init sampling /proc")
    # Killed in time: at most a few clock ticks per process and one check late.
    assert 1.0 <= report["cpu_time"] < 1.15



def test_rootless_workspaces_are_refused_with_a_reason(as_nobody):
    run, _ = as_nobody
    result = run("workspace", "create", "w")
    assert result.returncode == 125 and b"a workspace needs root" in result.stderr
