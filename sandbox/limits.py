"""The limit registry: one entry per limit, and everything about limits derived from it.

Each field of :class:`Limits` is one limit's entry (:func:`limit`): its unit and parser, CLI flag
and help, how a policy ceiling orders it, which backends enforce it with and without a cgroup,
the rlimit it sets, and the verdict when it fires. The profile and policy parsers
(:func:`parse_limits`), the CLI flags, ``sandbox.run``'s keywords, policy clamping
(:func:`clamp_to`), the program's rlimits (box/rlimits.py) and the kill-verdict map
(verdict.py) all read :data:`LIMITS`. What a backend actually set, it reports itself as an
:class:`~sandbox.report.AppliedLimit` (box/cgroups.py, box/rlimits.py, box/treelimits.py,
box/plan.py, supervisor.py); docs/limits.md says how to add a limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, NamedTuple, TypedDict

from .report import StopReason, Verdict
from .units import (
    format_cpu_list,
    format_duration,
    format_size,
    parse_cpu_list,
    parse_duration,
    parse_size,
)


class Unit(StrEnum):
    """What a limit's value counts, which says how it is parsed and shown."""

    SECONDS = "seconds"  # 2, 2.5s, 500ms
    BYTES = "bytes"  # 64M, 1G
    COUNT = "count"  # a whole number
    CPUS = "cpus"  # CPUs' worth of time: 1.5
    CPU_LIST = "cpu list"  # 0-1,3


class Order(StrEnum):
    """How a policy ceiling bounds a limit."""

    ORDERED = "ordered"  # a larger value is lowered to the ceiling, an absent one set to it
    ABSENT_IS_TIGHTEST = "absent is tightest"  # absent stays absent; a larger value is lowered
    UNORDERED = "unordered"  # no order, so a policy cannot put a ceiling on it


class Enforcer(StrEnum):
    """Which part of the sandbox enforces a limit (and reports the mechanism it used)."""

    SUPERVISOR = "supervisor"  # deadlines and pipe counts (supervisor.py)
    CGROUP = "cgroup"  # the box's cgroup (box/cgroups.py)
    RLIMIT = "rlimit"  # setrlimit(2) on the program (box/rlimits.py)
    BOX_INIT = "box init"  # the box's init sampling the tree, without a cgroup (box/treelimits.py)
    MOUNTS = "mounts"  # tmpfs sizes of the box's root (box/mounts.py)


# A NamedTuple rather than a dataclass: made at import several times faster, and every run
# imports this module (docs/performance.md).
class Limit(NamedTuple):
    """One limit's entry in the registry (see :func:`limit`)."""

    name: str
    unit: Unit
    flag: str
    help: str
    order: Order
    enforcers: tuple[Enforcer, ...]  # with a cgroup
    without_cgroup: tuple[Enforcer, ...]  # with ``fallback = "rlimit"`` and no cgroup
    verdict: Verdict | None  # when a kill for it ends the run
    rlimit: str | None  # RLIMIT_<rlimit> set on the program
    fallback_rlimit: str | None  # RLIMIT_<...> set in its place without a cgroup
    floor: int  # the smallest value that is not surely a mistake (sizes)
    most: int  # the largest value the kernel accepts (counts)
    zero: bool  # 0 is a valid value (and means "none")
    unset: str  # how an absent value reads

    @property
    def needs_fallback(self) -> bool:
        """Without a cgroup, a per-process rlimit stands in for it: only a profile with
        ``fallback = "rlimit"`` may run it so."""
        return Enforcer.RLIMIT in self.without_cgroup and Enforcer.RLIMIT not in self.enforcers

    @property
    def reason(self) -> StopReason | None:
        """The stop reason a kill for this limit records, if the sandbox kills for it."""
        return StopReason(self.name) if self.verdict is not None else None

    def parse(self, value: object) -> Any:
        """The value in :class:`Limits` units; ``ValueError`` with a sentence a user can act on."""
        if self.zero and not isinstance(value, bool) and value in (0, "0", "0s", "0ms"):
            return 0.0 if self.unit is Unit.SECONDS else 0
        if self.unit is Unit.SECONDS:
            return parse_duration(value)
        if self.unit is Unit.BYTES:
            return _size(value, self.floor)
        if self.unit is Unit.COUNT:
            return _count(value, self.most)
        if self.unit is Unit.CPUS:
            return _cpus(value)
        return parse_cpu_list(value)

    def format(self, value: object) -> str:
        """The value as a person reads it: ``256M``, ``2.5s``, ``1.5 CPUs``, ``none``."""
        if value is None:
            return self.unset
        if self.unit is Unit.BYTES and isinstance(value, int):
            text = format_size(value)
            return text if not text.isdigit() else f"{text} bytes"
        if self.unit is Unit.SECONDS and isinstance(value, int | float):
            return format_duration(float(value))
        if self.unit is Unit.CPUS and isinstance(value, float):
            return f"{value:g} CPUs"
        if self.unit is Unit.CPU_LIST and isinstance(value, tuple):
            return format_cpu_list(value)
        return str(value)


def limit(
    default: Any,
    unit: Unit,
    flag: str,
    help: str,
    *,
    enforcers: tuple[Enforcer, ...],
    without_cgroup: tuple[Enforcer, ...] | None = None,
    order: Order = Order.ORDERED,
    verdict: Verdict | None = None,
    rlimit: str | None = None,
    fallback_rlimit: str | None = None,
    floor: int = 1,
    most: int = 0,
    zero: bool = False,
    unset: str = "none",
) -> Any:
    """A field of :class:`Limits` carrying its registry entry (named after the field)."""
    entry = Limit(
        "",
        unit,
        flag,
        help,
        order,
        enforcers,
        enforcers if without_cgroup is None else without_cgroup,
        verdict,
        rlimit,
        fallback_rlimit,
        floor,
        most,
        zero,
        unset,
    )
    return field(default=default, metadata={"limit": entry})


_SUPERVISOR, _CGROUP, _RLIMIT = Enforcer.SUPERVISOR, Enforcer.CGROUP, Enforcer.RLIMIT
_BOX_INIT, _MOUNTS = Enforcer.BOX_INIT, Enforcer.MOUNTS


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits, in seconds, bytes and counts; ``None`` means the profile sets none
    (only allowed where documented). Each field is one entry of the registry."""

    wall_time: float = limit(
        10.0,
        Unit.SECONDS,
        "--wall-time",
        "seconds (2, 2.5s, 500ms)",
        enforcers=(_SUPERVISOR,),
        verdict=Verdict.WALL_TIME_LIMIT,
    )
    cpu_time: float | None = limit(
        None,
        Unit.SECONDS,
        "--cpu-time",
        "seconds of CPU, all threads",
        enforcers=(_SUPERVISOR,),  # a deadline on the cgroup's CPU figure
        without_cgroup=(_BOX_INIT,),
        verdict=Verdict.CPU_TIME_LIMIT,
    )
    memory: int | None = limit(
        None,
        Unit.BYTES,
        "--memory",
        "bytes (64M, 1G)",
        enforcers=(_CGROUP,),
        without_cgroup=(_RLIMIT, _BOX_INIT),
        verdict=Verdict.MEMORY_LIMIT,
        fallback_rlimit="AS",
        floor=1 << 20,  # a box needs about a megabyte to exec anything
    )
    pids: int | None = limit(
        None,
        Unit.COUNT,
        "--pids",
        "tasks (threads count)",
        enforcers=(_CGROUP,),
        without_cgroup=(_RLIMIT,),
        fallback_rlimit="NPROC",
        most=1 << 22,  # PID_MAX_LIMIT on 64-bit
    )
    # isolate's -m and DMOJ's memory limit: each process's address space (RLIMIT_AS), so a
    # large malloc or new fails inside the program instead of the kernel killing it.
    address_space: int | None = limit(
        None,
        Unit.BYTES,
        "--address-space",
        "address space of each process (RLIMIT_AS: a large malloc fails in the program)",
        enforcers=(_RLIMIT,),
        rlimit="AS",
        floor=1 << 20,
    )
    fsize: int | None = limit(
        None, Unit.BYTES, "--fsize", "largest file", enforcers=(_RLIMIT,), rlimit="FSIZE"
    )
    open_files: int | None = limit(
        None,
        Unit.COUNT,
        "--open-files",
        "descriptors",
        enforcers=(_RLIMIT,),
        rlimit="NOFILE",
        most=1 << 20,  # nr_open's default
    )
    stack: int | None = limit(
        None,
        Unit.BYTES,
        "--stack",
        "stack size",
        enforcers=(_RLIMIT,),
        rlimit="STACK",
        floor=64 << 10,  # a dynamic loader needs some stack
    )
    output: int | None = limit(
        None,
        Unit.BYTES,
        "--output-limit",
        "bytes per output stream",
        enforcers=(_SUPERVISOR,),
        verdict=Verdict.OUTPUT_LIMIT,
    )
    tmp_size: int = limit(
        16 << 20, Unit.BYTES, "--tmp-size", "size of /tmp", enforcers=(_MOUNTS,), floor=4 << 10
    )
    work_size: int = limit(
        16 << 20,
        Unit.BYTES,
        "--work-size",
        "size of the work dir",
        enforcers=(_MOUNTS,),
        floor=4 << 10,
    )
    # Grace after a time limit before the kill (isolate's --extra-time).
    extra_time: float = limit(
        0.0,
        Unit.SECONDS,
        "--extra-time",
        "grace seconds before a time limit kills (still a time-limit verdict)",
        enforcers=(_SUPERVISOR,),
        zero=True,
    )
    cpu_quota: float | None = limit(
        None,
        Unit.CPUS,
        "--cpu-quota",
        "CPUs' worth of time (1.5 = one and a half CPUs)",
        enforcers=(_CGROUP,),
        without_cgroup=(),
    )
    cpus: tuple[int, ...] | None = limit(
        None,
        Unit.CPU_LIST,
        "--cpus",
        "CPUs to pin the box to (0-1,3)",
        enforcers=(_CGROUP,),
        without_cgroup=(),
        order=Order.UNORDERED,
        unset="all",
    )
    # A writable root of this size (a tmpfs upper); read-only if None.
    root_size: int | None = limit(
        None,
        Unit.BYTES,
        "--root-size",
        "make the root writable, with this much room (thrown away after the run)",
        enforcers=(_MOUNTS,),
        order=Order.ABSENT_IS_TIGHTEST,
        floor=4 << 10,
        unset="none (read-only root)",
    )

    def merged(self, **overrides: object) -> Limits:
        """Return a copy with the given limits replaced (``None`` values are ignored)."""
        changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **changes)


#: The registry: every limit's entry, in the order of :class:`Limits`.
LIMITS: Mapping[str, Limit] = {
    f.name: f.metadata["limit"]._replace(name=f.name) for f in fields(Limits)
}


class LimitKeywords(TypedDict, total=False):
    """``sandbox.run``'s limit keywords, for type checkers: one per entry of :data:`LIMITS`
    (a test keeps the two equal)."""

    wall_time: float | str | None
    cpu_time: float | str | None
    memory: int | str | None
    pids: int | None
    address_space: int | str | None
    fsize: int | str | None
    open_files: int | None
    stack: int | str | None
    output: int | str | None
    tmp_size: int | str | None
    work_size: int | str | None
    extra_time: float | str | None
    cpu_quota: float | None
    cpus: str | list[int] | None
    root_size: int | str | None


def parse_limits(
    values: Mapping[str, Any], fail: Callable[[str, str], Exception]
) -> dict[str, Any]:
    """Validate limit values from any source (profile, policy, CLI, API) into Limits units;
    ``fail(key, problem)`` makes the error to raise."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        entry = LIMITS.get(key)
        if entry is None:
            raise fail(key, "unknown limit (expected one of " + ", ".join(LIMITS) + ")")
        try:
            out[key] = entry.parse(value)
        except ValueError as e:
            raise fail(key, str(e)) from None
    return out


def clamp_to(
    limits: Limits, ceilings: Mapping[str, float | int]
) -> tuple[Limits, list[tuple[str, object, float | int]]]:
    """``limits`` bounded by ``ceilings``, and (name, asked, ceiling) for each one lowered."""
    changes: dict[str, float | int] = {}
    lowered: list[tuple[str, object, float | int]] = []
    for name, ceiling in ceilings.items():
        value = getattr(limits, name)
        if value is None and LIMITS[name].order is Order.ABSENT_IS_TIGHTEST:
            continue
        if value is None or value > ceiling:
            changes[name] = ceiling
            lowered.append((name, value, ceiling))
    return limits.merged(**changes), lowered


_DIGITS = re.compile(r"^\s*\d+\s*$")


def _size(value: object, floor: int) -> int:
    size = parse_size(value)
    if size >= floor:
        return size
    unitless = isinstance(value, int) or (isinstance(value, str) and _DIGITS.match(value))
    shown = format_size(floor)
    if unitless and size > 0:
        raise ValueError(
            f"{size} bytes is below the {shown} floor of this limit: did you mean {size}M?"
        )
    raise ValueError(f"expected a size of at least {shown}, got {value!r}")


def _count(value: object, most: int) -> int:
    if isinstance(value, str) and _DIGITS.match(value):  # the command line gives strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
        raise ValueError(f"expected a whole number > 0 and at most {most}, got {value!r}")
    return value


def _cpus(value: object) -> float:
    try:
        quota = float(value) if not isinstance(value, bool) else -1.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        quota = -1.0
    if not math.isfinite(quota) or not 0.01 <= quota <= 4096:
        raise ValueError(f"expected a number of CPUs from 0.01 to 4096, got {value!r}")
    return quota
