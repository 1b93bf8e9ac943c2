"""Shared fixtures: the CLI in this checkout's venv, an isolated state dir, attack programs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SANDBOX = str(BIN / "sandbox")


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test run gets its own SANDBOX_HOME (layers, id locks), removed at the end."""
    home = tmp_path_factory.mktemp("sandbox-home")
    os.environ["SANDBOX_HOME"] = str(home)
    yield home


def run_cli(*args: str, stdin: bytes = b"", timeout: float = 60, **kw: object
            ) -> subprocess.CompletedProcess[bytes]:
    """Run the ``sandbox`` console script of this venv."""
    return subprocess.run([SANDBOX, *args], input=stdin, capture_output=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def gcc() -> str:
    path = shutil.which("gcc")
    if path is None:
        pytest.skip("gcc is not installed: cannot build the C test programs")
    return path


@pytest.fixture(scope="session")
def cprog(gcc: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Compile ``tests/programs/NAME.c`` once; returns a function NAME -> directory with it."""
    out = tmp_path_factory.mktemp("programs")
    os.chmod(out, 0o755)
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            subprocess.run([gcc, "-O1", "-pthread", "-o", str(out / name),
                            str(ROOT / "tests/programs" / f"{name}.c")], check=True)
            built[name] = out / name
        return out

    return build
