"""Repeated runs (``repeat=N``, ``sandbox exec --repeat N``): the same request in N fresh
boxes, summarized the way timing-sensitive judges read it (judge0's ``number_of_runs``).

The summary is a :class:`~sandbox.report.Report` whose figures are the medians of the runs and
whose outcome (verdict, exit code, signal, what fired, errors) is the first run's that was not
``ok`` (or the first run's when all were): a solution that fails once fails. Its ``runs`` holds
every run's own report, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .errors import ConfigError
from .report import Report, Verdict

#: The most runs one request may ask for.
MAX_REPEAT = 100


def check_repeat(value: object, key: str = "repeat") -> int:
    """``value`` as a number of runs, or a ConfigError naming ``key``."""
    if isinstance(value, str) and value.strip().isdigit():  # the command line gives strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPEAT:
        raise ConfigError(
            "request", key, f"expected a number of runs from 1 to {MAX_REPEAT}, got {value!r}"
        )
    return value


def summarize(runs: Sequence[Report]) -> Report:
    """One report for ``runs`` (at least one): median figures, the first failure's outcome."""
    if len(runs) == 1:
        return runs[0]
    import statistics  # here: a single run (every CLI exec) never pays for its import
    outcome = next((r for r in runs if r.verdict is not Verdict.OK), runs[0])

    def median(values: Sequence[float]) -> float:
        return round(statistics.median(values), 6)

    def median_of(values: Sequence[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return statistics.median_low(known) if known else None

    return replace(
        outcome,
        cpu_time=median([r.cpu_time for r in runs]),
        cpu_user=median([r.cpu_user for r in runs]),
        cpu_system=median([r.cpu_system for r in runs]),
        wall_time=median([r.wall_time for r in runs]),
        setup_time=median([r.setup_time for r in runs]),
        memory_peak=median_of([r.memory_peak for r in runs]),
        max_rss=median_of([r.max_rss for r in runs]),
        pids_peak=median_of([r.pids_peak for r in runs]),
        runs=tuple(runs),
    )
