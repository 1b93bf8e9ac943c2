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
    """Emit the one ``box_finished`` event of a run.

    To structlog when the application configured it (the CLI does); otherwise to the standard
    ``logging`` logger ``sandbox`` at INFO (the event's fields in ``record.sandbox_event``), which
    an application that configured nothing never sees: unconfigured structlog would print every
    run to stdout, into a judge's own output.
    """
    import structlog  # here, not at import: it costs the CLI 25 ms when logging is off

    event = run_event(report)
    if structlog.is_configured():
        structlog.get_logger("sandbox").info("box_finished", **event)
        return
    logger = logging.getLogger("sandbox")
    if logger.isEnabledFor(logging.INFO):
        fields = " ".join(f"{k}={v}" for k, v in event.items())
        logger.info("box_finished %s", fields, extra={"sandbox_event": event})


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
