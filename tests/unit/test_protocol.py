"""The parent/child protocol accepts exactly the documented messages."""

import os

import pytest

from sandbox import protocol


@pytest.mark.parametrize(("kind", "fields"), [
    (protocol.UNSHARED, {}),
    (protocol.EXITED, {"status": 9, "at": 1, "utime_us": 2, "stime_us": 3, "maxrss_kb": 4}),
    (protocol.SETUP_ERROR, {"phase": "p", "op": "o", "errno": 1, "detail": ""}),
    (protocol.EXEC_ERROR, {"errno": 2}),
    (protocol.TREE, {"limit": "memory", "at": 1, "user_us": 2, "system_us": 3, "memory_peak": 4}),
])
def test_round_trip(kind, fields):
    assert protocol.decode(protocol.encode(kind, **fields)) == protocol.Message(kind, fields)


@pytest.mark.parametrize("data", [
    b"", b"[]", b"{}", b'{"t": 1}', b'{"t": "nope"}', b'{"t": "exit"}',
    b'{"t": "exit", "status": "9"}', b'{"t": "exit", "status": true}',
    b'{"t": "exit", "status": 9, "extra": 1}', b"\xff\xfe", b"x" * (protocol.MAX_MESSAGE + 1),
])
def test_malformed_messages_are_refused(data):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(data)


def test_writer_cannot_send_an_undocumented_shape():
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(protocol.EXITED, status="x", at=1, utime_us=0, stime_us=0, maxrss_kb=0)


def test_receive_reports_sender_pid_and_passes_descriptors():
    ours, theirs = protocol.socketpair()
    with ours, theirs:
        fd = os.open(os.devnull, os.O_RDONLY)
        protocol.send(theirs, protocol.EXEC, fds=(fd,), at=5, cpu_ns=6)
        os.close(fd)
        msg = protocol.receive(ours)
        assert msg.kind == protocol.EXEC and msg.pid == os.getpid() and len(msg.fds) == 1
        os.close(msg.fds[0])
        theirs.close()
        assert protocol.receive(ours) is None


def test_a_box_that_ends_with_a_message_to_it_unread_still_gets_its_last_words_read():
    """The box's end closes while a message to it is unread (a PREPARE its init never read):
    the kernel reports ECONNRESET once on our end, and what the box sent before is still read,
    then the end of the stream."""
    supervisor, box = protocol.socketpair()
    supervisor.send(b"SBX1PRE\0")  # never read by the box
    protocol.send(box, protocol.SETUP_ERROR, phase="mount_root", op="o", errno=20, detail="")
    box.close()
    try:
        msg = protocol.receive(supervisor)
        assert msg is not None and msg.fields["phase"] == "mount_root"
        assert protocol.receive(supervisor) is None
    finally:
        supervisor.close()
