"""Groups of boxes (the Compose analogue): a TOML file naming boxes, their wiring, their network.

::

    network = "linked"        # or "none": boxes talk only through the pipes below
    peer_grace = "1s"         # once a box ends, how long the others may still run

    [[box]]
    name = "interactor"       # unique; the box's host name, and its name on the network
    profile = "strict"        # name or path (relative to this file)
    command = ["python3", "/box/src/interactor.py"]
    stdin = "solution"        # the named box's stdout feeds this box's stdin
    limits = { wall_time = "5s" }
    env = { SEED = "7" }
    [[box.bind]]
    source = "interactor"     # relative to this file
    target = "/box/src"

Every box keeps its own limits and report. Pipes go straight from one box to the other (the
supervisor is not in between, so it can never block on them); a box that is still running
``peer_grace`` after the first box ended is stopped (verdict ``wall_time_limit``,
``limit_fired = "peer_exited"``). The group report says which box ended first and why.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import select
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, SandboxError
from .kernel import Kernel
from .report import Report
from .request import Request, resolve
from .spec import Bind, NetworkMode, Spec
from .tomlreader import Table
from .units import parse_duration

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_TOP_KEYS = {"name", "network", "peer_grace", "policy", "box"}
_BOX_KEYS = {"name", "profile", "command", "stdin", "limits", "env", "bind", "purpose", "language"}
_BIND_KEYS = {"source", "target", "writable"}
MAX_BOXES = 16
TEXT_LIMIT = 64 << 10  # captured output shown per box in the group's JSON report


@dataclass(frozen=True)
class BoxSpec:
    """One box of a group, resolved."""

    name: str
    spec: Spec
    stdin_from: str | None


@dataclass(frozen=True)
class GroupSpec:
    """A validated group file."""

    source: str
    name: str
    network: NetworkMode
    peer_grace: float
    boxes: tuple[BoxSpec, ...]


@dataclass(frozen=True)
class GroupReport:
    """Every box's report, and which box ended first and why."""

    name: str
    reports: dict[str, Report]
    first_ended: str | None
    order: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports.values())

    def to_json(self) -> str:
        first = self.reports.get(self.first_ended) if self.first_ended else None
        data = {
            "schema": 1,
            "group": self.name,
            "first_ended": self.first_ended,
            "first_verdict": first.verdict.value if first else None,
            "order": list(self.order),
            "boxes": {name: _box_dict(r) for name, r in self.reports.items()},
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _box_dict(report: Report) -> dict[str, Any]:
    """A box's report plus the start of its captured output, as text (an interactor's
    verdict is usually on its stderr)."""
    data = report.to_dict()
    for name in ("stdout", "stderr"):
        captured = getattr(report, name)
        data[f"{name}_text"] = (
            captured[:TEXT_LIMIT].decode(errors="replace") if captured is not None else None
        )
    return data


def load_group(path: str | Path) -> GroupSpec:
    """Read and validate a group file; every error names the file, the box and the key."""
    top = Table.read(Path(path), _TOP_KEYS)
    base = Path(path).resolve().parent
    network_raw = top.raw("network", "none")
    if network_raw not in ("none", "linked"):
        raise top.fail("network", "expected 'none' or 'linked'")
    network = NetworkMode(network_raw)
    try:
        grace = parse_duration(top.raw("peer_grace", "1s"))
    except ValueError as e:
        raise top.fail("peer_grace", str(e)) from None
    policy = top.optional_string("policy", "a path")
    boxes_raw = top.tables("box", None)
    if "box" not in top or not 1 <= len(boxes_raw) <= MAX_BOXES:
        raise top.fail("box", f"expected 1 to {MAX_BOXES} [[box]] tables")
    names = [b.raw("name") for b in boxes_raw]
    boxes = [_box(box, names, base, network, policy) for box in boxes_raw]
    group_name = top.string("name", Path(path).stem)
    return GroupSpec(top.source, group_name, network, grace, tuple(boxes))


def _box(
    first: Table, names: list[object], base: Path, network: NetworkMode, policy: str | None
) -> BoxSpec:
    name = first.raw("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise first.fail("name", "expected a lower-case name (a-z, 0-9, -)")
    box = Table(first.source, first.data, _BOX_KEYS, f"box {name!r}")
    if names.count(name) > 1:
        raise box.fail("name", "two boxes have this name")
    command = box.strings("command", "a non-empty array of strings")
    if not command:
        raise box.fail("command", "expected a non-empty array of strings")
    stdin_from = box.raw("stdin")
    if stdin_from is not None and (stdin_from not in names or stdin_from == name):
        raise box.fail("stdin", "expected the name of another box")
    binds = [
        Bind(str(base / b.string("source")), b.string("target"), b.boolean("writable", False))
        for b in box.tables("bind", _BIND_KEYS)
    ]
    profile = box.optional_string("profile", "a profile name or path")
    if profile is not None and ("/" in profile or profile.endswith(".toml")):
        profile = str(base / profile)
    attributes = {
        k: v for k in ("purpose", "language") if (v := box.optional_string(k)) is not None
    }
    limits, env = dict(box.table("limits", None)), dict(box.table("env", None))
    try:
        spec = resolve(
            Request(
                argv=command,
                profile=profile,
                policy=str(base / policy) if policy else None,
                attributes=attributes,
                binds=binds,
                limits=limits,
                env=env,
            )
        )
    except ConfigError as e:
        where = f"{box.path}: {e.source}: {e.key}" if e.key else box.path
        raise ConfigError(box.source, where, e.problem) from None
    if (spec.profile.network is NetworkMode.LINKED) != (network is NetworkMode.LINKED):
        raise box.fail(
            "profile",
            "a linked group needs profiles with network = 'linked' (e.g. "
            'profile = "linked"), and only a linked group may use them',
        )
    return BoxSpec(name, replace(spec, hostname=name), stdin_from)


def run_group(group: GroupSpec, cancel_fd: int | None = None) -> GroupReport:
    """Run every box at once, each under its own supervisor; call only single-threaded.
    ``cancel_fd`` readable (its caller went away) stops every box (``cancelled``)."""
    if group.network is NetworkMode.LINKED:
        from .box.network import LinkedNetwork

        with LinkedNetwork([b.name for b in group.boxes]) as net:
            boxes = tuple(
                replace(b, spec=replace(b.spec, link=net.links[b.name])) for b in group.boxes
            )
            return _run(group, boxes, cancel_fd)
    return _run(group, group.boxes, cancel_fd)


def _run(group: GroupSpec, boxes: tuple[BoxSpec, ...], cancel_fd: int | None) -> GroupReport:
    from .streams import BufferSink
    from .supervisor import run_box

    pipes = {
        b.name: os.pipe2(os.O_CLOEXEC)
        for b in boxes
        if any(other.stdin_from == b.name for other in boxes)
    }
    running: dict[str, tuple[int, int, int]] = {}  # name -> (pid, result fd, cancel fd)
    runner = os.getpid()
    try:
        for box in boxes:
            result_r, result_w = os.pipe2(os.O_CLOEXEC)
            cancel_r, cancel_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:  # this box's supervisor: single-threaded, like its parent
                code = 1
                try:
                    # Dies with the group runner, and its box with it (see child.py).
                    Kernel().set_pdeathsig(signal.SIGKILL)
                    if os.getppid() != runner:
                        os._exit(1)
                    # Keep only this box's pipe ends: a copy of a peer's write end held here
                    # would keep that peer's reader from ever seeing end of file.
                    keep = {pipes[box.stdin_from][0]} if box.stdin_from else set()
                    if box.name in pipes:
                        keep.add(pipes[box.name][1])
                    for fd in {fd for pair in pipes.values() for fd in pair} - keep:
                        os.close(fd)
                    for _, other_result, other_cancel in running.values():
                        os.close(other_result)
                        os.close(other_cancel)
                    # Only the runner holds the write end: its close is this box's cancel.
                    os.close(cancel_w)
                    stdin = (
                        pipes[box.stdin_from][0]
                        if box.stdin_from
                        else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    )
                    stdout = pipes[box.name][1] if box.name in pipes else BufferSink()
                    try:
                        result: object = run_box(
                            box.spec, stdin, stdout, BufferSink(), cancel_fd=cancel_r
                        )
                    except SandboxError as e:
                        result = e
                    os.write(result_w, pickle.dumps(result))
                    code = 0
                finally:
                    os._exit(code)
            os.close(result_w)
            os.close(cancel_r)
            running[box.name] = (pid, result_r, cancel_w)
    finally:
        for read_end, write_end in pipes.values():
            os.close(read_end)
            os.close(write_end)
    return _collect(group, running, cancel_fd)


def _collect(
    group: GroupSpec, running: dict[str, tuple[int, int, int]], cancel_fd: int | None
) -> GroupReport:
    reports: dict[str, Report] = {}
    errors: list[SandboxError] = []
    order: list[str] = []
    buffers = {name: bytearray() for name in running}
    by_fd = {fd: name for name, (_, fd, _) in running.items()}
    stop_at: float | None = None  # when the boxes still running are told to stop
    stopped = False
    watched = [] if cancel_fd is None else [cancel_fd]
    cancelled: set[str] = set()  # boxes whose cancel pipe was closed to stop them
    while by_fd:
        timeout = None if stop_at is None or stopped else max(stop_at - time.monotonic(), 0)
        ready, _, _ = select.select([*by_fd, *watched], [], [], timeout)
        for fd in ready:
            if fd == cancel_fd:  # the caller went away: every box still running is cancelled
                watched = []
                for name in by_fd.values():
                    os.close(running[name][2])  # end of file: cancelled
                    cancelled.add(name)
                stopped = True
                continue
            chunk = os.read(fd, 1 << 20)
            if chunk:
                buffers[by_fd[fd]] += chunk
                continue
            name = by_fd.pop(fd)
            os.close(fd)
            pid, _, cancel = running[name]
            os.waitpid(pid, 0)
            if name not in cancelled:
                os.close(cancel)
            result = pickle.loads(bytes(buffers[name])) if buffers[name] else None  # noqa: S301
            if isinstance(result, Report):
                reports[name] = result
            elif isinstance(result, SandboxError):
                errors.append(result)
            else:
                errors.append(SandboxError(f"box {name!r}: its supervisor died"))
            order.append(name)
            if stop_at is None:
                stop_at = time.monotonic() + group.peer_grace
        if stop_at is not None and not stopped and time.monotonic() >= stop_at:
            for name in by_fd.values():
                with contextlib.suppress(OSError):
                    os.write(running[name][2], b"p")  # a peer ended: stop (peer_exited)
            stopped = True
    if errors:
        raise errors[0]
    # Supervisors finish in whatever order they are scheduled; the programs' own end instants
    # (read in the boxes, one clock for all) say which really ended first.
    arrival = {name: i for i, name in enumerate(order)}
    order.sort(key=lambda n: (reports[n].ended_at or float("inf"), arrival[n]))
    return GroupReport(group.name, reports, order[0] if order else None, tuple(order))
