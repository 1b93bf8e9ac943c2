"""The library from asyncio: ``await sandbox.aio.run(argv, ...) -> Report``, and ``run_group``.

The same runs as :func:`sandbox.run` and :func:`sandbox.run_group` (same arguments, same
checks, same reports), through the same box helper and the same wire (``helper.py``): the
request goes out on the helper's control socket, and the answer, with the descriptors of the
captured output, comes back on the run's own socket, which this reads from the event loop as it
becomes readable. A run costs a socket, not a thread: any number can wait at once.

Cancelling the awaiting task cancels the run: the run's socket is shut for writing, which the
box's supervisor reads as its caller gone, so it kills the box at once. The task then waits (at
most :data:`KILL_WAIT`) for the supervisor's last answer, which comes once nothing of the box
runs, throws it away, and re-raises the cancellation; nothing half-written is returned. A
cancelled :func:`run_group` stops every box of its group the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec

from . import api, helper
from .group import GroupReport
from .repeat import summarize
from .report import Report

KILL_WAIT = 5.0  # seconds a cancelled run waits for its box's end; then its supervisor's business

_P = ParamSpec("_P")


def _awaitable(
    sync: Callable[_P, Report],
    prepare: Callable[_P, api._Prepared],
) -> Callable[_P, Coroutine[Any, Any, Report]]:
    """``sync``'s arguments, awaited: ``prepare`` is what ``sync`` does before sending (one
    type for both keeps their arguments the same)."""

    async def run(*args: _P.args, **kwargs: _P.kwargs) -> Report:
        prepared = prepare(*args, **kwargs)
        ws = prepared.workspace
        async with contextlib.nullcontext() if ws is None else ws.held_async():
            runs = [
                api._finish_run(captured, *await _call(request, fds))
                for request, fds, captured in prepared.requests()
            ]
        return summarize(runs)

    run.__qualname__ = run.__name__
    run.__doc__ = f"Awaitable :func:`sandbox.run`.\n\n{sync.__doc__}"
    run.__wrapped__ = sync  # type: ignore[attr-defined]  # its signature, for inspect and help
    return run


run = _awaitable(api.run, api._prepare_run)


async def run_group(path: str | Path) -> GroupReport:
    """Awaitable :func:`sandbox.run_group`: run the group file at ``path``, return every box's
    report."""
    return api._finish_group(*await _call(*api._prepare_group(path)))


async def _call(request: helper.Request, fds: list[int]) -> tuple[object, list[int]]:
    """:func:`api._call` without blocking: the answer is read as the event loop sees it come."""
    with api._send(request, fds) as ours:
        ours.setblocking(False)
        reader = helper.ResultReader()
        try:
            try:
                await _receive(ours, reader)
            except asyncio.CancelledError:
                with contextlib.suppress(OSError):  # the helper may be gone already
                    ours.shutdown(socket.SHUT_WR)  # the supervisor's cancel: it kills the box
                await _settle(ours, reader)
                raise
            except OSError as e:
                raise api._receive_failed(e) from None
            answer = reader.result()
        finally:
            reader.close()
    return api._answer(*answer)


async def _receive(sock: socket.socket, reader: helper.ResultReader) -> None:
    """Read the answer into ``reader`` as it comes (raises ConnectionError at an early end)."""
    loop = asyncio.get_running_loop()
    while wanted := reader.wanted():
        await _readable(loop, sock, None)
        try:
            data, fds, _, _ = socket.recv_fds(sock, wanted, helper.MAX_CAPTURES)
        except BlockingIOError:
            continue
        reader.feed(data, fds)


async def _settle(sock: socket.socket, reader: helper.ResultReader) -> None:
    """After a cancel: wait, at most :data:`KILL_WAIT`, for the answer the box's supervisor
    sends once the box is dead (or for the end of the socket), reading and dropping it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KILL_WAIT
    with contextlib.suppress(OSError):  # the end of the socket is an end too
        while wanted := reader.wanted():
            if not await _readable(loop, sock, deadline):
                return
            with contextlib.suppress(BlockingIOError):
                data, fds, _, _ = socket.recv_fds(sock, wanted, helper.MAX_CAPTURES)
                reader.feed(data, fds)


async def _readable(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float | None
) -> bool:
    """Wait until ``sock`` has something to read (True) or the loop's clock passes
    ``deadline`` (False)."""
    ready: asyncio.Future[bool] = loop.create_future()

    def settle(value: bool) -> None:
        if not ready.done():
            ready.set_result(value)

    loop.add_reader(sock.fileno(), settle, True)
    timer = loop.call_at(deadline, settle, False) if deadline is not None else None
    try:
        return await ready
    finally:
        loop.remove_reader(sock.fileno())
        if timer is not None:
            timer.cancel()
