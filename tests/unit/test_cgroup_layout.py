"""cgroup backends against the kernel's file formats, laid out in a temporary directory."""

from pathlib import Path

import pytest

from sandbox.box import cgroups
from sandbox.errors import HostError

MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
"""


def test_mountinfo_finds_v1_controllers_and_the_v2_mount():
    v1, v2 = cgroups.parse_mountinfo(MOUNTINFO)
    assert v2 == Path("/sys/fs/cgroup/unified")
    assert v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert v1["cpuacct"] == v1["cpu"] == Path("/sys/fs/cgroup/cpu,cpuacct")


def test_proc_cgroup_parses_v1_and_v2_lines():
    own = cgroups.parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n1:name=systemd:/s\n0::/x\n")
    assert own == {"memory": "/a/b", "cpu": "/", "cpuacct": "/", "systemd": "/s", "": "/x"}


def layout_v2(tmp_path: Path, controllers: str) -> Path:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    return tmp_path


def test_v2_enables_controllers_for_its_boxes(tmp_path):
    cgroups.CgroupV2(layout_v2(tmp_path, "cpuset cpu io memory pids"))
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids +cpu +cpuset"


def test_v2_without_memory_and_pids_is_refused(tmp_path):
    with pytest.raises(HostError, match="lacks controllers: memory, pids"):
        cgroups.CgroupV2(layout_v2(tmp_path, "cpu io"))


def test_v2_box_reads_the_kernels_counters(tmp_path):
    (tmp_path / "cpu.stat").write_text(
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 0\n")
    (tmp_path / "memory.peak").write_text("123456\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    box = cgroups.V2Box(tmp_path)
    usage = box.cpu_usage()
    assert (usage.user, usage.system, usage.total) == (1.0, 0.5, 1.5)
    assert box.memory_peak() == 123456
    assert box.oom_killed()
    assert box.pids_peak() is None  # pids.peak absent on older kernels


def test_v1_box_reads_exact_total_and_splits_by_ticks(tmp_path):
    paths = {c: tmp_path / c for c in ("memory", "pids", "cpuacct", "freezer")}
    for p in paths.values():
        p.mkdir()
    (paths["cpuacct"] / "cpuacct.usage").write_text("2000000000\n")
    (paths["cpuacct"] / "cpuacct.stat").write_text("user 150\nsystem 50\n")
    (paths["memory"] / "memory.max_usage_in_bytes").write_text("4096\n")
    (paths["memory"] / "memory.memsw.max_usage_in_bytes").write_text("8192\n")
    (paths["memory"] / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    box = cgroups.V1Box(paths)
    usage = box.cpu_usage()
    assert usage.total == pytest.approx(2.0) and usage.user == pytest.approx(1.5)
    assert box.memory_peak() == 8192  # memory+swap, so swap cannot hide usage
    assert not box.oom_killed()


@pytest.mark.parametrize(("name", "alive"), [
    ("box-1-1-0", None), ("not-ours", True), ("box-x", True),
])
def test_stale_boxes_are_recognised_by_owner_pid_and_start_time(name, alive):
    import os

    if alive is None:  # pid 1 exists but its start time is never 1 tick for a test runner's box
        start = cgroups._read(Path("/proc/1/stat")).rsplit(")", 1)[1].split()[19]
        assert cgroups._owner_alive(f"box-1-{start}-0")
        assert not cgroups._owner_alive(f"box-{os.getpid()}-0-0")
    else:
        assert cgroups._owner_alive(name) is alive
