"""The library emits one event per run without ever printing on its own."""

import logging
import subprocess
import sys

CODE = """
import logging, sys
import sandbox
if sys.argv[1] == "stdlib":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
report = sandbox.run(["true"])
print("verdict", report.verdict.value)
"""


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True,
                          timeout=60, check=True)


def test_an_application_that_configured_nothing_sees_nothing():
    result = run("none")
    assert result.stdout == "verdict ok\n"
    assert "box_finished" not in result.stderr


def test_stdlib_logging_gets_the_event():
    result = run("stdlib")
    assert result.stdout == "verdict ok\n"
    assert "sandbox box_finished verdict=ok" in result.stderr


def test_the_event_carries_its_fields(caplog):
    import sandbox

    with caplog.at_level(logging.INFO, logger="sandbox"):
        sandbox.run(["true"])
    events = [r.sandbox_event for r in caplog.records if hasattr(r, "sandbox_event")]
    assert events and events[-1]["verdict"] == "ok" and events[-1]["profile"] == "strict"
