"""Fuzz targets for every parser of untrusted or user-written input.

Each target takes bytes and may only fail with the project's documented exceptions
(``ConfigError`` for files and requests, ``ProtocolError`` for box messages, ``ValueError`` for
the unit parsers, ``ImageError`` for build files, layers, OCI documents and registry answers);
anything else is a finding. ``fuzz/fuzz.py`` runs them under atheris and
``tests/unit/test_fuzz_corpus.py`` replays ``fuzz/corpus/<target>/`` on every test run.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from sandbox import boxinit, protocol
from sandbox.errors import ConfigError, ImageError
from sandbox.group import load_group
from sandbox.image import oci, registry
from sandbox.image.buildfile import parse_buildfile
from sandbox.image.extract import extract_layer
from sandbox.image.tarstream import Budget
from sandbox.meta import render_meta
from sandbox.native.build import build_parser_harness
from sandbox.policy import load_policy
from sandbox.profiles import load_profile
from sandbox.report import AppliedLimit, CgroupHierarchy, Report, StopReason, Verdict
from sandbox.units import parse_cpu_list, parse_duration, parse_size

_SCRATCH = Path(tempfile.mkdtemp(prefix="sandbox-fuzz-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


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
    again = protocol.decode(protocol.encode(decoded))
    if type(again) is not type(decoded) or again != decoded:
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
        cgroup=CgroupHierarchy.NONE,
        limits={"wall_time": AppliedLimit(1.0, "fuzz")},
        limit_fired=StopReason.WALL_TIME if raw[25] % 2 else None,
        error=data[32:].decode(errors="replace") or None,
    )
    lines = render_meta(report).splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    if len(fields) != len(lines) or float(fields["time"]) != round(report.cpu_time, 3):
        raise AssertionError(f"meta file does not parse back: {lines}")


def buildfile(data: bytes) -> None:
    """A build file (Sandboxfile)."""
    with contextlib.suppress(ImageError):
        parse_buildfile(data, "Sandboxfile")


_SECRET = b"outside-secret-6d1f"
_LAYER_BUDGET = Budget(max_bytes=32 << 20, max_entries=5000, ratio_after=1 << 20)


def _tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def layer(data: bytes) -> None:
    """A layer tar (plain or gzip). Invariant: nothing outside the target dir is created,
    changed or read (a secret beside it never shows up inside), no device node but overlay
    whiteouts and no setuid file is made."""
    jail = Path(tempfile.mkdtemp(prefix="layer-", dir=_SCRATCH))
    try:
        (jail / "outside").mkdir()
        (jail / "outside" / "secret").write_bytes(_SECRET)
        os.symlink(jail / "outside" / "secret", jail / "outside" / "link")
        target = jail / "a" / "b" / "target"
        target.mkdir(parents=True)
        inside = f"{target}/"
        before = {k: v for k, v in _tree(jail).items() if k != str(target)}
        with contextlib.suppress(ImageError):
            extract_layer(io.BytesIO(data), str(target), _LAYER_BUDGET)
        after = {
            k: v for k, v in _tree(jail).items() if k != str(target) and not k.startswith(inside)
        }
        if after != before:
            raise AssertionError("something outside the target changed")
        for path, (mode, _, _, _) in _tree(target).items():
            st = os.lstat(path)
            if stat.S_ISBLK(mode) or (stat.S_ISCHR(mode) and st.st_rdev != 0):
                raise AssertionError(f"a device node was made: {path}")
            if mode & (stat.S_ISUID | stat.S_ISGID):
                raise AssertionError(f"a setuid/setgid file was made: {path}")
            if stat.S_ISREG(mode) and _SECRET in Path(path).read_bytes():
                raise AssertionError(f"a file outside the target was read: {path}")
    finally:
        for dirpath, dirnames, _ in os.walk(jail):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
        shutil.rmtree(jail)


def oci_document(data: bytes) -> None:
    """Manifests, indexes and image configs; what parses must write back and parse the same."""
    with contextlib.suppress(ImageError):
        doc = oci.parse_manifest(data)
        if isinstance(doc, oci.Manifest):
            again = oci.parse_manifest(oci.manifest_json(doc.config, list(doc.layers),
                                                         doc.media_type))
            if again != doc:
                raise AssertionError(f"manifest round trip changed {doc} into {again}")
    with contextlib.suppress(ImageError):
        config = oci.parse_config(data)
        again_config = oci.parse_config(oci.canonical_json(config.to_json()))
        if again_config != config:
            raise AssertionError(f"config round trip changed {config} into {again_config}")


def registry_answer(data: bytes) -> None:
    """What a registry or token service sends: auth challenges, tokens, tag lists, errors."""
    text = data.decode("utf-8", errors="replace")
    with contextlib.suppress(ImageError):
        registry.parse_challenge(text)
    with contextlib.suppress(ImageError):
        registry.parse_token(data)
    with contextlib.suppress(ImageError):
        registry.parse_tags(data)
    detail = registry.error_detail(data)
    if len(detail) > 300 or not detail.isprintable():
        raise AssertionError(f"error detail not bounded and printable: {detail!r}")
    json.dumps(detail)


class _RunParser:
    """The native box init's request parser (sandbox/native/parse.c), built with ASan and
    UBSan once per session and fed over a pipe; a dead process is a finding."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def parse(self, data: bytes) -> str:
        if self.process is None:
            binary = build_parser_harness(_SCRATCH / "fuzz_parse")
            self.process = subprocess.Popen(
                [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        stdin, stdout = self.process.stdin, self.process.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("no pipe to the parser")
        stdin.write(struct.pack("<I", len(data)) + data)
        stdin.flush()
        line = stdout.readline()
        if not line:
            self.process = None
            raise AssertionError("the native request parser crashed (see its sanitizer report)")
        return line.decode().strip()


_run_parser = _RunParser()


def boxinit_request(data: bytes) -> None:
    """The run request boxinit parses. Invariant besides memory safety: what the Python
    encoder writes for a request is accepted, and the raw input is judged as the encoder's
    own rules would (a request may be refused, never misread as another)."""
    verdict = _run_parser.parse(data)
    if data.startswith(boxinit.MAGIC) and verdict not in _PARSER_REASONS:
        raise AssertionError(f"unexpected parser answer {verdict!r}")
    # Re-encode a request derived from the input: the encoder's output must always parse.
    words = [w.decode("utf-8", "replace") for w in data.split(b"\0") if w and b"=" not in w][:8]
    request = boxinit.RunRequest(
        argv=tuple(w.replace("\0", "") for w in words if w.strip("\0")) or ("/bin/true",),
        env={"PATH": "/bin", "K": words[0].replace("\0", "") if words else ""},
        cwd="/box",
        uid=1000,
        gid=1000,
        rlimits=((4, len(data)),),
        bpf=bytes(8 * (1 + len(data) % 16)),
        listener=bool(len(data) % 2),
        binds=tuple(boxinit.RunBind(f"/box/b{i}", bool(i % 2), bool(i % 3)) for i in range(3)),
    )
    try:
        encoded = boxinit.encode_run(request)
    except ConfigError:
        return
    if _run_parser.parse(encoded) != "ok":
        raise AssertionError("the parser refused a request the encoder wrote")


_PARSER_REASONS = {
    "ok", "bad magic", "truncated record header", "record longer than the request",
    "too many arguments", "bad argument", "too many environment variables",
    "bad environment variable", "two working directories", "bad working directory", "bad ids",
    "bad rlimit", "bad seccomp filter", "bad flags", "bad bind", "unknown record", "no argv",
    "no working directory", "no ids", "no seccomp filter",
}


TARGETS: dict[str, Callable[[bytes], None]] = {
    "boxinit": boxinit_request,
    "buildfile": buildfile,
    "layer": layer,
    "oci": oci_document,
    "registry": registry_answer,
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

