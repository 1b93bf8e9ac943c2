"""repeat=N (judge0's number_of_runs): N fresh boxes, median figures, the first failure wins."""

import json
import os
import statistics

import pytest

import sandbox
from sandbox import Verdict
from tests.conftest import run_cli

FRESH = "test -e /tmp/mark && echo seen; touch /tmp/mark; cat; echo run"


def test_each_run_is_a_fresh_box_reading_the_same_input():
    r, w = os.pipe()
    os.write(w, b"in\n")
    os.close(w)
    try:
        report = sandbox.run(["sh", "-c", FRESH], stdin=r, repeat=3)
    finally:
        os.close(r)
    assert len(report.runs) == 3 and report.ok
    assert [run.stdout for run in report.runs] == [b"in\nrun\n"] * 3  # nothing crossed runs
    assert report.cpu_time == round(statistics.median(run.cpu_time for run in report.runs), 6)
    assert report.wall_time == round(statistics.median(run.wall_time for run in report.runs), 6)
    assert sandbox.run(["true"]).runs == ()  # a single run is its own report


def test_the_first_failed_run_gives_the_outcome(tmp_path):
    (tmp_path / "n").write_text("0")
    os.chmod(tmp_path, 0o777)
    os.chmod(tmp_path / "n", 0o666)
    script = "n=$(cat /data/n); echo $((n+1)) > /data/n; echo run $n; [ $n -ne 1 ]"
    report = sandbox.run(["sh", "-c", script], binds=[(str(tmp_path), "/data", True)], repeat=3)
    assert [run.verdict for run in report.runs] == [
        Verdict.OK, Verdict.RUNTIME_ERROR, Verdict.OK]
    assert report.verdict is Verdict.RUNTIME_ERROR and report.exit_code == 1
    assert report.stdout == b"run 1\n"  # the failed run's own output


@pytest.mark.parametrize("value", [0, 101, "x", True, 2.5])
def test_a_bad_repeat_is_a_config_error(value):
    with pytest.raises(sandbox.ConfigError, match="number of runs"):
        sandbox.run(["true"], repeat=value)


def test_the_cli_repeats_and_reports_every_run(tmp_path):
    report = tmp_path / "r.json"
    meta = tmp_path / "meta"
    result = run_cli("exec", "--repeat", "3", "--report", str(report), "--meta", str(meta),
                     "--", "sh", "-c", FRESH, stdin=b"in\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"in\nrun\n"  # the first run's output passes through
    data = json.loads(report.read_text())
    assert len(data["runs"]) == 3 and all(r["stdout_bytes"] == 7 for r in data["runs"])
    cpu = statistics.median(r["cpu_time"] for r in data["runs"])
    assert data["cpu_time"] == round(cpu, 6)
    assert meta.read_text().startswith(f"time:{data['cpu_time']:.3f}\n")
    bad = run_cli("exec", "--repeat", "0", "--", "true")
    assert bad.returncode == 125 and b"--repeat: expected a number of runs" in bad.stderr


def test_asyncio_callers_repeat_too():
    import asyncio

    report = asyncio.run(sandbox.aio.run(["sh", "-c", FRESH], stdin=b"x\n", repeat=2))
    assert [run.stdout for run in report.runs] == [b"x\nrun\n"] * 2 and report.ok
