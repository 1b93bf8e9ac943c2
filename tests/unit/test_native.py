"""The native box init's order of steps, checked on its recording build (no privileges), and
its request parser on the stored fuzz corpus."""

import os
import socket
import subprocess

import pytest

from sandbox import boxinit, protocol
from sandbox.native.build import build

REQUEST = boxinit.RunRequest(
    argv=("/bin/true", "x"),
    env={"PATH": "/bin"},
    cwd="/box",
    uid=1000,
    gid=1000,
    rlimits=((4, 0), (7, 64)),
    bpf=bytes(16),
    listener=True,
    binds=(boxinit.RunBind("/box/in", True, False),),
)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return build(tmp_path_factory.mktemp("native") / "boxinit-record", record=True)


def _messages(sock):
    out = []
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        for fd in fds:
            os.close(fd)
        if not data:
            return out
        out.append(protocol.decode(data))  # what the supervisor's decoder makes of it


def _drive(recording, request=REQUEST):
    """Run the recording init through PREPARE and RUN; (steps, messages)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log_read, log_write = os.pipe()
    proc = subprocess.Popen(
        [str(recording), "init", str(theirs.fileno())],
        pass_fds=[theirs.fileno(), log_write],
        env={"BOXINIT_RECORD_FD": str(log_write)},
    )
    theirs.close()
    os.close(log_write)
    cgroup = [os.open(os.devnull, os.O_WRONLY) for _ in range(2)]
    tree = os.open(os.devnull, os.O_RDONLY)
    boxinit.send_prepare(ours, tuple(cgroup))
    ready = protocol.decode(ours.recv(4096))
    stdio = (0, 1, 2)
    boxinit.send_run(ours, request, stdio, (tree,) * len(request.binds))
    for fd in (*cgroup, tree):
        os.close(fd)
    proc.wait(timeout=10)
    messages = [ready, *_messages(ours)]
    ours.close()
    with os.fdopen(log_read) as log:
        steps = [line.split()[0] for line in log.read().splitlines()]
    return steps, messages


def test_runner_steps_come_in_the_documented_order(recording):
    """pid 1 hides itself, forks the runner; the runner joins the cgroup before anything else
    and answers ready; then binds, ids, session, limits, stdio, descriptors, no_new_privs,
    capabilities, signals, and seccomp is the very last step before execve."""
    steps, messages = _drive(recording)
    assert steps == [
        "not_dumpable",
        "pdeathsig",
        "fork",
        "join_cgroup",
        "join_cgroup",
        "unshare_cgroup",
        "setresgid",
        "setresuid",
        "mkdir",  # /box (exists: EEXIST is fine in the real build) ...
        "mkdir",  # ... /box/in, with the program's ids
        "move_mount",
        "mount_setattr",
        "chdir",
        "setsid",
        "setrlimit",
        "setrlimit",
        "dup2",
        "dup2",
        "dup2",
        "close_range",
        "no_new_privs",
        "drop_capabilities",
        "reset_signals",
        "seccomp",
        "execve",
    ]
    assert [type(m) for m in messages] == [protocol.Ready, protocol.Exec, protocol.ExecError]
    assert messages[2].errno == 2  # the recording execve fails with ENOENT


def test_a_request_the_parser_refuses_is_a_structured_setup_error(recording):
    """A request with a relative working directory never reaches any privilege step."""
    bad = boxinit.RunRequest(**{**REQUEST.__dict__, "cwd": "box"})
    steps, messages = _drive(recording, bad)
    assert "setresuid" not in steps and "seccomp" not in steps
    failed = messages[-1]
    assert isinstance(failed, protocol.SetupError)
    assert (failed.phase, failed.op) == ("receive_run", "bad working directory")
