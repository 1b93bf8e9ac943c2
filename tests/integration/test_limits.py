"""Limits that make the box safe at all: wall, CPU, memory, pids; and what the report says."""

import sandbox
from sandbox import Verdict

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


def test_fork_bomb_is_contained_by_pids():
    report = sandbox.run(["sh", "-c", "b() { b | b & }; b; sleep 1; echo survived"], pids=8,
                         wall_time="3s")
    assert report.verdict in (Verdict.OK, Verdict.RUNTIME_ERROR, Verdict.WALL_TIME_LIMIT)
    assert report.wall_time < 3.5


def test_file_size_limit_stops_a_big_write():
    report = sandbox.run(["sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1k count=4096"],
                         fsize="1M", tmp_size="16M")
    assert report.signal == 25 or report.exit_code != 0  # SIGXFSZ, or dd's own error


def test_no_core_dumps():
    report = sandbox.run(["sh", "-c", "ulimit -c"])
    assert report.stdout == b"0\n"


def test_report_names_the_mechanism_of_every_limit():
    report = sandbox.run(["true"])
    assert report.limits["wall_time"].mechanism == "supervisor deadline"
    assert report.limits["memory"].mechanism.startswith(report.cgroup)
    assert report.limits["core"].value == 0
    assert report.setup_time > 0 and report.profile_hash.startswith("sha256:")
