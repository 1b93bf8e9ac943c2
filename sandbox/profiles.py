"""Load ``profiles/*.toml`` into a frozen :class:`~sandbox.spec.Profile`.

A profile may ``extends = "other"``: tables merge key by key, anything else (numbers, strings,
lists, arrays of tables) is replaced. Every key is validated; unknown keys are errors, and every
error names the file, the dotted key and what was expected.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import json
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import syscall_groups
from .errors import ConfigError, ImageError
from .imageref import parse_reference
from .spec import (
    DURATION_LIMITS,
    LIMIT_NAMES,
    SIZE_LIMITS,
    ArgCondition,
    Bind,
    Fallback,
    Limits,
    NetworkMode,
    Profile,
    SeccompAction,
    SeccompPolicy,
    SeccompRule,
)
from .units import format_size, parse_cpu_list, parse_duration, parse_size

_T = TypeVar("_T")
_E = TypeVar("_E", NetworkMode, SeccompAction, Fallback)

# Package data (sandbox/data/profiles links to the repository's profiles/): the same path in a
# checkout, an editable install and an installed wheel.
BUNDLED_PROFILES = Path(__file__).resolve().parent / "data" / "profiles"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SOCKET_FAMILIES = {"unix": socket.AF_UNIX, "inet": socket.AF_INET, "inet6": socket.AF_INET6}

_TOP_KEYS = {"description", "extends", "box", "limits", "env", "seccomp", "bind", "image"}
_BOX_KEYS = {"hostname", "network", "uid", "gid", "workdir", "noexec_tmp"}
_LIMIT_KEYS = set(LIMIT_NAMES) | {"fallback"}
_SECCOMP_KEYS = {
    "default",
    "default_errno",
    "allow",
    "rule",
    "socket_families",
    "unsafe_namespace_clone",
}
_RULE_KEYS = {"syscalls", "action", "errno", "args"}
_ARG_KEYS = {"index", "value", "mask", "op"}
_BIND_KEYS = {"source", "target", "writable"}


def search_path() -> list[Path]:
    """Directories searched for a profile name, first match wins."""
    dirs = [Path(p) for p in os.environ.get("SANDBOX_PROFILE_PATH", "").split(":") if p]
    return [*dirs, Path("/etc/sandbox/profiles"), BUNDLED_PROFILES]


def find_profile(name_or_path: str, *, relative_to: Path | None = None) -> Path:
    """Resolve a profile name (``strict``) or a path (``./my.toml``) to an existing file."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        try:
            if path.stat().st_size >= 0 and not path.is_file():
                raise ConfigError(name_or_path, None, "not a regular file")
        except OSError as e:
            raise ConfigError(
                name_or_path, None, f"cannot use the profile file: {e.strerror}"
            ) from None
        return path
    dirs = ([relative_to] if relative_to else []) + search_path()
    return find_named("profile", name_or_path, dirs)


def find_named(kind: str, name: str, dirs: list[Path]) -> Path:
    """``NAME.toml`` in the first of ``dirs`` that has it (profiles and policies by name)."""
    if not _NAME.match(name):
        raise ConfigError(name, None, f"a {kind} name is lower-case letters, digits, - and _")
    for directory in dirs:
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        name,
        None,
        f"no such {kind}",
        hint=f"{kind} files are looked up in " + ", ".join(str(d) for d in dirs),
    )


def list_profiles() -> list[str]:
    """Names of every profile on the search path."""
    return sorted({p.stem for d in search_path() if d.is_dir() for p in d.glob("*.toml")})


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file, turning every failure into a ConfigError that names it."""
    try:
        # O_NONBLOCK: a FIFO put where a file was named must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(str(path), None, "not a regular file")
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), None, f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 (found by fuzzing)
        raise ConfigError(str(path), None, f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(str(path), None, f"cannot read: {e.strerror}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    real = path.resolve()
    if real in seen:
        chain = " -> ".join(str(p) for p in (*seen, real))
        raise ConfigError(str(path), "extends", f"inheritance cycle: {chain}")
    raw = read_toml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(str(path), "extends", "expected a profile name or path")
    if len(seen) > 16:
        raise ConfigError(str(path), "extends", "inheritance is deeper than 16 profiles")
    try:
        parent_path = find_profile(parent, relative_to=path.parent)
    except ConfigError as e:  # name the file that asked for the parent, not only the parent
        raise ConfigError(str(path), "extends", f"{parent!r}: {e.problem}", hint=e.hint) from None
    return _merge(_resolve_raw(parent_path, (*seen, real)), raw)


def load_profile(name_or_path: str) -> Profile:
    """Find, resolve (``extends``) and validate a profile; the result is frozen."""
    path = find_profile(name_or_path)
    raw = _resolve_raw(path)
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    digest = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return _Validator(str(path), raw).profile(path.stem, digest)


class _Validator:
    """Turns one merged TOML document into a Profile, naming file and key on every error."""

    def __init__(self, source: str, raw: dict[str, Any]) -> None:
        self.source = source
        self.raw = raw

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def table(self, value: object, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        for k in value:
            if k not in allowed:
                prefix = f"{key}." if key else ""
                raise self.fail(
                    f"{prefix}{k}",
                    "unknown key (expected one of " + ", ".join(sorted(allowed)) + ")",
                )
        return value

    def typed(self, table: dict[str, Any], key: str, kind: type[_T], default: _T, path: str) -> _T:
        value = table.get(key, default)
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise self.fail(path, f"expected {kind.__name__}, got {value!r}")
        return value

    def profile(self, name: str, digest: str) -> Profile:
        top = self.table(self.raw, "", _TOP_KEYS)
        box = self.table(top.get("box", {}), "box", _BOX_KEYS)
        hostname = self.typed(box, "hostname", str, "box", "box.hostname")
        if not _HOSTNAME.match(hostname):
            raise self.fail("box.hostname", "expected a lower-case host name")
        network = self.enum(box.get("network", "none"), NetworkMode, "box.network")
        uid = self.typed(box, "uid", int, 1000, "box.uid")
        gid = self.typed(box, "gid", int, 1000, "box.gid")
        # No profile makes a box uid 0: spec.build_step_spec is the one, documented, exception.
        for key, value in (("box.uid", uid), ("box.gid", gid)):
            if not 1 <= value < 65534:
                raise self.fail(
                    key, "expected an id from 1 to 65533 (never 0: the box is not root)"
                )
        workdir = self.abspath(
            self.typed(box, "workdir", str, "/box", "box.workdir"), "box.workdir"
        )
        env = self.environment(top.get("env", {}))
        limits, fallback = self.limits(top.get("limits", {}))
        binds = tuple(self.bind(b, f"bind[{i}]") for i, b in enumerate(self.array(top, "bind")))
        return Profile(
            name=name,
            source=self.source,
            content_hash=digest,
            description=self.typed(top, "description", str, "", "description"),
            hostname=hostname,
            network=network,
            uid=uid,
            gid=gid,
            workdir=workdir,
            noexec_tmp=self.typed(box, "noexec_tmp", bool, False, "box.noexec_tmp"),
            env=env,
            limits=limits,
            fallback=fallback,
            seccomp=self.seccomp(top.get("seccomp", {})),
            binds=binds,
            image=self.image(top),
        )

    def image(self, top: dict[str, Any]) -> str | None:
        if "image" not in top:
            return None
        text = self.typed(top, "image", str, "", "image")
        try:
            parse_reference(text)
        except ImageError as e:
            raise self.fail("image", e.message) from None
        return text

    def enum(self, value: object, kind: type[_E], key: str) -> _E:
        if isinstance(value, str):
            for member in kind:
                if member.value == value:
                    return member
        choices = ", ".join(repr(m.value) for m in kind)
        raise self.fail(key, f"expected one of {choices}, got {value!r}")

    def abspath(self, value: str, key: str) -> str:
        if not value.startswith("/") or "\0" in value or ".." in value.split("/"):
            raise self.fail(key, f"expected an absolute path without '..', got {value!r}")
        return os.path.normpath(value)

    def array(self, table: dict[str, Any], key: str) -> list[Any]:
        value = table.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, "expected an array")
        return value

    def environment(self, value: object) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise self.fail("env", 'expected a table of NAME = "value"')
        out = []
        for k, v in value.items():
            if not _ENV_NAME.match(k) or not isinstance(v, str) or "\0" in v:
                raise self.fail(f"env.{k}", 'expected NAME = "string value"')
            out.append((k, v))
        return tuple(out)

    def limits(self, value: object) -> tuple[Limits, Fallback]:
        table = self.table(value, "limits", _LIMIT_KEYS)
        parsed = parse_limits(
            {k: v for k, v in table.items() if k != "fallback"},
            lambda key, problem: self.fail(f"limits.{key}", problem),
        )
        if "wall_time" not in parsed:
            raise self.fail("limits.wall_time", "every profile needs a wall-time limit")
        fallback = self.enum(table.get("fallback", "none"), Fallback, "limits.fallback")
        return Limits().merged(**parsed), fallback

    def bind(self, value: object, key: str) -> Bind:
        table = self.table(value, key, _BIND_KEYS)
        source = self.typed(table, "source", str, "", f"{key}.source")
        if not source.startswith("/"):
            raise self.fail(f"{key}.source", "expected an absolute host path")
        target = self.abspath(
            self.typed(table, "target", str, "", f"{key}.target"), f"{key}.target"
        )
        return Bind(source, target, self.typed(table, "writable", bool, False, f"{key}.writable"))

    def errno_value(self, value: object, key: str) -> int:
        if isinstance(value, str) and isinstance(getattr(errno_mod, value, None), int):
            number: int = getattr(errno_mod, value)
            return number
        raise self.fail(key, f"expected an errno name such as EPERM, got {value!r}")

    def seccomp(self, value: object) -> SeccompPolicy:
        if isinstance(value, dict) and "namespace_clone" in value:
            raise ConfigError(
                self.source,
                "seccomp.namespace_clone",
                "unknown key",
                hint="it is now seccomp.unsafe_namespace_clone: every key that drops a "
                "built-in guard says 'unsafe'",
            )
        table = self.table(value, "seccomp", _SECCOMP_KEYS)
        default = self.enum(table.get("default", "kill"), SeccompAction, "seccomp.default")
        if default is SeccompAction.ALLOW:
            raise self.fail("seccomp.default", "an allowlist cannot default to 'allow'")
        default_errno = self.errno_value(
            table.get("default_errno", "EPERM"), "seccomp.default_errno"
        )
        rules = []
        allow = self.array(table, "allow")
        if not all(isinstance(n, str) for n in allow):
            raise self.fail("seccomp.allow", "expected an array of syscall and @group names")
        try:
            rules.append(SeccompRule(syscall_groups.expand(allow), SeccompAction.ALLOW))
        except KeyError as e:
            raise self.fail(
                "seccomp.allow",
                f"unknown syscall group {e.args[0]!r}; known: "
                + ", ".join(sorted(syscall_groups.GROUPS)),
            ) from None
        for i, raw_rule in enumerate(self.array(table, "rule")):
            rules.append(self.rule(raw_rule, f"seccomp.rule[{i}]"))
        families = []
        for fam in (
            self.array(table, "socket_families")
            if "socket_families" in table
            else ["unix", "inet", "inet6"]
        ):
            if fam not in SOCKET_FAMILIES:
                raise self.fail(
                    "seccomp.socket_families",
                    f"expected names from {sorted(SOCKET_FAMILIES)}, got {fam!r}",
                )
            families.append(int(SOCKET_FAMILIES[fam]))
        policy = SeccompPolicy(
            default=default,
            default_errno=default_errno,
            rules=tuple(rules),
            socket_families=tuple(families),
            unsafe_namespace_clone=self.typed(
                table, "unsafe_namespace_clone", bool, False, "seccomp.unsafe_namespace_clone"
            ),
        )
        from .box.seccomp import filter_known, unknown_syscalls

        if filter_known(policy):  # compiled before: every name is known, no libseccomp needed
            return policy
        for i, rule in enumerate(policy.rules):
            bad = unknown_syscalls(rule.syscalls)
            if bad:
                key = "seccomp.allow" if i == 0 else f"seccomp.rule[{i - 1}].syscalls"
                raise self.fail(key, "unknown syscall name(s): " + ", ".join(bad))
        return policy

    def rule(self, value: object, key: str) -> SeccompRule:
        table = self.table(value, key, _RULE_KEYS)
        names = self.array(table, "syscalls")
        if not names or not all(isinstance(n, str) for n in names):
            raise self.fail(f"{key}.syscalls", "expected a non-empty array of syscall names")
        try:
            syscalls = syscall_groups.expand(names)
        except KeyError as e:
            raise self.fail(f"{key}.syscalls", f"unknown syscall group {e.args[0]!r}") from None
        action = self.enum(table.get("action"), SeccompAction, f"{key}.action")
        err = 0
        if action is SeccompAction.ERRNO:
            err = self.errno_value(table.get("errno"), f"{key}.errno")
        elif "errno" in table:
            raise self.fail(f"{key}.errno", "only an 'errno' action takes an errno")
        conditions = []
        for j, arg in enumerate(self.array(table, "args")):
            akey = f"{key}.args[{j}]"
            t = self.table(arg, akey, _ARG_KEYS)
            index = self.typed(t, "index", int, -1, f"{akey}.index")
            if not 0 <= index <= 5:
                raise self.fail(f"{akey}.index", "expected an argument index from 0 to 5")
            op = t.get("op", "eq")
            if op not in ("eq", "ne"):
                raise self.fail(f"{akey}.op", "expected 'eq' or 'ne'")
            conditions.append(
                ArgCondition(
                    index=index,
                    value=self.typed(t, "value", int, 0, f"{akey}.value"),
                    mask=self.typed(t, "mask", int, 0xFFFF_FFFF_FFFF_FFFF, f"{akey}.mask"),
                    equal=op == "eq",
                )
            )
        return SeccompRule(syscalls, action, err, tuple(conditions))


#: The smallest value of each size limit that is not surely a mistake: a box needs about a
#: megabyte of memory to exec anything, a dynamic loader some stack, a tmpfs at least a page.
SIZE_FLOORS = {
    "memory": 1 << 20,
    "stack": 64 << 10,
    "tmp_size": 4 << 10,
    "work_size": 4 << 10,
    "root_size": 4 << 10,
}
#: The largest count the kernel accepts: PID_MAX_LIMIT (64-bit), and nr_open's default.
COUNT_CEILINGS = {"pids": 1 << 22, "open_files": 1 << 20}
_DIGITS = re.compile(r"^\s*\d+\s*$")


def _size_limit(key: str, value: object) -> int:
    size = parse_size(value)
    floor = SIZE_FLOORS.get(key, 1)
    if size >= floor:
        return size
    unitless = isinstance(value, int) or (isinstance(value, str) and _DIGITS.match(value))
    shown = format_size(floor)
    if unitless and size > 0:
        raise ValueError(
            f"{size} bytes is below the {shown} floor of this limit: did you mean {size}M?"
        )
    raise ValueError(f"expected a size of at least {shown}, got {value!r}")


def _count_limit(key: str, value: object) -> int:
    if isinstance(value, str) and _DIGITS.match(value):  # the command line gives strings
        value = int(value)
    ceiling = COUNT_CEILINGS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= ceiling:
        raise ValueError(f"expected a whole number > 0 and at most {ceiling}, got {value!r}")
    return value


def parse_limits(values: dict[str, Any], fail: Callable[[str, str], Exception]) -> dict[str, Any]:
    """Validate limit values from any source (profile, policy, CLI, API) into Limits units."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in LIMIT_NAMES:
            raise fail(key, "unknown limit (expected one of " + ", ".join(LIMIT_NAMES) + ")")
        try:
            if key == "extra_time" and value in (0, "0", "0s", "0ms"):
                out[key] = 0.0
            elif key == "cpus":
                out[key] = parse_cpu_list(value)
            elif key == "cpu_quota":
                try:
                    quota = float(value) if not isinstance(value, bool) else -1.0
                except (TypeError, ValueError):
                    quota = -1.0
                if not 0.01 <= quota <= 4096:
                    raise ValueError(f"expected a number of CPUs from 0.01 to 4096, got {value!r}")
                out[key] = quota
            elif key in DURATION_LIMITS:
                out[key] = parse_duration(value)
            elif key in SIZE_LIMITS:
                out[key] = _size_limit(key, value)
            else:
                out[key] = _count_limit(key, value)
        except ValueError as e:
            raise fail(key, str(e)) from None
    return out
