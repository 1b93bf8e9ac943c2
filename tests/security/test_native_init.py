"""The native box init (sandbox/native/boxinit.c) against inputs it was not meant to see.

Each test drives the binary built from this tree through the supervisor's socket protocol, in a
pid namespace of its own (``unshare --pid``): boxinit's pid 1 ends every run with
kill(-1, SIGKILL), which must never reach anything but the namespace it runs in.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from sandbox import boxinit, protocol
from sandbox.native.build import build
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1): the runner unshares a cgroup namespace",
)

NEW_PID_NS = ("unshare", "--pid", "--fork", "--kill-child", "--")


def request(cwd: str) -> boxinit.RunRequest:
    """A run that ends at the runner's chdir: ``cwd`` does not exist."""
    return boxinit.RunRequest(
        argv=("/bin/true",),
        env={},
        cwd=cwd,
        uid=1000,
        gid=1000,
        rlimits=(),
        bpf=bytes(8),
        listener=False,
    )


def drive(sock: socket.socket, run: boxinit.RunRequest) -> list[bytes]:
    """PREPARE (no cgroup), RUN with our stdio; every message until the box hangs up."""
    boxinit.send_prepare(sock, ())
    out = [sock.recv(8192)]
    if out[0]:
        boxinit.send_run(sock, run, (0, 1, 2))
        while data := sock.recv(8192):
            out.append(data)
    return out


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    where = tmp_path_factory.mktemp("native")
    return {
        "static": build(where / "boxinit"),
        "sanitized": build(where / "boxinit-asan", sanitize=True),
    }


def test_a_failing_step_with_a_long_path_is_reported_whole(binaries):
    """The op of a failed step is a path of up to 4 KiB (the working directory, perhaps an
    image's WorkingDir); the error message's buffer is 1 KiB. The lengths snprintf returns
    used to be added up unchecked, so the fields after a long op were written past the end of
    the runner's stack buffer (AddressSanitizer: stack-buffer-overflow in fail) and the
    supervisor got cut JSON, or nothing."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cwd = "/nonexistent" + "/a" * 1500
    proc = subprocess.Popen(
        [*NEW_PID_NS, str(binaries["sanitized"]), "init", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stderr=subprocess.PIPE,
    )
    theirs.close()
    messages = drive(ours, request(cwd))
    _, stderr = proc.communicate(timeout=30)
    assert b"AddressSanitizer" not in stderr, stderr.decode(errors="replace")[:2000]
    decoded = [protocol.decode(m) for m in messages]  # the supervisor's decoder takes them
    assert [type(m) for m in decoded] == [protocol.Ready, protocol.SetupError, protocol.Exited]
    error = decoded[1]
    assert isinstance(error, protocol.SetupError)
    assert error.phase == "chdir" and error.errno == 2
    assert error.detail == "No such file or directory"
    assert cwd.startswith(error.op) and len(error.op) > 200


DRIVER = textwrap.dedent(
    """
    import json, socket, subprocess, sys
    sys.path.insert(0, sys.argv[2])
    from tests.security.test_native_init import drive, request
    victim = subprocess.Popen(["sleep", "60"])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    init = subprocess.Popen([sys.argv[1], "init", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        drive(ours, request("/nonexistent"))
    except OSError:
        pass  # an init that refused to start has hung up already
    code = init.wait(timeout=30)
    alive = victim.poll() is None
    victim.kill()
    print(json.dumps({"init": code, "victim_alive": alive}))
    """
)


def test_init_refuses_to_run_as_anything_but_pid_1(binaries):
    """Run anywhere but as pid 1 of a fresh pid namespace, boxinit init's kill(-1, SIGKILL)
    at the end of a run reached every process its caller could signal: as root outside any
    namespace, the whole host. Here the driver is pid 1 of a namespace of its own, and a
    ``sleep`` beside it stands for the rest of the host."""
    result = subprocess.run(
        [*NEW_PID_NS, sys.executable, "-c", DRIVER, str(binaries["static"]), str(ROOT)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    got = json.loads(result.stdout)
    assert got == {"init": 2, "victim_alive": True}


PRLIMIT = textwrap.dedent(
    """
    import os, resource
    try:
        resource.prlimit(1, resource.RLIMIT_CPU, (1, 1))
        print("init: allowed")
    except PermissionError:
        print("init: refused")
    child = os.fork()
    if child == 0:
        import time
        time.sleep(2)
        os._exit(0)
    resource.prlimit(child, resource.RLIMIT_CPU, (1, 1))  # the call itself is allowed
    print("own child: allowed")
    """
)


def test_the_program_cannot_prlimit_the_box_init():
    """As root the box's pid 1 has ids of its own, so the program cannot lower its limits
    (with RLIMIT_CPU at 1 s, the kernel would SIGKILL it and end the run without a report);
    the same call on a process with the program's ids works, so only the ids refuse it."""
    import sandbox

    report = sandbox.run(["python3", "-c", PRLIMIT], profile="strict")
    assert report.stdout.decode().split("\n")[:2] == ["init: refused", "own child: allowed"]
