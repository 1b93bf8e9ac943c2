"""`sandbox.aio` from asyncio: the same reports as `sandbox.run`, many runs from one loop
without a thread each, cancelling a task kills its box, and the same errors."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sandbox
import sandbox.api
from sandbox import ConfigError, Verdict
from sandbox.box import cgroups
from tests.integration import test_cleanup
from tests.integration.test_cleanup import Owned, wait_for

owned = test_cleanup.owned  # the fixture: cgroups of the test's own, and what is in them

EXAMPLE = Path(__file__).resolve().parents[2] / "docs/examples/guess"


def _summary(report: sandbox.Report) -> tuple[object, ...]:
    return (report.verdict, report.exit_code, report.limit_fired, report.stdout, report.stderr,
            report.stdout_truncated)


@pytest.mark.parametrize(("argv", "keywords"), [
    (["sh", "-c", "read x; echo out $x; echo err >&2; exit 3"], {"stdin": b"in\n"}),
    (["sh", "-c", "echo started; sleep 5"], {"wall_time": "300ms"}),
    (["sh", "-c", "yes | head -c 5000"], {"output": "1K"}),
], ids=["exit-code", "wall-time", "output-limit"])
def test_a_run_reports_what_sandbox_run_reports(argv, keywords):
    expected = sandbox.run(argv, **keywords)
    report = asyncio.run(sandbox.aio.run(argv, **keywords))
    assert _summary(report) == _summary(expected)


def test_output_to_a_descriptor_as_in_sandbox_run(tmp_path):
    path = tmp_path / "out"
    with path.open("wb") as f:
        report = asyncio.run(sandbox.aio.run(["echo", "to file"], stdout=f.fileno()))
    assert report.ok and report.stdout is None and report.stderr == b""
    assert path.read_bytes() == b"to file\n"


# 50 runs from one loop, with the most threads the process had while they ran.
CONCURRENT = r"""
import asyncio, json, threading, sandbox
async def main():
    await sandbox.aio.run(["true"])  # the helper is started, its warm boxes built
    before = peak = threading.active_count()
    async def sample():
        nonlocal peak
        while True:
            peak = max(peak, threading.active_count())
            await asyncio.sleep(0.005)
    sampler = asyncio.create_task(sample())
    runs = [sandbox.aio.run(["sh", "-c", f"sleep 0.3; echo {i}"]) for i in range(50)]
    reports = await asyncio.gather(*runs)
    sampler.cancel()
    print(json.dumps([before, peak, [[r.verdict.value, r.stdout.decode()] for r in reports]]))
asyncio.run(main())
"""


def test_50_concurrent_runs_from_one_loop_without_a_thread_each(tmp_path):
    # A $SANDBOX_HOME of its own: 50 boxes at once take 50 id slots, and the files stay (the
    # session's are counted by test_cleanup.py).
    env = {**os.environ, "SANDBOX_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", CONCURRENT], env=env, stdout=subprocess.PIPE,
                         timeout=300, check=True).stdout
    before, peak, reports = json.loads(out)
    assert reports == [["ok", f"{i}\n"] for i in range(50)]
    assert peak == before


def test_a_bad_keyword_is_the_same_config_error_raised_before_anything_is_sent(monkeypatch):
    with pytest.raises(ConfigError) as expected:
        sandbox.run(["true"], walltime="1s")

    def refuse(payload: bytes, fds: list[int]) -> None:
        raise AssertionError("a request was sent")

    monkeypatch.setattr(sandbox.api._helper, "submit", refuse)
    with pytest.raises(ConfigError) as raised:
        asyncio.run(sandbox.aio.run(["true"], walltime="1s"))
    assert str(raised.value) == str(expected.value)
    with pytest.raises(ConfigError, match="binds"):
        asyncio.run(sandbox.aio.run(["true"], binds="./src"))


def test_the_example_group_runs_from_asyncio():
    report = asyncio.run(sandbox.aio.run_group(EXAMPLE / "group.toml"))
    assert {n: r.verdict for n, r in report.reports.items()} == {
        "interactor": Verdict.OK, "solution": Verdict.OK}
    assert report.reports["interactor"].stderr.startswith(b"accepted in ")


# In a Python of the test's own cgroups: one run first (so the helper and its descriptors
# exist), then `sleep 30` in a task (or, given a group file, that group), cancelled when the
# test writes a line; prints how the task ended, how long the cancel took and the descriptors
# it left, then waits for the end of its stdin (so what is checked is what the cancel did, not
# what the caller's exit did).
CANCEL = r"""
import asyncio, json, os, sys, time, sandbox
async def main():
    loop = asyncio.get_running_loop()
    await sandbox.aio.run(["true"])
    fds = len(os.listdir("/proc/self/fd"))
    group = sys.argv[1:]
    run = sandbox.aio.run_group(group[0]) if group else sandbox.aio.run(["sleep", "30"])
    task = asyncio.create_task(run)
    line = asyncio.Event()
    loop.add_reader(0, line.set)
    await line.wait()
    loop.remove_reader(0)
    os.read(0, 100)
    start = time.monotonic()
    task.cancel()
    try:
        await task
        ended = "returned"
    except asyncio.CancelledError:
        ended = "cancelled"
    took = time.monotonic() - start
    print(json.dumps([ended, took, len(os.listdir("/proc/self/fd")) - fds]), flush=True)
    os.read(0, 100)
asyncio.run(main())
"""


def _sleeping(cgroups_of: Owned) -> tuple[str, int] | None:
    """The box cgroup (its name) and pid of the `sleep 30` in the test's cgroups."""
    for procs in (cgroups_of.dirs["pids"] / cgroups.SUBTREE).glob("box-*/cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == b"sleep\x0030\x00":
                return procs.parent.name, int(pid)
    return None


@pytest.mark.parametrize("pool", ["0", "2"])  # a cold box, and a warm box built ahead
def test_cancelling_the_task_kills_its_box_at_once_and_leaves_nothing(owned, pool):
    proc = owned.popen(sys.executable, "-c", CANCEL, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, env={**os.environ, "SANDBOX_POOL": pool})
    try:
        assert wait_for(lambda: _sleeping(owned) is not None, timeout=60)
        found = _sleeping(owned)
        assert found is not None
        box, pid = found
        proc.stdin.write(b"cancel\n")
        proc.stdin.flush()
        ended, took, fds_left = json.loads(proc.stdout.readline())
        assert ended == "cancelled" and took < 1.5, (ended, took)
        assert fds_left == 0
        # Nothing of the box runs once the cancel returns; its cgroups go with its teardown.
        assert not Path(f"/proc/{pid}").exists()
        assert not any(f"{pid}" in p.read_text().split()
                       for p in (owned.dirs["pids"] / cgroups.SUBTREE).glob("*/cgroup.procs"))
        assert wait_for(lambda: not any((d / cgroups.SUBTREE / box).exists()
                                        for d in owned.dirs.values()))
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def test_cancelling_a_group_task_kills_every_box_of_the_group(owned, tmp_path):
    group = tmp_path / "group.toml"
    group.write_text('[[box]]\nname = "a"\ncommand = ["sleep", "30"]\n'
                     '[[box]]\nname = "b"\ncommand = ["sleep", "30"]\n')
    tmp_path.chmod(0o755)

    def sleeping() -> list[int]:
        pids = []
        for procs in (owned.dirs["pids"] / cgroups.SUBTREE).glob("box-*/cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0030\x00":
                        pids.append(int(pid))
        return pids

    proc = owned.popen(sys.executable, "-c", CANCEL, str(group), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
    try:
        assert wait_for(lambda: len(sleeping()) == 2, timeout=60)
        pids = sleeping()
        proc.stdin.write(b"cancel\n")
        proc.stdin.flush()
        ended, took, _ = json.loads(proc.stdout.readline())
        assert ended == "cancelled" and took < 1.5, (ended, took)
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
