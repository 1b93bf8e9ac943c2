"""isolate-compatible meta files (``--meta FILE``), so CMS- or judge0-style callers can switch.

isolate writes one ``key:value`` per line; the keys written here have isolate's meaning:
``time`` and ``time-wall`` (seconds), ``max-rss`` and ``cg-mem`` (KiB), ``cg-oom-killed``,
``exitcode``, ``exitsig``, ``killed``, ``status`` (RE, SG, TO, XX) and ``message``.
"""

from __future__ import annotations

from .report import Report, Verdict

_STATUS = {
    Verdict.RUNTIME_ERROR: "RE",
    Verdict.SIGNALED: "SG",
    Verdict.FORBIDDEN_SYSCALL: "SG",
    Verdict.MEMORY_LIMIT: "SG",
    Verdict.CPU_TIME_LIMIT: "TO",
    Verdict.WALL_TIME_LIMIT: "TO",
    Verdict.OUTPUT_LIMIT: "SG",
    Verdict.SANDBOX_ERROR: "XX",
}
_MESSAGES = {
    Verdict.CPU_TIME_LIMIT: "Time limit exceeded",
    Verdict.WALL_TIME_LIMIT: "Time limit exceeded (wall clock)",
    Verdict.MEMORY_LIMIT: "Memory limit exceeded",
    Verdict.OUTPUT_LIMIT: "Output limit exceeded",
}


def render_meta(report: Report) -> str:
    """The meta file for ``report``, in isolate's format."""
    lines = [f"time:{report.cpu_time:.3f}", f"time-wall:{report.wall_time:.3f}"]
    if report.max_rss is not None:
        lines.append(f"max-rss:{report.max_rss // 1024}")
    if report.memory_peak is not None:
        lines.append(f"cg-mem:{report.memory_peak // 1024}")
    if report.oom_killed:
        lines.append("cg-oom-killed:1")
    if report.exit_code is not None:
        lines.append(f"exitcode:{report.exit_code}")
    if report.signal is not None:
        lines.append(f"exitsig:{report.signal}")
    if report.limit_fired is not None:
        lines.append("killed:1")
    status = _STATUS.get(report.verdict)
    if status is not None:
        lines.append(f"status:{status}")
    message = _message(report)
    if message:
        lines.append("message:" + " ".join(message.split()))  # one line, as isolate's
    return "\n".join(lines) + "\n"


def _message(report: Report) -> str | None:
    if report.verdict in _MESSAGES:
        return _MESSAGES[report.verdict]
    if report.verdict is Verdict.FORBIDDEN_SYSCALL:
        return f"Forbidden syscall {report.forbidden_syscall or 'unknown'}"
    if report.verdict is Verdict.SIGNALED:
        return f"Caught fatal signal {report.signal}"
    if report.verdict is Verdict.RUNTIME_ERROR:
        return report.error or f"Exited with error status {report.exit_code}"
    return report.error
