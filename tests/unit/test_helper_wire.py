"""The helper's answer on the wire: one length-prefixed pickle, descriptors on its first bytes,
decoded the same by the blocking and the asyncio receivers (helper.ResultReader)."""

import os
import socket
import threading

import pytest

from sandbox import helper


def test_a_large_answer_and_its_descriptors_arrive_whole():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    answer = {"data": b"x" * (3 << 20)}  # more than one read and the socket's buffer
    sender = threading.Thread(target=helper.send_result, args=(theirs, answer, (write_end,)))
    sender.start()
    result, fds = helper.receive_result(ours)
    sender.join()
    assert result == answer and len(fds) == 1
    os.write(fds[0], b"!")
    assert os.read(read_end, 1) == b"!"
    for fd in (*fds, read_end, write_end):
        os.close(fd)
    ours.close()
    theirs.close()


def test_an_answer_cut_short_raises_and_closes_what_came_with_it():
    reader = helper.ResultReader()
    read_end, write_end = os.pipe()
    reader.feed(b"\0\0\0", [write_end])
    assert reader.wanted() == 5
    with pytest.raises(ConnectionError):
        reader.feed(b"", [])
    reader.close()
    with pytest.raises(OSError):
        os.fstat(write_end)
    os.close(read_end)
