"""Parsing of sizes (``64M``) and durations (``1.5`` seconds, ``500ms``) shared by every input."""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_SECONDS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0}


def parse_size(value: object) -> int:
    """Return a byte count from an int or a string such as ``512K``, ``64M``, ``1G`` (binary).

    Raises ``ValueError`` with a sentence a user can act on.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 64M, got {value!r}")
    if isinstance(value, int):
        # Bounded like a written size: a larger one wraps in the kernel's counters (tmpfs
        # takes size=2^70 as 0, which means unlimited).
        if not 0 <= value < (1 << 62):
            raise ValueError(f"expected a size from 0 to 4 EiB, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            number = float(m.group(1)) * _FACTORS[m.group(2).upper()]
            if math.isfinite(number) and number < (1 << 62):
                return int(number)
    raise ValueError(f"expected a size such as 64M or 1G, got {value!r}")


def parse_duration(value: object) -> float:
    """Return seconds from a number or a string such as ``2``, ``2.5s``, ``500ms``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration in seconds, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 2, 2.5s or 500ms, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 365 * 86400:
        raise ValueError(f"expected a duration > 0 and at most a year, got {value!r}")
    return seconds


def parse_cpu_list(value: object) -> tuple[int, ...]:
    """CPU numbers from ``"0-2,5"`` or ``[0, 1]`` (sorted, without duplicates)."""
    cpus: set[int] = set()
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        cpus.update(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*", value):
        for part in value.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            if high > 4095 or low > high:  # checked before the range is built (fuzzing found it)
                raise ValueError(f"expected CPU numbers from 0 to 4095 in order, got {part!r}")
            cpus.update(range(low, high + 1))
    else:
        raise ValueError(f"expected a CPU list such as 0-1,3, got {value!r}")
    if not cpus or min(cpus) < 0 or max(cpus) > 4095:
        raise ValueError(f"expected CPU numbers from 0 to 4095, got {value!r}")
    return tuple(sorted(cpus))


def format_cpu_list(cpus: tuple[int, ...]) -> str:
    """The kernel's list format: ``(0, 1, 2, 5)`` -> ``0-2,5``."""
    parts: list[str] = []
    for cpu in cpus:
        if parts and cpu == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def format_size(value: int) -> str:
    """Render a byte count the way a user would write it (``64M``)."""
    for suffix, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value and value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)


def format_duration(seconds: float) -> str:
    """Render seconds the way a user would write them (``10s``, ``250ms``, ``1.5s``)."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
