"""The library entry point: ``sandbox.run(argv, ...) -> Report``, safe from many threads.

Runs go through one helper process per library process (see ``helper.py``): the calling thread
never forks. Sending a run to the helper takes a short lock; everything else runs concurrently.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec

from . import helper, logs
from .errors import ConfigError, HostError, SandboxError
from .group import GroupReport, load_group
from .repeat import check_repeat, summarize
from .report import Report
from .request import Request, resolve
from .spec import Bind, Spec, WorkspaceRoot
from .streams import read_all, read_capture, sealed_input

if TYPE_CHECKING:
    from typing import Unpack

    from .limits import LimitKeywords
    from .workspace import Workspace

BindLike = Bind | tuple[str, str] | tuple[str, str, bool]
_P = ParamSpec("_P")


class _Helper:
    """The running helper process and its control socket, started on first use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None

    def submit(self, payload: bytes, fds: list[int]) -> None:
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            if self.control is None:
                raise HostError("the box helper did not start")
            socket.send_fds(self.control, [payload], fds)

    def _start(self) -> None:
        if self.control is not None:
            self.control.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # Same interpreter, same environment: the helper imports the package this process
            # imported, from where it is installed (or from PYTHONPATH if the caller set one).
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from sandbox.helper import main; main()",
                    str(theirs.fileno()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                cwd="/",
            )
        self.control = ours

    def reset_after_fork(self) -> None:
        """In a forked child the helper belongs to the parent: start our own when needed."""
        self.lock = threading.Lock()
        self.process = None
        self.control = None


_helper = _Helper()
os.register_at_fork(after_in_child=_helper.reset_after_fork)


def _as_bind(value: object, index: int) -> Bind:
    if isinstance(value, Bind):
        return value
    if (
        isinstance(value, tuple | list)
        and len(value) in (2, 3)
        and isinstance(value[0], str | os.PathLike)
        and isinstance(value[1], str)
        and (len(value) == 2 or isinstance(value[2], bool))
    ):
        writable = len(value) == 3 and bool(value[2])
        return Bind(str(Path(value[0]).absolute()), value[1], writable)
    raise ConfigError(
        "request",
        f"binds[{index}]",
        f"expected a Bind or a (source, target[, writable]) tuple, got {value!r}",
    )


def _check_fd(value: object, key: str, *, write: bool) -> None:
    """An open descriptor of this process, open for the direction the program uses."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("request", key, f"expected a file descriptor (int >= 0), got {value!r}")
    try:
        mode = fcntl.fcntl(value, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as e:
        raise ConfigError("request", key, f"descriptor {value} is not open: {e.strerror}") from None
    if mode == (os.O_RDONLY if write else os.O_WRONLY):
        needed = "writing" if write else "reading"
        raise ConfigError("request", key, f"descriptor {value} is not open for {needed}")


def _check_keywords(
    attributes: Mapping[str, object],
    stdin: object,
    outputs: Mapping[str, object],
    binds: object,
    env: object,
) -> None:
    """Each keyword's type and range, before anything is opened or sent."""
    for key, value in attributes.items():
        if not isinstance(value, str):
            raise ConfigError("request", key, f"expected a string, got {value!r}")
    if isinstance(stdin, int) and not isinstance(stdin, bool):
        _check_fd(stdin, "stdin", write=False)
    elif stdin is not None and not isinstance(stdin, bytes | bytearray | memoryview | str):
        raise ConfigError(
            "request", "stdin", f"expected bytes, str, a file descriptor or None, got {stdin!r}"
        )
    for key, value in outputs.items():
        if value is not None:
            _check_fd(value, key, write=True)
    if isinstance(binds, str | bytes) or not isinstance(binds, Sequence):
        raise ConfigError(
            "request",
            "binds",
            f"expected a list of (source, target) tuples, got {binds!r}",
            hint='binds=[("./src", "/box/src")]',
        )
    if env is not None and not isinstance(env, Mapping):
        raise ConfigError("request", "env", f"expected a mapping of NAME to value, got {env!r}")


def _stdin_fd(stdin: bytes | str | int | None) -> int:
    """A descriptor the helper may own for the program's stdin."""
    if stdin is None:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    if isinstance(stdin, int):
        return os.dup(stdin)
    return sealed_input(stdin.encode() if isinstance(stdin, str) else bytes(stdin))


@dataclass(frozen=True)
class _Prepared:
    """A checked and resolved :func:`run`; :meth:`requests` makes each run's request to the
    helper, the descriptors that go with it and the outputs it captures, as each run comes."""

    spec: Spec
    count: int
    stdin: bytes | str | int | None
    stdout: int | None
    stderr: int | None
    workspace: Workspace | None  # held for the runs: one user at a time

    def requests(self) -> Iterator[tuple[helper.Request, list[int], list[str]]]:
        for i in range(self.count):
            # The given descriptors get the first run's output; later runs are captured.
            stdout, stderr = (self.stdout, self.stderr) if i == 0 else (None, None)
            outputs = [os.dup(fd) for fd in (stdout, stderr) if fd is not None]
            request = helper.Request(self.spec, stdout is not None, stderr is not None)
            captured = [n for n, fd in (("stdout", stdout), ("stderr", stderr)) if fd is None]
            yield request, [_stdin_fd(self.stdin), *outputs], captured


def _prepare_run(
    argv: Sequence[str],
    *,
    profile: str | None = None,
    policy: str | Path | None = None,
    purpose: str | None = None,
    language: str | None = None,
    tenant: str | None = None,
    stdin: bytes | str | int | None = b"",
    stdout: int | None = None,
    stderr: int | None = None,
    binds: Sequence[BindLike] = (),
    env: Mapping[str, str] | None = None,
    image: str | None = None,
    repeat: int = 1,
    workspace: Workspace | None = None,
    **limits: Unpack[LimitKeywords],
) -> _Prepared:
    """Run ``argv`` in a new box and return its report (captured output in ``stdout``/``stderr``).

    ``profile`` names a profile (default ``strict``) or gives its path; with ``policy`` the
    policy picks the profile from ``purpose``/``language``/``tenant`` and clamps limits to its
    ceilings. ``stdin`` is bytes, text, a file descriptor (duplicated) or None (empty);
    ``stdout``/``stderr`` are captured into the report unless given a file descriptor to write
    to (the output limit applies either way). The limit keywords (one per limit of
    :data:`sandbox.limits.LIMITS`: ``wall_time``, ``cpu_time``, ``memory``, ``pids``, ...)
    override the profile's (sizes accept ``64M``, durations ``500ms``; None keeps the
    profile's). Raises
    :class:`~sandbox.errors.SandboxError` for invalid requests and hosts that cannot honour the
    profile; everything the program does is in the report's verdict. ``image`` runs on an
    image of the store (its Entrypoint/Cmd, Env and WorkingDir apply; an empty ``argv`` runs
    its command); ``root_size`` makes the root writable with that much room. ``repeat=N``
    runs the request in N fresh boxes and returns their summary (sandbox/repeat.py: median
    figures, the first failed run's outcome and output, every run in ``runs``); the given
    ``stdout``/``stderr`` descriptors get the first run's output. ``workspace`` (a
    :class:`~sandbox.Workspace`) is the work dir, kept across runs; :meth:`Workspace.run`
    passes it.
    """
    attributes = {
        k: v
        for k, v in (("purpose", purpose), ("language", language), ("tenant", tenant))
        if v is not None
    }
    _check_keywords(attributes, stdin, {"stdout": stdout, "stderr": stderr}, binds, env)
    count = check_repeat(repeat)
    spec = resolve(
        Request(
            argv=argv,  # resolve refuses a string (which list() would split into letters)
            profile=profile,
            policy=policy,
            attributes=attributes,
            binds=[_as_bind(b, i) for i, b in enumerate(binds)],
            limits={k: v for k, v in limits.items() if v is not None},
            env=env or {},
            image=image,
            workspace=_workspace_root(workspace),
        )
    )
    if count > 1 and isinstance(stdin, int):
        stdin = read_all(stdin)  # every run reads the same input from its start
    return _Prepared(spec, count, stdin, stdout, stderr, workspace)


def _blocking(prepare: Callable[_P, _Prepared]) -> Callable[_P, Report]:
    """The blocking call for ``prepare`` (whose arguments, signature and docstring it takes:
    :mod:`sandbox.aio` makes its awaitable from the same one)."""

    def run(*args: _P.args, **kwargs: _P.kwargs) -> Report:
        prepared = prepare(*args, **kwargs)
        ws = prepared.workspace
        with contextlib.nullcontext() if ws is None else ws.held():
            runs = [_finish_run(c, *_call(req, fds)) for req, fds, c in prepared.requests()]
        return summarize(runs)

    run.__qualname__ = run.__name__
    run.__doc__ = prepare.__doc__
    # prepare's signature, returning the report, for inspect and help()
    signature = inspect.signature(prepare).replace(return_annotation="Report")
    run.__signature__ = signature  # type: ignore[attr-defined]
    return run


run = _blocking(_prepare_run)


def _workspace_root(workspace: object) -> WorkspaceRoot | None:
    from .workspace import Workspace

    if workspace is None:
        return None
    if not isinstance(workspace, Workspace):
        raise ConfigError("request", "workspace", f"expected a Workspace, got {workspace!r}")
    return workspace.root


def _finish_run(captured: list[str], result: object, captures: list[int]) -> Report:
    """The report of a run from the helper's answer, with the ``captured`` outputs read."""
    if not isinstance(result, Report) or len(captures) != len(captured):
        for fd in captures:
            os.close(fd)
        raise HostError("the box helper sent an unexpected answer")
    texts = dict(zip(captured, (read_capture(fd) for fd in captures), strict=True))
    result = replace(result, stdout=texts.get("stdout"), stderr=texts.get("stderr"))
    logs.log_run(result)
    return result


def run_group(path: str | Path) -> GroupReport:
    """Run the group file at ``path`` (see :mod:`sandbox.group`) and return every box's report.

    Raises :class:`~sandbox.errors.ConfigError` for an invalid group file, naming the file,
    the box and the key.
    """
    return _finish_group(*_call(*_prepare_group(path)))


def _prepare_group(path: str | Path) -> tuple[helper.Request, list[int]]:
    return helper.Request(None, group=load_group(path)), [_stdin_fd(None)]


def _finish_group(result: object, captures: list[int]) -> GroupReport:
    for fd in captures:
        os.close(fd)
    if not isinstance(result, GroupReport):
        raise HostError("the box helper sent an unexpected answer")
    for report in result.reports.values():
        logs.log_run(report)
    return result


def _call(request: helper.Request, fds: list[int]) -> tuple[object, list[int]]:
    """Send ``request`` with ``fds`` (which this closes) to the helper and wait for its answer
    (and the descriptors of captured output that come with it)."""
    with _send(request, fds) as ours:
        try:
            answer = helper.receive_result(ours)
        except OSError as e:
            raise _receive_failed(e) from None
    return _answer(*answer)


def _send(request: helper.Request, fds: list[int]) -> socket.socket:
    """Send ``request`` with ``fds`` (which this closes) to the helper; returns the socket its
    answer comes on. Closing that socket before the answer cancels the run."""
    payload = pickle.dumps(request)
    try:
        if len(payload) > helper.MAX_REQUEST:
            raise _too_large(len(payload))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            try:
                _helper.submit(payload, [theirs.fileno(), *fds])
            except BaseException:
                ours.close()
                raise
    except OSError as e:
        if e.errno == errno.EMSGSIZE:  # over the control socket's send buffer
            raise _too_large(len(payload)) from None
        raise HostError(f"cannot reach the box helper: {e.strerror or e}") from None
    finally:
        for fd in fds:
            os.close(fd)
    return ours


def _receive_failed(e: OSError) -> HostError:
    """The error for an answer that could not be read (ConnectionError: the helper died)."""
    if isinstance(e, ConnectionError):
        return HostError(f"the box helper failed: {e}")
    return HostError(f"cannot reach the box helper: {e.strerror or e}")


def _answer(result: object, captures: list[int]) -> tuple[object, list[int]]:
    """The helper's answer, or the SandboxError it sent raised here."""
    if isinstance(result, SandboxError):
        for fd in captures:
            os.close(fd)
        raise result
    return result, captures


def _too_large(size: int) -> ConfigError:
    return ConfigError(
        "request",
        "argv",
        f"the run is too large to send to the box helper ({size} bytes with its command and "
        "environment; the control socket takes about 200 KiB)",
        hint="pass large data through stdin or a bound file",
    )
