"""Warm boxes in the library's helper: a box built ahead serves one run, a run finds nothing
an earlier run of the same shape left, and the pool can be switched off."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import sandbox
import sandbox.api
from sandbox import Verdict

EVERYTHING = {
    "file /tmp/leftover",
    "file /box/leftover",
    "file /dev/shm/leftover",
    "sysv shm",
    "sysv msg",
    "posix mqueue",
    "abstract socket",
    "environment",
}


def _warm_children() -> set[int]:
    """The helper's forked processes: warm boxes waiting, or runs in progress."""
    pid = sandbox.api._helper.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def leftovers(cprog, tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(cprog("leftovers") / "leftovers", directory / "leftovers")
    os.chmod(tmp_path, 0o755)
    return [(str(directory), "/box/bin")]


def test_the_check_sees_every_leftover_inside_one_run(leftovers):
    """Control: what `leftovers make` leaves is all visible to a check in the same box."""
    report = sandbox.run(
        ["sh", "-c", "/box/bin/leftovers make && /box/bin/leftovers check"],
        binds=leftovers,
        env={"LEFTOVER": "1"},
        pids=32,
    )
    assert set(report.stdout.decode().splitlines()) == EVERYTHING


def test_a_run_finds_nothing_an_earlier_run_of_its_shape_left(leftovers):
    """Run A leaves files in /tmp, /box and /dev/shm, SysV and POSIX IPC objects, a listening
    abstract socket held by a background process, an environment variable and a busy cgroup;
    run B of the same shape (served by a warm box) sees none of it and starts its counters
    from zero."""
    a = sandbox.run(
        ["sh", "-c", "/box/bin/leftovers make; head -c 50000000 /dev/zero | tail -c 1 >/dev/null"],
        binds=leftovers,
        env={"LEFTOVER": "1"},
        pids=32,
    )
    assert a.verdict is Verdict.OK, a
    b = sandbox.run(["/box/bin/leftovers", "check"], binds=leftovers, pids=32)
    assert b.verdict is Verdict.OK, b
    assert b.stdout == b""
    assert b.pids_peak in (None, 1)
    assert b.memory_peak is not None and a.memory_peak is not None
    assert b.memory_peak < a.memory_peak
    assert b.cpu_time < a.cpu_time


def test_a_warm_box_serves_the_next_run_of_its_shape_and_is_replaced():
    """After a run, boxes of its shape wait in the helper; the next run takes one (its
    process ends) and the pool is filled again."""
    sandbox.run(["/bin/true"], wall_time="9s")
    assert _wait_for(lambda: len(_warm_children()) >= 1)
    before = _warm_children()
    report = sandbox.run(["/bin/echo", "warm"], wall_time="9s")
    assert report.stdout == b"warm\n"
    assert _wait_for(lambda: not before <= _warm_children())  # one was used up
    assert report.setup_time < 1.0


def test_a_bind_source_replaced_after_the_box_was_built_is_seen_as_it_is_now(tmp_path):
    """A warm box holds the directory a path named when it was built (a bind deeper than the
    work dir is built into the box); if the path names another directory by the time of the
    run, the run gets the new one (a cold box)."""
    os.chmod(tmp_path, 0o755)
    data = tmp_path / "data"
    data.mkdir()
    (data / "x").write_text("old\n")
    binds = [(str(data), "/box/deep/in")]
    assert sandbox.run(["cat", "/box/deep/in/x"], binds=binds).stdout == b"old\n"
    time.sleep(0.5)  # the pool has built boxes of this shape with the old directory
    data.rename(tmp_path / "old")
    data.mkdir()
    (data / "x").write_text("new\n")
    assert sandbox.run(["cat", "/box/deep/in/x"], binds=binds).stdout == b"new\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="binds arrive at a warm box as detached trees")
def test_a_bind_in_the_work_dir_differs_per_run_and_still_finds_a_warm_box(tmp_path):
    """A judge binds each submission's directory at /box/src: the box is built without it and
    the runner attaches it, read-only unless asked; every run sees its own directory."""
    os.chmod(tmp_path, 0o755)
    sources = []
    for i in range(3):
        directory = tmp_path / f"submission{i}"
        directory.mkdir()
        (directory / "id").write_text(f"{i}\n")
        directory.chmod(0o777)  # writable for the box's uid: only the bind's flag may refuse
        sources.append(directory)
    script = "cat /box/src/id; touch /box/src/new 2>/dev/null && echo wrote || echo read-only"
    sandbox.run(["true"], binds=[(str(sources[0]), "/box/src")])
    assert _wait_for(lambda: len(_warm_children()) >= 1)
    for i, directory in enumerate(sources):
        before = _warm_children()
        report = sandbox.run(["sh", "-c", script], binds=[(str(directory), "/box/src")])
        assert report.stdout == f"{i}\nread-only\n".encode(), report
        assert _wait_for(lambda: not before <= _warm_children())  # a warm box served it
    report = sandbox.run(["sh", "-c", script], binds=[(str(sources[0]), "/box/src", True)])
    assert report.stdout == b"0\nwrote\n"
    assert (sources[0] / "new").exists() and not (sources[1] / "new").exists()


def test_pool_size_zero_keeps_no_box_ahead():
    """With SANDBOX_POOL=0 the helper builds a box only when a run asks for it."""
    script = (
        "import sandbox, sandbox.api, time\n"
        "sandbox.run(['/bin/true'])\n"
        "time.sleep(1)\n"
        "pid = sandbox.api._helper.process.pid\n"
        "print(open(f'/proc/{pid}/task/{pid}/children').read().split())\n"
    )
    env = {**os.environ, "SANDBOX_POOL": "0"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stderr
    env["SANDBOX_POOL"] = "2"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert len(eval(out.stdout)) == 2, out.stderr  # control: the default keeps two


POLICY = ["python3", "-c", "import os; print(os.sched_getscheduler(0))"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can raise a box back from SCHED_IDLE")
def test_boxes_are_built_ahead_at_idle_priority_and_their_program_runs_at_normal():
    """A warm box waits at SCHED_IDLE (it only gets CPU no program wants); its program runs
    at the normal policy, as a cold box's does."""
    first = sandbox.run(POLICY)
    assert first.verdict is Verdict.OK and first.stdout.strip() == str(os.SCHED_OTHER).encode()
    assert _wait_for(lambda: len(_warm_children()) >= 2)
    assert _wait_for(lambda: all(
        os.sched_getscheduler(pid) == os.SCHED_IDLE for pid in _warm_children()))
    second = sandbox.run(POLICY)
    assert second.verdict is Verdict.OK
    assert second.stdout.strip() == str(os.SCHED_OTHER).encode()  # raised with its box


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can raise a box back from SCHED_IDLE")
def test_a_box_taken_while_still_building_is_raised_at_once():
    """The helper raises a warm box when it hands it a run, not only once it is ready: held
    stopped, the box taken is back at the normal policy before it runs another instruction."""
    sandbox.run(["/bin/true"])
    assert _wait_for(lambda: len(_warm_children()) >= 2)
    held = _warm_children()
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    result = {}
    runner = threading.Thread(target=lambda: result.update(report=sandbox.run(["/bin/true"])))
    try:
        runner.start()
        assert _wait_for(lambda: any(
            os.sched_getscheduler(pid) == os.SCHED_OTHER for pid in held if _alive(pid)))
    finally:
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        runner.join(30)
    assert result["report"].verdict is Verdict.OK


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can raise a box back from SCHED_IDLE")
def test_no_more_than_a_few_boxes_tear_down_at_idle_priority_at_once():
    """Teardowns wait for idle CPU only while few do: past the bound every one is raised, so
    a busy host cannot make them pile up."""
    from sandbox import helper, sched

    ours, theirs = socket.socketpair()
    pool = helper._Pool(ours)
    children = []
    try:
        for _ in range(helper.MAX_IDLE_TEARDOWNS + 1):
            pid = os.fork()
            if pid == 0:
                sched.background()
                time.sleep(30)
                os._exit(0)
            children.append(pid)
        assert _wait_for(lambda: all(os.sched_getscheduler(p) == os.SCHED_IDLE for p in children))
        for n, pid in enumerate(children):
            pool.started(helper._Warm(pid, theirs, b""))
            idle = [os.sched_getscheduler(p) == os.SCHED_IDLE for p in children]
            assert all(idle) if n < helper.MAX_IDLE_TEARDOWNS else not any(idle)
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        for _, pidfd in pool.serving:
            os.close(pidfd)
        ours.close()
        theirs.close()
