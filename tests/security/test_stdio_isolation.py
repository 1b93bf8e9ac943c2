"""The program cannot stall the supervisor, and shares no open file description with the caller.

The supervisor copies the program's output to the caller in the same loop that enforces the time
limits: a consumer that never reads must not suspend them. And flags or offsets the program sets
on its stdin must stay in the box.
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import sandbox
from tests.conftest import SANDBOX

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs boxes as root")

FLOOD = "import sys\nwhile True: sys.stdout.write('x' * 65536)\n"
# One thread floods stdout (and blocks once nobody reads it), the others burn CPU meanwhile.
FLOOD_AND_SPIN = (
    "import sys, threading\n"
    "def spin():\n    while True: pass\n"
    "for _ in range(2): threading.Thread(target=spin, daemon=True).start()\n" + FLOOD
)


def stalled_consumer(tmp_path, limits: list[str], code: str, stall: float) -> dict:
    """Run ``code`` with its stdout to a pipe nobody reads for ``stall`` seconds."""
    report = tmp_path / "report.json"
    cli = subprocess.Popen([SANDBOX, "exec", *limits, "--report", str(report), "--",
                            "python3", "-c", code], stdout=subprocess.PIPE)
    time.sleep(stall)
    assert cli.stdout is not None
    while cli.stdout.read(1 << 20):  # now read everything, so the CLI can finish
        pass
    assert cli.wait(timeout=30) == 137
    return json.loads(report.read_text())


def test_a_consumer_that_never_reads_does_not_suspend_the_wall_limit(tmp_path):
    got = stalled_consumer(tmp_path, ["--wall-time", "1"], FLOOD, stall=4)
    assert got["verdict"] == "wall_time_limit"
    assert got["wall_time"] < 1.5  # the limit fired on time, not when the consumer read


def test_a_consumer_that_never_reads_does_not_suspend_the_cpu_limit(tmp_path):
    got = stalled_consumer(tmp_path, ["--cpu-time", "1", "--wall-time", "20"],
                           FLOOD_AND_SPIN, stall=4)
    assert got["verdict"] == "cpu_time_limit"
    assert got["cpu_time"] < 1.5


def test_the_output_still_arrives_whole_through_a_slow_consumer(tmp_path):
    code = "import sys\nfor i in range(64): sys.stdout.write(str(i % 10) * 65536)\n"
    cli = subprocess.Popen([SANDBOX, "exec", "--", "python3", "-c", code],
                           stdout=subprocess.PIPE)
    time.sleep(1)  # the backlog fills and the box waits for us
    out = cli.communicate(timeout=60)[0]
    assert cli.returncode == 0
    assert out == b"".join(str(i % 10).encode() * 65536 for i in range(64))


SET_NONBLOCK = ("import fcntl, os\n"
                "fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK)\n"
                "print(os.read(0, 3).decode())\n")


def test_flags_the_program_sets_on_its_stdin_pipe_stay_in_the_box():
    read_end, write_end = os.pipe()
    os.write(write_end, b"abcdef")
    try:
        result = subprocess.run([SANDBOX, "exec", "--", "python3", "-c", SET_NONBLOCK],
                                stdin=read_end, capture_output=True, timeout=30)
        assert result.stdout == b"abc\n", result.stderr
        assert os.get_blocking(read_end)  # the caller's description is as it was
        # Control: a descriptor that shares the description sees the program's flag.
        shared = os.dup(read_end)
        fcntl.fcntl(shared, fcntl.F_SETFL, os.O_NONBLOCK)
        assert not os.get_blocking(read_end)
        os.close(shared)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_offset_the_program_reads_to_stays_in_the_box(tmp_path):
    data = tmp_path / "input"
    data.write_bytes(b"0123456789")
    with open(data, "rb", buffering=0) as f:
        f.read(2)
        result = subprocess.run([SANDBOX, "exec", "--", "python3", "-c",
                                 "import os; print(os.read(0, 3).decode())"],
                                stdin=f, capture_output=True, timeout=30)
        assert result.stdout == b"234\n"  # the program starts at the caller's offset ...
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 2  # ... and does not move it


def test_a_socket_stdin_reaches_the_program_and_keeps_its_flags():
    ours, theirs = socket.socketpair()
    ours.sendall(b"abcdef")
    ours.shutdown(socket.SHUT_WR)
    try:
        result = subprocess.run([SANDBOX, "exec", "--", "python3", "-c", SET_NONBLOCK],
                                stdin=theirs.fileno(), capture_output=True, timeout=30)
        assert result.stdout == b"abc\n", result.stderr
        assert os.get_blocking(theirs.fileno())
    finally:
        ours.close()
        theirs.close()


def test_the_library_gives_the_program_its_own_description_of_a_caller_descriptor():
    read_end, write_end = os.pipe()
    os.write(write_end, b"abcdef")
    try:
        report = sandbox.run(["python3", "-c", SET_NONBLOCK], stdin=read_end)
        assert report.stdout == b"abc\n"
        assert os.get_blocking(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_consumer_that_goes_away_still_gets_a_verdict_and_a_report(tmp_path):
    report = tmp_path / "r.json"
    cli = subprocess.Popen([SANDBOX, "exec", "--wall-time", "2", "--report", str(report),
                            "--", "yes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cli.stdout is not None
    cli.stdout.read(10)
    cli.stdout.close()  # like `| head -c 10`
    assert cli.wait(timeout=30) == 137
    assert cli.stderr is not None and b"internal error" not in cli.stderr.read()
    assert json.loads(report.read_text())["verdict"] in ("wall_time_limit", "output_limit")


TERMINAL = ("import sys, termios\n"
            "print(sys.stdin.isatty())\n"
            "try:\n"
            "    attrs = termios.tcgetattr(0); attrs[3] &= ~termios.ECHO\n"
            "    termios.tcsetattr(0, termios.TCSANOW, attrs); print('changed')\n"
            "except termios.error:\n"
            "    print('refused')\n")


def test_the_callers_terminal_settings_stay_out_of_reach():
    import termios

    leader, follower = os.openpty()
    try:
        result = subprocess.run([SANDBOX, "exec", "--", "python3", "-c", TERMINAL],
                                stdin=follower, capture_output=True, timeout=30)
        assert result.stdout == b"False\nrefused\n", result.stderr
        assert termios.tcgetattr(follower)[3] & termios.ECHO
        # Control: a program given the terminal itself turns its echo off.
        subprocess.run([sys.executable, "-c", TERMINAL], stdin=follower, check=True,
                       capture_output=True, timeout=30)
        assert not termios.tcgetattr(follower)[3] & termios.ECHO
    finally:
        os.close(leader)
        os.close(follower)


REWRITE_STDIN = ("import os\n"
                 "try:\n"
                 "    fd = os.open('/proc/self/fd/0', os.O_RDWR); os.pwrite(fd, b'99', 0)\n"
                 "    print('written')\n"
                 "except OSError as e:\n"
                 "    print(e.errno)\n")


def test_the_program_cannot_write_to_the_memory_file_it_reads():
    mine = os.memfd_create("judge-input")
    os.write(mine, b"1 2\n")
    os.lseek(mine, 0, os.SEEK_SET)
    try:
        assert sandbox.run(["python3", "-c", REWRITE_STDIN], stdin=mine).ok
        assert os.pread(mine, 16, 0) == b"1 2\n"  # the caller's input is as it was
        report = sandbox.run(["python3", "-c", REWRITE_STDIN], stdin=b"1 2\n")
        assert report.stdout != b"written\n"  # the library's own copy is sealed
        # Sealed against writes but not against truncation: still given only a copy.
        sealed = os.memfd_create("judge-input", os.MFD_ALLOW_SEALING)
        os.write(sealed, b"1 2\n")
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        os.lseek(sealed, 0, os.SEEK_SET)
        truncate = "import os; os.truncate('/proc/self/fd/0', 0)"
        sandbox.run(["python3", "-c", truncate], stdin=sealed)
        assert os.pread(sealed, 16, 0) == b"1 2\n"
        os.close(sealed)
        # Control: on the host the same reopening writes to the memory file.
        subprocess.run([sys.executable, "-c", REWRITE_STDIN], stdin=mine, check=True,
                       timeout=30)
        assert os.pread(mine, 16, 0) == b"992\n"
    finally:
        os.close(mine)
