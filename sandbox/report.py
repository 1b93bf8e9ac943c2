"""The outcome of one run: a verdict with exact figures, serializable as versioned JSON."""

from __future__ import annotations

import errno
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from .errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SANDBOX_ERROR

SCHEMA_VERSION = 2


class Verdict(StrEnum):
    """How the run ended, from the program's point of view (``sandbox_error``: ours)."""

    OK = "ok"
    RUNTIME_ERROR = "runtime_error"
    SIGNALED = "signaled"
    CPU_TIME_LIMIT = "cpu_time_limit"
    WALL_TIME_LIMIT = "wall_time_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    FORBIDDEN_SYSCALL = "forbidden_syscall"
    SANDBOX_ERROR = "sandbox_error"


class StopReason(StrEnum):
    """Why the supervisor (or, without a cgroup, the box's init) stopped a box: the report's
    ``limit_fired``. A limit's reason is named after the limit (sandbox/limits.py)."""

    WALL_TIME = "wall_time"
    CPU_TIME = "cpu_time"
    MEMORY = "memory"
    OUTPUT = "output"
    FORBIDDEN_SYSCALL = "forbidden_syscall"
    PEER_EXITED = "peer_exited"  # a group's grace period after a peer ended ran out
    CANCELLED = "cancelled"  # the caller went away
    SETUP = "setup"  # the box's setup took too long


class CgroupHierarchy(StrEnum):
    """Which cgroup hierarchy enforced the box's limits (the report's ``cgroup``)."""

    V1 = "cgroup1"
    V2 = "cgroup2"
    NONE = "none"  # no cgroup: rlimits and the box init (``fallback = "rlimit"``)


@dataclass(frozen=True)
class AppliedLimit:
    """One limit as applied to the run and the mechanism that enforced it."""

    value: float | int | None
    mechanism: str


@dataclass(frozen=True)
class SetupFailure:
    """Where the box's setup failed: the phase (a step of the box's, or of the supervisor's
    around it), the operation in it, the errno it got (0 when no system call failed) and a
    detail (the kernel's text, or why)."""

    phase: str
    operation: str
    errno: int
    detail: str = ""

    @property
    def errno_name(self) -> str | None:
        """The errno's symbol, e.g. ``EACCES`` (None for 0 or a number Python does not know)."""
        return errno.errorcode.get(self.errno) if self.errno else None

    def message(self) -> str:
        """The one line the CLI prints and the meta file carries."""
        reason = self.detail or os.strerror(self.errno)
        return f"box setup failed in phase {self.phase}: {self.operation}: {reason}"

    def to_dict(self) -> dict[str, Any]:
        """The report's ``setup_error`` object."""
        return {**asdict(self), "errno_name": self.errno_name}


@dataclass(frozen=True)
class Report:
    """Everything known about a finished run. ``stdout``/``stderr`` are set for captured output."""

    verdict: Verdict
    exit_code: int | None
    signal: int | None
    cpu_time: float
    cpu_user: float
    cpu_system: float
    wall_time: float
    memory_peak: int | None
    max_rss: int | None
    pids_peak: int | None
    oom_killed: bool
    forbidden_syscall: str | None
    profile: str
    profile_hash: str
    cgroup: CgroupHierarchy
    limits: dict[str, AppliedLimit]
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    limit_fired: StopReason | None = None
    error: str | None = None
    #: For a ``sandbox_error`` in the box's setup: where it failed (``error`` is its line).
    setup_error: SetupFailure | None = None
    setup_time: float = 0.0
    clamped: tuple[str, ...] = ()
    host: dict[str, str | int | None] = field(default_factory=dict)
    image: str | None = None  # the manifest digest of the image the root was made of
    #: CLOCK_MONOTONIC instant the program ended (or was stopped): orders a group's boxes.
    ended_at: float | None = field(default=None, repr=False, compare=False)
    stdout: bytes | None = field(default=None, repr=False)
    stderr: bytes | None = field(default=None, repr=False)
    #: With ``repeat=N`` (sandbox/repeat.py): every run's own report; this one summarizes them.
    runs: tuple[Report, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"SIG{self.signal}"

    def cli_exit_code(self) -> int:
        """The exit code ``sandbox exec`` ends with (docs/architecture.md, "Exit codes")."""
        if self.verdict is Verdict.SANDBOX_ERROR:
            return EXIT_SANDBOX_ERROR
        if self.signal is not None:
            return 128 + self.signal
        if self.exit_code is None:
            return EXIT_SANDBOX_ERROR
        return self.exit_code

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema ``SCHEMA_VERSION``), without captured output."""
        data = asdict(self)
        del data["stdout"], data["stderr"], data["ended_at"]
        data["verdict"] = self.verdict.value
        data["cgroup"] = self.cgroup.value
        data["limit_fired"] = None if self.limit_fired is None else self.limit_fired.value
        data["signal_name"] = self.signal_name
        data["schema"] = SCHEMA_VERSION
        data["setup_error"] = self.setup_error.to_dict() if self.setup_error else None
        data["runs"] = [run.to_dict() for run in self.runs]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def exec_failure_exit_code(err: int) -> int:
    """127 when the program does not exist, 126 when it exists but cannot be executed."""
    return EXIT_NOT_FOUND if err in (errno.ENOENT, errno.ENOTDIR) else EXIT_CANNOT_EXECUTE
