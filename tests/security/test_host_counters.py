"""A box's per-user kernel counters are its own: exhausting them leaves root and other boxes alone.

The kernel charges pending signals, POSIX message-queue bytes and inotify instances up the chain
of user namespaces to the uid that created each one. A box exhausts each counter for real and
holds it while root (on the host) and a second box each take one more.
"""

import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.box.userns import COUNTER_RLIMITS, COUNTER_SYSCTLS, ID_BASE
from tests.conftest import SANDBOX

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs boxes as root")
KINDS = ("sigpending", "inotify", "mqueue")
BOUNDS = {"sigpending": COUNTER_RLIMITS[0][1], "inotify": dict(COUNTER_SYSCTLS)[
    "max_inotify_instances"], "mqueue": COUNTER_RLIMITS[1][1] // (10 * 8192)}
OTHER_UID = 65533  # a uid of this host with nothing of its own running


@pytest.fixture(scope="module")
def counters(cprog) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """The counters program in a directory every uid can reach."""
    top = Path(tempfile.mkdtemp(prefix="sandbox-counters-", dir="/tmp"))
    os.chmod(top, 0o755)
    shutil.copy(cprog("counters") / "counters", top / "counters")
    os.chmod(top / "counters", 0o755)
    # More descriptors than any counter's bound, so the counter is what runs out.
    (top / "many-files.toml").write_text('extends = "strict"\n[limits]\nopen_files = 1000\n')
    yield top
    shutil.rmtree(top)


def box(counters: Path, *args: str) -> list[str]:
    return [SANDBOX, "exec", "--profile", str(counters / "many-files.toml"),
            "--ro-bind", f"{counters}:/box/p", "--", "/box/p/counters", *args]


def host(counters: Path, *args: str, uid: int | None = None) -> str:
    prefix = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                     "--clear-groups"]
    out = subprocess.run([*prefix, str(counters / "counters"), *args], capture_output=True,
                         timeout=30, check=True)
    return out.stdout.decode().strip()


NS_GET_OWNER_UID = 0xB704  # ioctl_ns(2): the uid that created a user namespace


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children] + [d for c in children for d in descendants(int(c))]


def creator_of_namespace(pid: int) -> int:
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    try:
        return struct.unpack("I", fcntl.ioctl(fd, NS_GET_OWNER_UID, b"\0" * 4))[0]
    finally:
        os.close(fd)


def held(process: subprocess.Popen[bytes]) -> int:
    assert process.stdout is not None
    line = process.stdout.readline().decode().split()
    assert line[:1] == ["held"], line
    return int(line[1])


@pytest.mark.parametrize("kind", KINDS)
def test_a_box_exhausting_a_counter_leaves_root_and_another_box_unaffected(counters, kind):
    holder = subprocess.Popen(box(counters, kind, "hold", "4"), stdout=subprocess.PIPE)
    try:
        taken = held(holder)
        program = [p for p in descendants(holder.pid)
                   if Path(f"/proc/{p}/comm").read_text().strip() == "counters"]
        assert len(program) == 1
        assert creator_of_namespace(program[0]) >= ID_BASE  # the box's own host uid made it
        assert 0 < taken <= BOUNDS[kind]  # bounded per box ...
        assert host(counters, kind, "probe") == "ok"  # ... charged to the box, not to root
        other = subprocess.run(box(counters, kind, "probe"), capture_output=True, timeout=30)
        assert other.stdout.strip() == b"ok"  # and not to the next box either
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("kind", KINDS)
def test_control_a_user_namespace_charges_its_creator(counters, kind):
    """Without the fix the box's namespace was created by root: holding counters inside a
    namespace that uid OTHER_UID created exhausts OTHER_UID's own counter on the host."""
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs unshare and setpriv from util-linux")
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
         "unshare", "--user", "--map-root-user", "--ipc", str(counters / "counters"), kind,
         "hold", "4"], stdout=subprocess.PIPE)
    try:
        held(holder)
        assert host(counters, kind, "probe", uid=OTHER_UID) != "ok"
    finally:
        holder.kill()
        holder.wait()
