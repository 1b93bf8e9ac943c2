"""The cgroup v2 box: entry, kill and removal on the real unified hierarchy, where mounted.

This host's v2 mount has no memory or pids controllers, so limits are tested for real on v1;
entry through cgroup.procs, cgroup.kill and removal need no controller and are tested here for real.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.box import cgroups


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


def test_v2_box_entry_kill_destroy(v2_cgroup):
    box = cgroups.V2Box(v2_cgroup)
    procs = []
    for _ in range(3):
        (entry,) = box.open_entry()
        # The child moves itself by writing "0" with the descriptor opened here, as a box does.
        code = f"import os; os.write({entry}, b'0'); os.execvp('sleep', ['sleep', '100'])"
        procs.append(subprocess.Popen([sys.executable, "-c", code], pass_fds=[entry]))
        os.close(entry)
    deadline = time.monotonic() + 5
    while len((v2_cgroup / "cgroup.procs").read_text().split()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sorted(int(x) for x in (v2_cgroup / "cgroup.procs").read_text().split()) == sorted(
        p.pid for p in procs)
    started = time.monotonic()
    box.kill()
    assert [p.wait(timeout=5) for p in procs] == [-9, -9, -9]
    assert time.monotonic() - started < 1
    box.destroy()
    assert not v2_cgroup.exists()
