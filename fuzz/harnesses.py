"""Fuzz targets for every parser of untrusted or user-written input that exists today.

Each target takes bytes and may only fail with the project's documented exceptions
(``ConfigError`` for files and requests, ``ProtocolError`` for box messages, ``ValueError`` for
the unit parsers); anything else is a finding. ``fuzz/fuzz.py`` runs them under atheris and
``tests/unit/test_fuzz_corpus.py`` replays ``fuzz/corpus/<target>/`` on every test run.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

from sandbox import protocol
from sandbox.errors import ConfigError
from sandbox.group import load_group
from sandbox.meta import render_meta
from sandbox.policy import load_policy
from sandbox.profiles import load_profile
from sandbox.report import AppliedLimit, Report, Verdict
from sandbox.units import parse_cpu_list, parse_duration, parse_size

_SCRATCH = Path(tempfile.mkdtemp(prefix="sandbox-fuzz-"))


def _as_file(data: bytes, name: str) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def profile(data: bytes) -> None:
    """A profile file, resolved (extends is looked up on the normal search path)."""
    with contextlib.suppress(ConfigError):
        load_profile(str(_as_file(data, "fuzzed.toml")))


def policy(data: bytes) -> None:
    """A policy file, then a selection with fixed attributes."""
    with contextlib.suppress(ConfigError):
        load_policy(_as_file(data, "policy.toml")).select({"purpose": "run", "language": "c"})


def group(data: bytes) -> None:
    """A group file (boxes resolved against the bundled profiles)."""
    with contextlib.suppress(ConfigError):
        load_group(_as_file(data, "group.toml"))


def message(data: bytes) -> None:
    """One parent/child protocol message; a decoded one must encode back to the same thing."""
    try:
        decoded = protocol.decode(data)
    except protocol.ProtocolError:
        return
    again = protocol.decode(protocol.encode(decoded.kind, **decoded.fields))
    if again != decoded:
        raise AssertionError(f"round trip changed {decoded} into {again}")


def units(data: bytes) -> None:
    """Sizes, durations and CPU lists from text."""
    text = data.decode("utf-8", errors="replace")
    for parse in (parse_size, parse_duration, parse_cpu_list):
        with contextlib.suppress(ValueError):
            parse(text)


def meta(data: bytes) -> None:
    """The isolate meta writer: any report renders to key:value lines that parse back."""
    raw = (data + bytes(32))[:32]
    verdicts = list(Verdict)
    report = Report(
        verdict=verdicts[raw[0] % len(verdicts)],
        exit_code=raw[1] if raw[2] % 2 else None,
        signal=raw[3] % 65 or None,
        cpu_time=int.from_bytes(raw[4:8], "little") / 1e6,
        cpu_user=0.0,
        cpu_system=0.0,
        wall_time=int.from_bytes(raw[8:12], "little") / 1e6,
        memory_peak=int.from_bytes(raw[12:20], "little") or None,
        max_rss=int.from_bytes(raw[20:24], "little") or None,
        pids_peak=None,
        oom_killed=bool(raw[24] % 2),
        forbidden_syscall=data[32:].decode(errors="replace") or None,
        profile="fuzz",
        profile_hash="sha256:0",
        cgroup="none",
        limits={"wall_time": AppliedLimit(1.0, "fuzz")},
        limit_fired="wall_time" if raw[25] % 2 else None,
        error=data[32:].decode(errors="replace") or None,
    )
    lines = render_meta(report).splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    if len(fields) != len(lines) or float(fields["time"]) != round(report.cpu_time, 3):
        raise AssertionError(f"meta file does not parse back: {lines}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "profile": profile,
    "policy": policy,
    "group": group,
    "message": message,
    "units": units,
    "meta": meta,
}
CORPUS = Path(__file__).resolve().parent / "corpus"


def corpus(target: str) -> list[Path]:
    """The stored inputs of a target (seeds and every crash input found so far)."""
    directory = CORPUS / target
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []

