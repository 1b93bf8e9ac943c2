"""The cgroup v2 backend's kill and attach on the real unified hierarchy, where it is mounted.

This host's v2 mount has no memory or pids controllers, so limits are tested for real on v1;
cgroup.procs, cgroup.kill and removal need no controller and are tested here for real.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

from sandbox import cgroups


@pytest.fixture
def v2_cgroup():
    _, v2 = cgroups.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    if v2 is None:
        pytest.skip("no cgroup v2 mount on this host")
    own = cgroups.parse_proc_cgroup(Path("/proc/self/cgroup").read_text()).get("", "/")
    path = v2 / own.lstrip("/") / f"sandbox-test-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a v2 cgroup here: {e.strerror}")
    if not (path / "cgroup.kill").exists():
        path.rmdir()
        pytest.skip("this kernel has no cgroup.kill (Linux < 5.14)")
    yield path
    if path.exists():
        cgroups.V2Box(path).destroy()


def test_v2_box_attach_kill_destroy(v2_cgroup):
    procs = [subprocess.Popen(["sleep", "100"]) for _ in range(3)]
    box = cgroups.V2Box(v2_cgroup)
    for p in procs:
        box.attach(p.pid)
    assert sorted(int(x) for x in (v2_cgroup / "cgroup.procs").read_text().split()) == sorted(
        p.pid for p in procs)
    started = time.monotonic()
    box.kill()
    assert [p.wait(timeout=5) for p in procs] == [-9, -9, -9]
    assert time.monotonic() - started < 1
    box.destroy()
    assert not v2_cgroup.exists()
