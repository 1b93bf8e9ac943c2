"""Structured log events (structlog). The library only emits; the CLI configures output."""

from __future__ import annotations

import logging
import sys
from typing import Any

from .report import Report


def run_event(report: Report) -> dict[str, Any]:
    """The key fields of a report, as logged once per run."""
    return {
        "verdict": report.verdict.value,
        "exit_code": report.exit_code,
        "signal": report.signal_name,
        "cpu_time": report.cpu_time,
        "wall_time": report.wall_time,
        "memory_peak": report.memory_peak,
        "forbidden_syscall": report.forbidden_syscall,
        "profile": report.profile,
        "limit_fired": report.limit_fired,
        "setup_time": report.setup_time,
    }


def log_run(report: Report) -> None:
    """Emit the one ``box_finished`` event of a run."""
    import structlog  # here, not at import: it costs the CLI 25 ms when logging is off

    structlog.get_logger("sandbox").info("box_finished", **run_event(report))


def configure(fmt: str, level: str) -> None:
    """CLI only: render events as JSON lines or for a console, to stderr."""
    import structlog

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
