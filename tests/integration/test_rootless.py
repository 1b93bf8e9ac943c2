"""Rootless use: the same CLI as an unprivileged user (uid 65534) via setpriv."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOBODY = 65534


def _reachable_by_nobody(path: Path) -> bool:
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if not mode & 0o001:
            return False
    return True


@pytest.fixture
def as_nobody():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to become an unprivileged user")
    python = Path("/usr/bin/python3")
    site = Path(sysconfig.get_paths()["purelib"])
    if sys.version_info[:2] != (3, 11) or not python.exists():
        pytest.skip("rootless test reuses this venv's packages with the system python3.11")
    for needed in (ROOT, site):
        if not _reachable_by_nobody(needed):
            pytest.skip(f"{needed} is not reachable by uid {NOBODY}")
    top = Path(tempfile.mkdtemp(prefix="sandbox-rootless-", dir="/tmp"))
    os.chmod(top, 0o755)
    home = top / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    profile = home / "rootless.toml"
    profile.write_text('extends = "strict"\n[limits]\nfallback = "rlimit"\n')

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SANDBOX_HOME": str(home / "state"),
               "PYTHONPATH": f"{ROOT}:{site}"}
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             str(python), "-m", "sandbox", *args], env=env, capture_output=True, timeout=60)

    yield run, profile
    shutil.rmtree(top)


def test_strict_fails_closed_without_cgroups(as_nobody):
    run, _ = as_nobody
    result = run("exec", "--profile", "strict", "--", "true")
    assert result.returncode == 125
    assert b"cannot enforce the memory and pids limits" in result.stderr


def test_rootless_box_with_explicit_fallback(as_nobody):
    run, profile = as_nobody
    result = run("exec", "--profile", str(profile), "--", "sh", "-c",
                 "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
                 "python3 -c 'print(6*7)'; touch /x /usr/x 2>&1 | grep -c 'Read-only file system'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\n")[:5] == [b"1000", b"CapEff:\t0000000000000000",
                                                b"NoNewPrivs:\t1", b"Seccomp:\t2", b"42"]
    assert result.stdout.endswith(b"42\n2\n")  # the root and the host's /usr, both read-only


def test_rootless_forbidden_syscall_and_wall_limit(as_nobody):
    run, profile = as_nobody
    forbidden = run("exec", "--profile", str(profile), "--", "python3", "-c",
                    "import ctypes; ctypes.CDLL(None).unshare(0x10000000)")
    assert forbidden.returncode == 128 + 31
    slow = run("exec", "--profile", str(profile), "--wall-time", "0.3", "--", "sleep", "5")
    assert slow.returncode == 137


def test_rootless_image_build_and_run(as_nobody):
    """Layers unpacked without root (whiteouts as 0/0 devices, opaque dirs as user xattrs),
    a RUN step in a rootless box, and a run on the result."""
    run, profile = as_nobody
    home = profile.parent
    build_profile = home / "rootless-build.toml"
    build_profile.write_text('extends = "build"\n[limits]\nfallback = "rlimit"\n')
    context = home / "ctx"
    context.mkdir()
    (context / "f").write_text("copied\n")
    (context / "Sandboxfile").write_text(
        "FROM scratch\nBUNDLE /bin/sh /usr/bin/cat /usr/bin/rm /usr/bin/mkdir\nCOPY f /data/f\n"
        "RUN mkdir /made && echo by-run > /made/x && rm /usr/bin/rm\n"
        'CMD ["/bin/sh", "-c", "cat /data/f /made/x; test -e /usr/bin/rm || echo no-rm"]\n')
    os.chown(context, NOBODY, NOBODY)
    built = run("image", "build", "--run-profile", str(build_profile), "-t", "rootless/img",
                str(context))
    assert built.returncode == 0, built.stderr
    result = run("exec", "--profile", str(profile), "--image", "rootless/img")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"copied\nby-run\nno-rm\n"
    layers = list((home / "state" / "images" / "layers").iterdir())
    assert layers and all(p.stat().st_uid == NOBODY for p in layers)
