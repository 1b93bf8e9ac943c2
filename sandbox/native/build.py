"""Compile the native box init with the system C compiler (used by setup.py and the tests).

Kept free of imports from the package, so ``setup.py`` can load it by path before the package
is installed. The binary is static: it is executed inside a box whose root may hold no C
library at all (an image of one program), and the dynamic loader would be looked up there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("boxinit.c", "parse.c")
HEADERS = ("kernel.h", "parse.h")
#: Warnings are errors: this code runs with every privilege the box has.
FLAGS = ("-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2")


def compiler() -> str:
    """The C compiler: $CC, else cc or gcc from PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (install gcc, or set CC)")


def build(out: Path, *, record: bool = False, sanitize: bool = False) -> Path:
    """Build boxinit at ``out`` (the recording or sanitized variants for tests)."""
    cmd = [compiler(), *FLAGS, "-I", str(HERE)]
    if record:
        cmd += ["-DBOXINIT_RECORD"]
    if sanitize:
        cmd += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    else:
        cmd += ["-static"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        subprocess.run(
            [*cmd, "-o", str(target), *(str(HERE / s) for s in SOURCES)],
            check=True,
        )
        os.chmod(target, 0o755)  # noqa: S103 - a program every box uid must be able to run
        os.replace(target, out)  # never a half-written binary under the final name
    return out


def build_parser_harness(out: Path) -> Path:
    """A sanitized program that runs ``parse_run`` on each length-prefixed input read from
    its stdin (the fuzz target's and the corpus test's)."""
    harness = HERE / "fuzz_parse.c"
    cmd = [compiler(), *FLAGS, "-I", str(HERE), "-fsanitize=address,undefined", "-g"]
    subprocess.run([*cmd, "-o", str(out), str(harness), str(HERE / "parse.c")], check=True)
    return out


if __name__ == "__main__":
    build(Path(sys.argv[1]))
