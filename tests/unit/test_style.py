"""The package stays typed, lint-clean, assert-free and exports what it documents."""

import ast
import re
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
         "SandboxError", "SetupFailure", "StopReason", "Verdict", "Workspace", "aio", "run",
         "run_group"])
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


def test_design_citations_name_sections_of_the_architecture_doc():
    """The code cites the project's own docs/architecture.md by section, and each section exists."""
    lines = (ROOT / "docs/architecture.md").read_text().splitlines()
    headings = {line[3:].strip() for line in lines if line.startswith("## ")}
    cited = set()
    for path in [*(ROOT / "sandbox").rglob("*.py"), *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        assert "DESIGN.md" not in text, path
        for match in re.finditer(r'docs/architecture\.md,\s+((?:"[^"]+"(?:\s+and\s+)?)+)', text):
            cited |= set(re.findall(r'"([^"]+)"', match.group(1)))
    assert cited and cited <= headings, cited - headings
