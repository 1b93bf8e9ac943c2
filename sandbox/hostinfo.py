"""Facts about the host that affect timing, recorded in every report (read once per process)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


@functools.cache
def host_facts() -> dict[str, str | int | None]:
    """Kernel, CPU model and count, SMT, frequency governor (None where not readable)."""
    model = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "kernel": os.uname().release,
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "smt": _read("/sys/devices/system/cpu/smt/active"),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
    }
