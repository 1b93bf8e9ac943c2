"""Limits that make the box safe at all: wall, CPU, memory, pids; and what the report says."""

import json
import subprocess

import pytest

import sandbox
from sandbox import Verdict
from tests.conftest import SANDBOX

BUSY = "while True: pass"
ALLOC = "x = bytearray({size}); x[::4096] = b'1' * len(x[::4096]); print('allocated')"


def test_cpu_limit_counts_all_threads_and_is_its_own_verdict():
    report = sandbox.run(["python3", "-c", BUSY], cpu_time="0.5s", wall_time="5s")
    assert report.verdict is Verdict.CPU_TIME_LIMIT and report.limit_fired == "cpu_time"
    assert 0.5 <= report.cpu_time < 0.7
    assert report.signal == 9 and report.cli_exit_code() == 137


def test_memory_limit_is_detected_from_the_kernels_oom_kill():
    report = sandbox.run(["python3", "-c", ALLOC.format(size=200 << 20)], memory="64M")
    assert report.verdict is Verdict.MEMORY_LIMIT and report.oom_killed
    assert report.memory_peak is not None and report.memory_peak >= 60 << 20


def test_staying_under_the_memory_limit_is_not_a_memory_verdict():
    report = sandbox.run(["python3", "-c", ALLOC.format(size=20 << 20)], memory="64M")
    assert report.verdict is Verdict.OK and not report.oom_killed
    assert report.stdout == b"allocated\n"


FORK_LOOP = """
import os
r, w = os.pipe()
forked, err = 0, 0
try:
    while forked < 100:
        if os.fork() == 0:  # each child holds its pid until the gate closes
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        forked += 1
except OSError as e:
    err = e.errno
os.close(w)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print(forked, err)
"""


def test_fork_bomb_is_contained_by_pids():
    report = sandbox.run(["python3", "-c", FORK_LOOP], pids=8, wall_time="10s")
    assert report.stdout == b"7 11\n"  # EAGAIN at the 8th pid (the interpreter is the 1st)
    assert report.verdict is Verdict.OK and report.pids_peak == 8
    control = sandbox.run(["python3", "-c", FORK_LOOP], pids=256, profile="standard",
                          wall_time="10s")
    assert control.stdout == b"100 0\n" and control.pids_peak == 101


def test_file_size_limit_stops_a_big_write():
    write = ["sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1k count=4096 2>/dev/null; "
             "echo $?; wc -c </tmp/f"]
    report = sandbox.run(write, fsize="1M", tmp_size="16M")
    # dd is killed by SIGXFSZ (the box resets it to its default) at exactly 1 MiB.
    assert report.stdout == b"153\n1048576\n"
    control = sandbox.run(write, tmp_size="16M")
    assert control.stdout == b"0\n4194304\n"


def test_no_core_dumps(tmp_path):
    # The caller allows core dumps; the box must not inherit that.
    probe = ["sh", "-c", "ulimit -c"]
    host = subprocess.run(["prlimit", "--core=unlimited", *probe], capture_output=True)
    assert host.stdout == b"unlimited\n"
    report = tmp_path / "report.json"
    result = subprocess.run(["prlimit", "--core=unlimited", SANDBOX, "exec", "--report",
                             str(report), "--", *probe], capture_output=True)
    assert result.stdout == b"0\n"
    assert json.loads(report.read_text())["limits"]["core"]["value"] == 0


def test_report_names_the_mechanism_of_every_limit():
    report = sandbox.run(["true"])
    assert report.limits["wall_time"].mechanism == "supervisor deadline"
    assert report.limits["memory"].mechanism.startswith(report.cgroup)
    assert report.setup_time > 0 and report.profile_hash.startswith("sha256:")


def test_a_cgroup_backend_reports_only_what_its_control_files_hold():
    """Each limit a backend says it applied is in the control file its mechanism names, and it
    applies exactly the limits the registry gives the cgroup (remove a write: this goes red)."""
    from sandbox.box import cgroups
    from sandbox.limits import LIMITS, Enforcer, Limits
    from sandbox.units import format_cpu_list

    backend = cgroups.backend()
    if isinstance(backend, Exception):
        pytest.skip(f"no usable cgroup here: {backend}")
    limits = Limits(memory=64 << 20, pids=7, cpu_quota=0.5, cpus=(0,))
    box = backend.create(limits)
    try:
        assert set(box.applied) == {n for n, e in LIMITS.items() if Enforcer.CGROUP in e.enforcers}
        for name, applied in box.applied.items():
            version, _, files = applied.mechanism.partition(" ")
            assert version == box.backend
            control = files.split(" ")[0].split("+")[0]
            if isinstance(box, cgroups.V1Box):
                path = box.paths[control.split(".")[0]] / control
            else:
                path = box.path / control
            text = path.read_text().split()[0]
            expected = {
                "cpu_quota": str(int(0.5 * cgroups.CPU_PERIOD_US)),
                "cpus": format_cpu_list((0,)),
            }.get(name, str(applied.value))
            assert text == expected, (name, applied)
    finally:
        box.destroy()


def test_a_limit_nobody_enforces_is_reported_as_none(tmp_path):
    report = sandbox.run(["true"], cpu_quota=None)
    assert report.limits["cpu_quota"].value is None
    assert report.limits["cpu_quota"].mechanism == "none"
    assert report.limits["root_size"].mechanism == "none"
    assert report.limits["pids"].mechanism == f"{report.cgroup} pids.max"


def test_an_address_space_limit_fails_the_allocation_inside_the_program():
    """isolate's -m: RLIMIT_AS makes the large allocation fail in the program (MemoryError),
    where without it the same allocation succeeds under the cgroup limit."""
    program = ["python3", "-c", "try:\n    " + ALLOC.format(size=150 << 20)
               + "\nexcept MemoryError:\n    print('refused')"]
    limited = sandbox.run(program, address_space="100M")
    assert limited.ok and limited.stdout == b"refused\n" and not limited.oom_killed
    assert limited.limits["address_space"].mechanism == "RLIMIT_AS"
    assert sandbox.run(program).stdout == b"allocated\n"
