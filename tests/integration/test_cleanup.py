"""Nothing outlives a run: cgroups, processes, state files, even after kill -9.

Each test runs its workload in cgroups of its own (created here, below this process's cgroup),
so the sandbox puts that workload's boxes in ``<those cgroups>/sandbox/box-*`` and every process
the workload ever starts, orphans included, stays in that subtree. What is compared is only
that subtree and this session's ``$SANDBOX_HOME``: other sandboxes and processes on the host
cannot make these tests fail, and a leak of ours cannot hide among theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import helper
from sandbox.box import cgroups
from tests.conftest import SANDBOX

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the tests make cgroups of their own")

# Moves itself into the cgroups named before "--", then becomes the command after it.
ENTER = ("import os, sys\ni = sys.argv.index('--')\nfor procs in sys.argv[1:i]:\n"
         " with open(procs, 'w') as f: f.write('0')\nos.execvp(sys.argv[i + 1], sys.argv[i + 1:])")


class Owned:
    """Cgroups of one test (one directory per v1 controller the sandbox uses)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def popen(self, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        procs = [str(d / "cgroup.procs") for d in self.dirs.values()]
        return subprocess.Popen([sys.executable, "-c", ENTER, *procs, "--", *argv],
                                **kw)  # type: ignore[call-overload]

    def python(self, code: str, timeout: float = 600) -> object:
        """Run ``code`` in a Python of these cgroups; returns what it printed, as JSON."""
        proc = self.popen(sys.executable, "-c", code, stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0
        return json.loads(out)

    def boxes(self) -> list[Path]:
        """The box cgroups the sandbox made below these cgroups."""
        return sorted(p for d in self.dirs.values() for p in (d / cgroups.SUBTREE).glob("box-*"))

    def processes(self, boxes_only: bool = False) -> list[int]:
        """Every process in these cgroups (or only in their boxes), orphans included."""
        top = self.dirs["pids"]
        files = (top / cgroups.SUBTREE).glob("box-*/cgroup.procs") if boxes_only else \
            top.rglob("cgroup.procs")
        return sorted(int(pid) for f in files for pid in f.read_text().split())


@pytest.fixture
def owned(tmp_path: Path) -> Iterator[Owned]:
    backend = cgroups.backend()
    if not isinstance(backend, cgroups.CgroupV1):
        pytest.skip(f"these tests make cgroup v1 groups of their own; the backend is {backend}")
    mounts, _ = cgroups.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    own = cgroups.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    name = f"sandbox-leaktest-{os.getpid()}-{tmp_path.name}"
    dirs = {c: mounts[c] / own[c].lstrip("/") / name for c in cgroups.CgroupV1.CONTROLLERS}
    for d in dirs.values():
        d.mkdir()
    owned = Owned(dirs)
    try:
        yield owned
    finally:  # only what is in our own cgroups is ours to kill
        for pid in owned.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: owned.processes() == [])
        for d in dirs.values():
            for sub in sorted(d.rglob("*/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()


def state(*, slots: bool = True) -> set[str]:
    """This session's $SANDBOX_HOME: every path, except inside layers (named, not walked)."""
    home = Path(os.environ["SANDBOX_HOME"])
    found = set()
    for top in home.iterdir():
        if top.name == "ids" and not slots:
            continue
        found.add(top.name)
        if top.name != "layers" and top.is_dir():
            found.update(str(p.relative_to(home)) for p in top.rglob("*"))
    return found


def wait_for(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def test_1000_runs_in_a_row_leave_nothing_behind(owned):
    owned.python("import sandbox; sandbox.run(['true']); print(1)")  # base layer, id slot 0
    before = state(slots=False)
    verdicts = owned.python(
        "import json, sandbox\nverdicts = set()\nfor i in range(1000):\n"
        " cmd = ['sh', '-c', 'sleep 10 & echo $$'] if i % 2 else ['true']\n"
        " verdicts.add(sandbox.run(cmd, wall_time='2s').verdict.value)\n"
        "print(json.dumps(sorted(verdicts)))")
    assert verdicts == ["ok"]
    assert wait_for(lambda: (owned.boxes(), owned.processes()) == ([], []))
    assert state(slots=False) == before
    # One run at a time, plus the warm boxes built ahead and the used ones still being torn
    # down: their slot files are reused, so there are as many as boxes ever existed at once
    # (about a dozen here), not one per run.
    slots = [p for p in state() if p.startswith("ids/")]
    assert 1 <= len(slots) <= 4 * helper.MAX_WARM, slots


def test_a_daemonized_orphan_dies_with_the_run(owned):
    started = owned.python(
        "import json, sandbox\nr = sandbox.run(['sh', '-c', 'setsid sh -c \"sleep 60\" "
        "</dev/null >/dev/null 2>&1 & echo started'])\nprint(json.dumps(r.stdout.decode()))")
    assert started == "started\n"
    assert wait_for(lambda: owned.processes() == [])


def test_orphans_survive_without_the_sandbox_so_the_test_above_can_fail(owned):
    owned.popen("sh", "-c", "setsid sleep 61 </dev/null >/dev/null 2>&1 &").wait()
    assert wait_for(lambda: any(Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x0061\x00"
                                for p in owned.processes()))
    # the fixture kills it, by its pid in our cgroups


def test_50_concurrent_cli_runs_do_not_collide_and_leave_nothing_behind(owned):
    owned.popen(SANDBOX, "exec", "--", "true").wait()
    before = state(slots=False)  # 50 at once take 50 id slots, reused by later runs
    procs = [owned.popen(SANDBOX, "exec", "--", "sh", "-c", f"echo {i}; id -u",
                         stdout=subprocess.PIPE) for i in range(50)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 50
    assert sorted(int(o.split()[0]) for o in outputs) == list(range(50))
    assert len({o.split()[1] for o in outputs}) == 1  # the same uid inside, mapped apart
    assert wait_for(lambda: (owned.boxes(), owned.processes()) == ([], []))
    assert state(slots=False) == before


def test_kill_9_of_the_supervisor_leaves_no_process_and_the_next_start_cleans_cgroups(owned):
    proc = owned.popen(SANDBOX, "exec", "--", "sh", "-c", "sleep 100 & sleep 100")
    assert wait_for(lambda: len(owned.processes(boxes_only=True)) >= 3)  # sh and two sleeps
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: owned.processes() == [])
    # The dead supervisor's cgroup is left; the next supervisor removes it.
    assert owned.boxes() != []
    owned.popen(SANDBOX, "exec", "--", "true").wait()
    assert owned.boxes() == []
