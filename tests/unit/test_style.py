"""The package stays typed, lint-clean, assert-free and exports what it documents."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sandbox

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_public_api_is_exactly_all():
    assert sorted(sandbox.__all__) == sorted(
        ["AppliedLimit", "Bind", "ConfigError", "GroupReport", "HostError", "Report",
         "SandboxError", "Verdict", "run", "run_group"])
    for name in sandbox.__all__:
        assert getattr(sandbox, name).__doc__


def test_package_validates_without_assert():
    for path in (ROOT / "sandbox").glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Assert)], path


@pytest.mark.parametrize("tool", [["ruff", "check", "sandbox", "tests"],
                                  ["mypy", "--strict", "sandbox"]])
def test_tool_is_clean(tool):
    exe = BIN / tool[0]
    if not exe.exists():
        pytest.skip(f"{tool[0]} is not installed in this venv")
    result = subprocess.run([str(exe), *tool[1:]], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
