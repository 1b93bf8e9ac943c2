"""Nothing outlives a run: cgroups, mounts, processes, temp dirs, even after kill -9."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import sandbox
from sandbox import cgroups, supervisor, userns
from tests.conftest import SANDBOX


def box_processes() -> list[int]:
    """Host pids running as any box id."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid = entry.stat().st_uid
            except FileNotFoundError:
                continue
            if userns.ID_BASE <= uid < userns.ID_BASE + userns.SLOTS:
                found.append(int(entry.name))
    return found


def box_cgroups() -> list[Path]:
    backend = supervisor.cgroup_backend()
    if isinstance(backend, cgroups.CgroupV1):
        return [p for parent in backend.parents.values() for p in parent.glob("box-*")]
    if isinstance(backend, cgroups.CgroupV2):
        return list(backend.parent.glob("box-*"))
    return []


def snapshot() -> tuple[int, set[str], list[Path], list[int]]:
    mounts = len(Path("/proc/self/mountinfo").read_text().splitlines())
    return mounts, set(os.listdir("/tmp")), box_cgroups(), box_processes()


def wait_for(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(os.geteuid() != 0, reason="box ids are only distinct host ids as root")
def test_1000_runs_in_a_row_leave_nothing_behind():
    sandbox.run(["true"])  # the helper and the base layer exist from here on
    before = snapshot()
    verdicts = set()
    for i in range(1000):
        cmd = ["sh", "-c", "sleep 10 & echo $$"] if i % 2 else ["true"]
        verdicts.add(sandbox.run(cmd, wall_time="2s").verdict)
    assert verdicts == {sandbox.Verdict.OK}
    mounts, tmp, groups, procs = snapshot()
    assert mounts == before[0]
    assert tmp - before[1] == set()
    assert groups == [] and procs == []


def test_a_daemonized_orphan_dies_with_the_run():
    report = sandbox.run(["sh", "-c", "setsid sh -c 'sleep 60' </dev/null >/dev/null 2>&1 & "
                          "echo started"])
    assert report.stdout == b"started\n"
    assert wait_for(lambda: not any(
        Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\x0060")
        for p in box_processes() if Path(f"/proc/{p}/cmdline").exists()))


def test_orphans_survive_without_the_sandbox_so_the_test_above_can_fail():
    subprocess.run(["sh", "-c", "setsid sleep 61 </dev/null >/dev/null 2>&1 &"], check=True)
    try:
        assert wait_for(lambda: subprocess.run(["pgrep", "-f", "^sleep 61$"],
                                               capture_output=True).returncode == 0)
    finally:
        subprocess.run(["pkill", "-f", "^sleep 61$"])


@pytest.mark.skipif(os.geteuid() != 0, reason="box ids are only distinct host ids as root")
def test_50_concurrent_cli_runs_do_not_collide_and_leave_nothing_behind():
    subprocess.run([SANDBOX, "exec", "--", "true"], check=True)
    before = snapshot()
    procs = [subprocess.Popen([SANDBOX, "exec", "--", "sh", "-c", f"echo {i}; id -u"],
                              stdout=subprocess.PIPE) for i in range(50)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 50
    assert sorted(int(o.split()[0]) for o in outputs) == list(range(50))
    assert wait_for(lambda: snapshot()[2:] == ([], []))
    mounts, tmp, _, _ = snapshot()
    assert mounts == before[0] and tmp - before[1] == set()


@pytest.mark.skipif(os.geteuid() != 0, reason="box processes are found by their host ids")
def test_kill_9_of_the_supervisor_leaves_no_process_and_the_next_start_cleans_cgroups():
    proc = subprocess.Popen([SANDBOX, "exec", "--", "sh", "-c", "sleep 100 & sleep 100"])
    assert wait_for(lambda: len(box_processes()) >= 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: box_processes() == [])
    # The dead supervisor's cgroup is left; the next supervisor removes it.
    subprocess.run([SANDBOX, "exec", "--", "true"], check=True)
    assert wait_for(lambda: box_cgroups() == [])
