"""Groups: the interactive example, each failure mode's verdicts, and bad group files."""

import json
from pathlib import Path

import pytest

import sandbox
from sandbox import Verdict
from tests.conftest import ROOT, run_cli

EXAMPLE = ROOT / "docs/examples/guess"


def group(tmp_path: Path, solution: str, *, grace: str = "1s", wall: str = "2s") -> Path:
    """The example's group with another solution program."""
    (tmp_path / "solution.py").write_text(solution)
    (tmp_path / "interactor.py").write_text((EXAMPLE / "interactor.py").read_text())
    text = (EXAMPLE / "group.toml").read_text()
    text = text.replace('peer_grace = "1s"', f'peer_grace = "{grace}"')
    text = text.replace('limits = { wall_time = "2s"', f'limits = {{ wall_time = "{wall}"')
    (tmp_path / "group.toml").write_text(text)
    tmp_path.chmod(0o755)
    return tmp_path / "group.toml"


def test_the_interactive_example_is_accepted(tmp_path):
    report_file = tmp_path / "report.json"
    result = run_cli("group", "run", str(EXAMPLE / "group.toml"), "--report", str(report_file))
    assert result.returncode == 0, result.stderr
    data = json.loads(report_file.read_text())
    assert {n: b["verdict"] for n, b in data["boxes"].items()} == {
        "interactor": "ok", "solution": "ok"}
    assert data["boxes"]["interactor"]["stderr_text"].startswith("accepted in ")
    assert data["first_ended"] in ("interactor", "solution")
    # Each box's stdout is piped straight to the other: only its stderr is counted here.
    for box in data["boxes"].values():
        assert box["limits"]["output"]["mechanism"] == "supervisor pipe count (stderr)"


def test_a_crashing_solution_keeps_the_interactors_verdict(tmp_path):
    report = sandbox.run_group(group(tmp_path, "raise SystemExit(3)\n"))
    assert report.reports["solution"].verdict is Verdict.RUNTIME_ERROR
    interactor = report.reports["interactor"]
    assert interactor.exit_code == 1 and interactor.stderr.startswith(b"wrong answer")
    assert report.first_ended == "solution" and not report.ok


def test_a_solution_that_never_answers_gets_its_own_time_limit(tmp_path):
    report = sandbox.run_group(group(tmp_path, "import time\ntime.sleep(60)\n", wall="0.5s"))
    solution = report.reports["solution"]
    assert solution.verdict is Verdict.WALL_TIME_LIMIT and solution.limit_fired == "wall_time"
    assert report.first_ended == "solution"
    assert report.reports["interactor"].stderr.startswith(b"wrong answer")


def test_a_box_that_hangs_after_its_peer_ended_is_stopped(tmp_path):
    # The solution guesses right, then ignores everything and sleeps.
    code = "print(737, flush=True)\nimport time\ntime.sleep(60)\n"
    report = sandbox.run_group(group(tmp_path, code, grace="0.3s", wall="10s"))
    assert report.first_ended == "interactor" and report.reports["interactor"].ok
    solution = report.reports["solution"]
    assert solution.verdict is Verdict.WALL_TIME_LIMIT and solution.limit_fired == "peer_exited"
    assert solution.wall_time < 2


def test_a_flooding_solution_does_not_block_anyone(tmp_path):
    code = "import sys\nwhile True:\n    sys.stdout.write('1\\n' * 4096)\n"
    report = sandbox.run_group(group(tmp_path, code, wall="1s"))
    assert report.reports["interactor"].verdict is Verdict.RUNTIME_ERROR  # wrong answer
    assert report.reports["solution"].verdict in (Verdict.WALL_TIME_LIMIT, Verdict.SIGNALED,
                                                 Verdict.RUNTIME_ERROR)


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("", "box", "[[box]]"),
    ('[[box]]\nname = "A"\ncommand = ["true"]\n', "box[0].name", "lower-case"),
    ('[[box]]\nname = "a"\n', "box 'a'.command", "non-empty array"),
    ('[[box]]\nname = "a"\ncommand = ["true"]\nstdin = "b"\n', "box 'a'.stdin", "another box"),
    ('[[box]]\nname = "a"\ncommand = ["true"]\ncolour = 1\n', "box 'a'.colour", "unknown key"),
    ('[[box]]\nname = "a"\ncommand = ["true"]\n[[box]]\nname = "a"\ncommand = ["true"]\n',
     "box 'a'.name", "two boxes"),
    ('network = "internet"\n[[box]]\nname = "a"\ncommand = ["true"]\n', "network", "'linked'"),
    ('network = "linked"\n[[box]]\nname = "a"\ncommand = ["true"]\n', "box 'a'.profile",
     "linked"),
    ('[[box]]\nname = "a"\ncommand = ["true"]\nlimits = { memory = "x" }\n',
     "box 'a': request: memory", "size"),
])
def test_bad_group_files_name_the_file_the_box_and_the_key(tmp_path, text, key, problem):
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(sandbox.ConfigError) as info:
        sandbox.run_group(path)
    assert info.value.source == str(path) and info.value.key == key
    assert problem in info.value.problem
    cli = run_cli("group", "check", str(path))
    assert cli.returncode == 125 and key.encode() in cli.stderr


def test_a_linked_profile_alone_is_refused():
    with pytest.raises(sandbox.ConfigError, match="linked group"):
        sandbox.run(["true"], profile="linked")
