"""The parent/child protocol accepts exactly the documented messages."""

import json
import os

import pytest

from sandbox import protocol

EVERY_KIND = [
    protocol.Unshared(),
    protocol.Ready(),
    protocol.Exec(at=5, cpu_ns=6),
    protocol.SetupError(phase="p", op="o", errno=1, detail=""),
    protocol.ExecError(errno=2),
    protocol.Exited(status=9, at=1, utime_us=2, stime_us=3, maxrss_kb=4),
    protocol.Tree(limit="memory", at=1, user_us=2, system_us=3, memory_peak=4),
    protocol.Go(),
]


@pytest.mark.parametrize("message", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_each_kind_round_trips(message):
    again = protocol.decode(protocol.encode(message))
    assert type(again) is type(message) and again == message


@pytest.mark.parametrize(("data", "kind"), [
    (b'{"t": "unshared"}', protocol.Unshared),
    (b'{"t": "ready"}', protocol.Ready),
    (b'{"t": "go"}', protocol.Go),
    (b'{"t": "exec_error", "errno": 2}', protocol.ExecError),
])
def test_kinds_without_fields_decode_to_their_own_class(data, kind):
    """The wire names the native box init writes (boxinit.c) decode to their classes."""
    assert type(protocol.decode(data)) is kind


def test_the_wire_format_is_the_one_the_native_init_writes():
    data = protocol.encode(protocol.SetupError(phase="chdir", op="/x", errno=2, detail="d"))
    assert json.loads(data) == {"t": "error", "phase": "chdir", "op": "/x", "errno": 2,
                                "detail": "d"}


@pytest.mark.parametrize("data", [
    b"", b"[]", b"{}", b'{"t": 1}', b'{"t": "nope"}', b"\xff\xfe",
    b'{"t": "Exited"}',  # a class name is not a wire name
    b'{"t": "exit"}',  # missing fields
    b'{"t": "exit", "status": 9, "at": 1, "utime_us": 2, "stime_us": 3}',  # one missing
    b'{"t": "exit", "status": 9, "at": 1, "utime_us": 2, "stime_us": 3, "maxrss_kb": 4, '
    b'"extra": 1}',
    b'{"t": "exit", "status": "9", "at": 1, "utime_us": 2, "stime_us": 3, "maxrss_kb": 4}',
    b'{"t": "exit", "status": true, "at": 1, "utime_us": 2, "stime_us": 3, "maxrss_kb": 4}',
    b'{"t": "exit", "status": 9.0, "at": 1, "utime_us": 2, "stime_us": 3, "maxrss_kb": 4}',
    b'{"t": "error", "phase": 1, "op": "o", "errno": 1, "detail": ""}',
    b'{"t": "go", "x": null}',
    b'{"t": "tree", "limit": null, "at": 1, "user_us": 2, "system_us": 3, "memory_peak": 4}',
    b"x" * (protocol.MAX_MESSAGE + 1),
    b'{"t": "exec_error", "errno": 2}' + b" " * protocol.MAX_MESSAGE,  # valid, but too long
])
def test_malformed_messages_are_refused(data):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(data)


@pytest.mark.parametrize("message", [
    protocol.Exited(status="x", at=1, utime_us=0, stime_us=0, maxrss_kb=0),  # type: ignore[arg-type]
    protocol.ExecError(errno=True),
    protocol.SetupError(phase="p", op="o" * protocol.MAX_MESSAGE, errno=1, detail=""),
    (),  # a tuple is not a message, though it equals the kinds without fields
])
def test_writer_cannot_send_an_undocumented_shape(message):
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(message)


def test_receive_reports_sender_pid_and_passes_descriptors():
    ours, theirs = protocol.socketpair()
    with ours, theirs:
        fd = os.open(os.devnull, os.O_RDONLY)
        protocol.send(theirs, protocol.Exec(at=5, cpu_ns=6), fds=(fd,))
        os.close(fd)
        received = protocol.receive(ours)
        assert type(received.message) is protocol.Exec and received.message == (5, 6)
        assert received.pid == os.getpid() and len(received.fds) == 1
        os.close(received.fds[0])
        theirs.close()
        assert protocol.receive(ours) is None


def test_a_box_that_ends_with_a_message_to_it_unread_still_gets_its_last_words_read():
    """The box's end closes while a message to it is unread (a PREPARE its init never read):
    the kernel reports ECONNRESET once on our end, and what the box sent before is still read,
    then the end of the stream."""
    supervisor, box = protocol.socketpair()
    supervisor.send(b"SBX1PRE\0")  # never read by the box
    protocol.send(box, protocol.SetupError(phase="mount_root", op="o", errno=20, detail=""))
    box.close()
    try:
        received = protocol.receive(supervisor)
        assert received is not None
        match received.message:
            case protocol.SetupError(phase=phase):
                assert phase == "mount_root"
            case other:
                pytest.fail(f"got {other!r}")
        assert protocol.receive(supervisor) is None
    finally:
        supervisor.close()
