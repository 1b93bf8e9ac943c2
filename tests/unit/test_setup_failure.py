"""A failed setup reaches the report as data (phase, operation, errno), with its one line."""

import errno
import json
import pickle

import pytest

from sandbox.limits import Limits
from sandbox.report import (
    SCHEMA_VERSION,
    AppliedLimit,
    CgroupHierarchy,
    Report,
    SetupFailure,
    StopReason,
    Verdict,
)
from sandbox.verdict import CANCELLED, Observed, decide

FAILURE = SetupFailure("mount_root", "/tmp/root/box/x", errno.ENOTDIR, "Not a directory")


def observed(**kw):
    fields = dict(limits=Limits(), status=None, setup_error=None, exec_errno=None,
                  killed_for=None, started=False, cpu_time=0.0, wall_time=0.0,
                  oom_killed=False, argv0="true")
    return Observed(**{**fields, **kw})


def report(**kw):
    return Report(verdict=Verdict.SANDBOX_ERROR, exit_code=None, signal=None, cpu_time=0.0,
                  cpu_user=0.0, cpu_system=0.0, wall_time=0.0, memory_peak=None, max_rss=None,
                  pids_peak=None, oom_killed=False, forbidden_syscall=None, profile="strict",
                  profile_hash="sha256:0", cgroup=CgroupHierarchy.NONE,
                  limits={"wall_time": AppliedLimit(1.0, "x")}, **kw)


def test_the_report_json_carries_the_failure_as_an_object():
    data = json.loads(report(error=FAILURE.message(), setup_error=FAILURE).to_json())
    assert data["schema"] == SCHEMA_VERSION == 2
    assert data["setup_error"] == {"phase": "mount_root", "operation": "/tmp/root/box/x",
                                   "errno": 20, "errno_name": "ENOTDIR",
                                   "detail": "Not a directory"}
    assert data["error"] == "box setup failed in phase mount_root: /tmp/root/box/x: Not a directory"


def test_a_report_without_a_setup_failure_has_null():
    assert json.loads(report().to_json())["setup_error"] is None


@pytest.mark.parametrize(("failure", "name", "line"), [
    (SetupFailure("p", "o", errno.EACCES), "EACCES", "box setup failed in phase p: o: "
                                                      "Permission denied"),
    (SetupFailure("child", "KeyError", 0, "'x'"), None, "box setup failed in phase child: "
                                                        "KeyError: 'x'"),
    (SetupFailure("p", "o", 100_000, "odd"), None, "box setup failed in phase p: o: odd"),
])
def test_errno_name_and_line(failure, name, line):
    assert failure.errno_name == name and failure.message() == line


def test_a_failed_setup_decides_sandbox_error_with_the_failure():
    decision = decide(observed(setup_error=FAILURE))
    assert decision.verdict is Verdict.SANDBOX_ERROR
    assert decision.setup_error is FAILURE and decision.error == FAILURE.message()


def test_a_box_that_ended_without_status_after_a_failure_still_carries_it():
    decision = decide(observed(setup_error=FAILURE, started=True))
    assert decision.verdict is Verdict.SANDBOX_ERROR and decision.setup_error is FAILURE


def test_a_cancelled_run_is_no_setup_failure():
    decision = decide(observed(killed_for=StopReason.CANCELLED, started=True, status=0))
    assert decision.verdict is Verdict.SANDBOX_ERROR
    assert decision.error == CANCELLED and decision.setup_error is None


def test_a_program_that_ran_has_no_setup_failure():
    decision = decide(observed(status=0, started=True))
    assert decision.verdict is Verdict.OK and decision.setup_error is None


def test_the_failure_survives_the_helpers_pickle():
    again = pickle.loads(pickle.dumps(report(setup_error=FAILURE)))
    assert again.setup_error == FAILURE
