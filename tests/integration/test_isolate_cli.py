"""`sandbox isolate`: isolate 2.x's command line as CMS and judge0 drive it, compared with the
real isolate where it is built, and the host-side attacks a program in the box can try on the
files it leaves in box/ between runs."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

REAL_ISOLATE = "/work/scratch/isolate/bin/isolate"
SUM_C = b"""#include <stdio.h>
int main(void) { long a, b; if (scanf("%ld %ld", &a, &b) != 2) return 3;
printf("%ld\\n", a + b); return 0; }
"""


def isolate(*args: str, timeout: float = 60, stdin: bytes = b""
            ) -> subprocess.CompletedProcess[bytes]:
    return run_cli("isolate", *args, timeout=timeout, stdin=stdin)


def meta(path: Path) -> dict[str, str]:
    return dict(line.split(":", 1) for line in path.read_text().splitlines())


@pytest.fixture
def box():  # type: ignore[no-untyped-def]
    """An initialized box id; its box/ directory; cleaned up at the end."""
    number = str(100 + os.getpid() % 800)
    result = isolate("-b", number, "--init")
    assert result.returncode == 0, result.stderr
    boxdir = Path(result.stdout.decode().strip())
    assert boxdir == Path(os.environ["SANDBOX_HOME"]) / "isolate" / number
    yield number, boxdir / "box"
    isolate("-b", number, "--cleanup")


def real_isolate() -> str:
    if not os.access(REAL_ISOLATE, os.X_OK):
        pytest.skip(f"the real isolate is not built at {REAL_ISOLATE}: nothing to compare with")
    return REAL_ISOLATE


def test_a_cms_style_flow_compiles_runs_tests_and_cleans_up(box, gcc, tmp_path):
    number, work = box
    (work / "sum.c").write_bytes(SUM_C)
    compiled = isolate("-b", number, "--cg", "-p", "-t", "10", "-w", "20", "-x", "1",
                       "--cg-mem=524288", "-f", "65536", "-E", "PATH=/usr/bin:/bin",
                       "-M", str(tmp_path / "compile.meta"), "-o", "compile.out",
                       "--stderr-to-stdout", "--run", "--", "/usr/bin/gcc", "-O2", "-o",
                       "sum", "sum.c", timeout=120)
    assert compiled.returncode == 0, compiled.stderr + (work / "compile.out").read_bytes()
    assert compiled.stderr.startswith(b"OK (") and b"sec wall)" in compiled.stderr
    assert meta(tmp_path / "compile.meta")["exitcode"] == "0"
    # Between runs the caller owns everything the program made.
    assert (work / "sum").stat().st_uid == os.getuid()
    for case, (given, expected) in enumerate([("2 3", "5"), ("-7 7", "0"), ("40 2", "42")]):
        (work / f"in{case}").write_text(given + "\n")
        ran = isolate("-b", number, "-t", "1", "-w", "3", "-m", "65536", "-i", f"in{case}",
                      "-o", f"out{case}", "-M", str(tmp_path / f"{case}.meta"), "-s",
                      "--run", "--", "./sum")
        assert ran.returncode == 0, ran.stderr
        assert ran.stderr == b""  # -s: no status line
        assert (work / f"out{case}").read_text() == expected + "\n"
        figures = meta(tmp_path / f"{case}.meta")
        assert figures["exitcode"] == "0" and "status" not in figures
        assert float(figures["time"]) < 1 and float(figures["time-wall"]) < 3
    cleaned = isolate("-b", number, "--cleanup")
    assert cleaned.returncode == 0 and not work.parent.exists()


def test_a_judge0_style_run_line(box, tmp_path):
    number, work = box
    (work / "run").write_text("read x; echo \"got $x $HOME\"; echo oops >&2\n")
    boxdir = work.parent
    ran = isolate("-s", "-b", number, "-M", str(boxdir / "metadata.txt"), "--stderr-to-stdout",
                  "-t", "5", "-x", "1", "-w", "10", "-k", "64000", "-p120", "--cg-mem=256000",
                  "--cg", "-f", "4096", "-E", "HOME=/tmp", "-E", "PATH=/usr/bin:/bin",
                  "-E", "LANG", "-d", "/etc:noexec", "--run", "--", "/bin/bash", "run",
                  stdin=b"hello\n")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == b"got hello /tmp\noops\n"
    figures = meta(boxdir / "metadata.txt")
    assert figures["exitcode"] == "0"
    assert {"time", "time-wall", "max-rss"} <= figures.keys()


@pytest.mark.parametrize(("args", "code", "message", "status"), [
    (["/bin/sh", "-c", "exit 3"], 1, b"Exited with error status 3\n", "RE"),
    (["/bin/sh", "-c", "kill -SEGV $$"], 1, b"Caught fatal signal 11\n", "SG"),
    (["/bin/sh", "-c", "while :; do :; done"], 1, b"Time limit exceeded\n", "TO"),
    (["/bin/sleep", "3"], 1, b"Time limit exceeded (wall clock)\n", "TO"),
])
def test_verdicts_print_isolates_messages_and_exit_codes(box, tmp_path, args, code, message,
                                                         status):
    number, _ = box
    result = isolate("-b", number, "-t", "0.3", "-w", "1", "-M", str(tmp_path / "m"),
                     "--run", "--", *args)
    assert (result.returncode, result.stderr) == (code, message)
    figures = meta(tmp_path / "m")
    assert figures["status"] == status and figures["message"] == message.decode().strip()
    if os.access(REAL_ISOLATE, os.X_OK):  # the same line and code from isolate itself
        real = subprocess.run([REAL_ISOLATE, "-b", "97", "--init"], capture_output=True)
        assert real.returncode == 0, real.stderr
        try:
            theirs = subprocess.run([REAL_ISOLATE, "-b", "97", "-t", "0.3", "-w", "1",
                                     "--run", "--", *args], capture_output=True, timeout=30)
        finally:
            subprocess.run([REAL_ISOLATE, "-b", "97", "--cleanup"], capture_output=True)
        assert (theirs.returncode, theirs.stderr) == (code, message)
    else:
        print(f"the real isolate is not built at {REAL_ISOLATE}: compared with nothing")


def test_ok_prints_the_status_line_and_exits_0(box):
    number, _ = box
    result = isolate("-b", number, "--run", "--", "/bin/true")
    assert result.returncode == 0
    assert result.stderr.startswith(b"OK (") and result.stderr.endswith(b" sec wall)\n")


@pytest.mark.parametrize("args", [
    ["--frob"], ["-b"], ["--run"], ["--init", "--run", "--", "true"], ["--init", "extra"],
    ["-b", "x", "--init"], ["--cg-mem=1000", "--init"], [],
])
def test_bad_command_lines_exit_2_with_isolate_wording(args):
    ours = isolate(*args)
    assert ours.returncode == 2, args
    assert b"Traceback" not in ours.stderr and ours.stderr
    assert ours.stderr.endswith(b"Try 'isolate --help' for more information.\n")
    if os.access(REAL_ISOLATE, os.X_OK):
        theirs = subprocess.run([REAL_ISOLATE, *args], capture_output=True)
        assert theirs.returncode == 2, args


def test_errors_of_the_box_itself_exit_2(tmp_path):
    assert isolate("-b", "1000", "--init").stderr == b"Sandbox ID out of range (allowed: 0-999)\n"
    missing = isolate("-b", "998", "-M", str(tmp_path / "m"), "--run", "--", "/bin/true")
    assert (missing.returncode, missing.stderr) == (
        2, b"Box not found, did you run `isolate --init'?\n")
    assert meta(tmp_path / "m")["status"] == "XX"


def test_what_cannot_be_enforced_or_would_weaken_the_box_is_refused(box):
    number, _ = box
    for args in (["-q", "1000,100"], ["-d", "/dev:dev"], ["-d", "/etc=/etc:rw"],
                 ["-d", "/data=/tmp:dev"], ["-d", "/data=/tmp:fs"]):
        result = isolate("-b", number, *args, "--run", "--", "/bin/true")
        assert result.returncode == 2, (args, result.stderr)
        assert b"Traceback" not in result.stderr


def test_a_busy_box_is_refused_unless_wait(box):
    number, _ = box
    slow = subprocess.Popen([*_cli(), "isolate", "-b", number, "-w", "5", "--run", "--",
                             "/bin/sleep", "1.5"], stderr=subprocess.PIPE)
    try:
        deadline = 50
        while deadline and not _locked(number):
            deadline -= 1
            subprocess.run(["sleep", "0.1"])
        busy = isolate("-b", number, "--run", "--", "/bin/true")
        assert (busy.returncode, busy.stderr) == (
            2, b"This box is currently in use by another process\n")
        waited = isolate("-b", number, "--wait", "--run", "--", "/bin/true")
        assert waited.returncode == 0, waited.stderr
    finally:
        slow.wait(timeout=30)


def _cli() -> list[str]:
    from tests.conftest import SANDBOX

    return [SANDBOX]


def _locked(number: str) -> bool:
    import fcntl

    path = Path(os.environ["SANDBOX_HOME"]) / "isolate" / f"{number}.lock"
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_directory_rules_bind_host_directories_and_redirect_into_them(box, tmp_path):
    number, _ = box
    data = tmp_path / "data"
    data.mkdir()
    (data / "input").write_text("from the host\n")
    os.chmod(data, 0o777)
    result = isolate("-b", number, "-p", "-d", f"/data={data}:rw", "-i", "/data/input",
                     "-o", "/data/output", "--run", "--", "/bin/sh", "-c", "cat; ls /data")
    assert result.returncode == 0, result.stderr
    assert (data / "output").read_text() == "from the host\ninput\n"


# -- attacks on the host side ---------------------------------------------------------------


def test_a_planted_output_symlink_is_never_written_through(box, tmp_path):
    number, work = box
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(victim, 0o666)  # even a file the box could reach, were it in its namespace
    planted = isolate("-b", number, "-p", "-E", f"V={victim}", "--run", "--", "/bin/sh", "-c",
                      'ln -s "$V" out; ln -s /etc/shadow shadow')
    assert planted.returncode == 0, planted.stderr
    result = isolate("-b", number, "-o", "out", "--run", "--", "/bin/echo", "overwritten")
    assert victim.read_text() == "host file\n"
    assert result.returncode == 0, result.stderr
    assert (work / "out").read_text() == "overwritten\n" and not (work / "out").is_symlink()


def test_the_output_file_replaces_a_symlink_it_finds(tmp_path):
    """The redirection itself, without the hand-over that removes what a run left."""
    from sandbox import isolate as iso

    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "out").symlink_to(victim)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        output = iso._Output(iso._locate("out", "/box", {"/box": fd}, "-o"), "out")
        os.write(output.fd, b"program output\n")
        output.commit()
    finally:
        os.close(fd)
    assert victim.read_text() == "host file\n"
    assert (work / "out").read_text() == "program output\n"


def test_an_input_symlink_or_fifo_is_refused_without_hanging(box, tmp_path):
    number, work = box
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    os.chmod(tmp_path, 0o755)
    os.mkfifo(work / "fifo")
    (work / "link").symlink_to(secret)
    for name in ("fifo", "link"):
        result = isolate("-b", number, "-i", name, "--run", "--", "/bin/cat", timeout=20)
        assert result.returncode == 2, result.stderr
        assert b"host secret" not in result.stdout


def test_the_input_open_never_waits_on_a_fifo(tmp_path):
    """The input open itself (a run's hand-over would have removed the FIFO first)."""
    from sandbox import isolate as iso

    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)

    def hung(*_: object) -> None:
        raise TimeoutError("the open waited for a writer of the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(iso.Fatal, match="not a regular file"):
            iso._open_input(iso._locate("fifo", "/box", {"/box": fd}, "-i"), "fifo")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.close(fd)


def test_cleanup_never_follows_a_planted_symlink_to_a_host_dir(box, tmp_path):
    number, work = box
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("keep me\n")
    (work / "dir").mkdir()
    (work / "dir" / "escape").symlink_to(precious)
    (work / "top").symlink_to(precious)
    cleaned = isolate("-b", number, "--cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    assert (precious / "keep").read_text() == "keep me\n"
    assert not work.parent.exists()


def test_remove_tree_handles_nests_deeper_than_its_descriptor_budget(tmp_path):
    from sandbox.boxdir import MAX_DEPTH, remove_tree

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir("nest", dir_fd=fd)
        level = os.open("nest", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        for _ in range(MAX_DEPTH * 3):
            os.mkdir("d", dir_fd=level)
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=level)
            os.close(level)
            level = deeper
        os.close(level)
        remove_tree(fd, "nest")
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


def test_hand_over_removes_links_and_special_files_and_never_chowns_through_them(tmp_path):
    from sandbox.boxdir import hand_over

    host = tmp_path / "host"
    host.write_text("host\n")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "file").write_text("mine\n")
    (work / "link").symlink_to(host)
    os.link(host, work / "hard")
    os.mkfifo(work / "fifo")
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        hand_over(fd, 12345, 12345)
    finally:
        os.close(fd)
    assert sorted(os.listdir(work)) == ["sub"]
    assert host.stat().st_uid == os.getuid() and host.stat().st_nlink == 1
    assert (work / "sub" / "file").stat().st_uid == 12345
    assert stat.S_IMODE((work / "sub").stat().st_mode) and (work / "sub").stat().st_uid == 12345
    shutil.rmtree(work)
