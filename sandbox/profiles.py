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
from pathlib import Path
from typing import Any

from . import syscall_groups
from .errors import ConfigError, ImageError
from .imageref import parse_reference
from .limits import LIMITS, Limits, parse_limits
from .spec import (
    ArgCondition,
    Bind,
    Fallback,
    NetworkMode,
    Profile,
    SeccompAction,
    SeccompPolicy,
    SeccompRule,
)
from .tomlreader import REQUIRED, Table, read_toml

# Package data (sandbox/data/profiles links to the repository's profiles/): the same path in a
# checkout, an editable install and an installed wheel.
BUNDLED_PROFILES = Path(__file__).resolve().parent / "data" / "profiles"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SOCKET_FAMILIES = {"unix": socket.AF_UNIX, "inet": socket.AF_INET, "inet6": socket.AF_INET6}

_TOP_KEYS = {"description", "extends", "box", "limits", "env", "seccomp", "bind", "image"}
_BOX_KEYS = {"hostname", "network", "uid", "gid", "workdir", "noexec_tmp"}
_LIMIT_KEYS = set(LIMITS) | {"fallback"}
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

    def profile(self, name: str, digest: str) -> Profile:
        top = Table(self.source, self.raw, _TOP_KEYS)
        box = top.table("box", _BOX_KEYS)
        hostname = box.string("hostname", "box")
        if not _HOSTNAME.match(hostname):
            raise box.fail("hostname", "expected a lower-case host name")
        network = box.enum("network", NetworkMode, NetworkMode.NONE)
        uid, gid = box.integer("uid", 1000), box.integer("gid", 1000)
        # No profile makes a box uid 0: spec.build_step_spec is the one, documented, exception.
        for key, value in (("uid", uid), ("gid", gid)):
            if not 1 <= value < 65534:
                raise box.fail(
                    key, "expected an id from 1 to 65533 (never 0: the box is not root)"
                )
        workdir = _abspath(box, "workdir", "/box")
        env = _environment(top.table("env", None))
        limits, fallback = _limits(top.table("limits", _LIMIT_KEYS))
        binds = tuple(_bind(b) for b in top.tables("bind", _BIND_KEYS))
        return Profile(
            name=name,
            source=self.source,
            content_hash=digest,
            description=top.string("description", ""),
            hostname=hostname,
            network=network,
            uid=uid,
            gid=gid,
            workdir=workdir,
            noexec_tmp=box.boolean("noexec_tmp", False),
            env=env,
            limits=limits,
            fallback=fallback,
            seccomp=_seccomp(top),
            binds=binds,
            image=_image(top),
        )


def _image(top: Table) -> str | None:
    if "image" not in top:
        return None
    text = top.string("image")
    try:
        parse_reference(text)
    except ImageError as e:
        raise top.fail("image", e.message) from None
    return text


def _abspath(table: Table, key: str, default: str = REQUIRED) -> str:
    value = table.string(key, default)
    if not value.startswith("/") or "\0" in value or ".." in value.split("/"):
        raise table.fail(key, f"expected an absolute path without '..', got {value!r}")
    return os.path.normpath(value)


def _environment(table: Table) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in table:
        if not _ENV_NAME.match(k) or not isinstance(v, str) or "\0" in v:
            raise table.fail(k, 'expected NAME = "string value"')
        out.append((k, v))
    return tuple(out)


def _limits(table: Table) -> tuple[Limits, Fallback]:
    parsed = parse_limits(
        {k: v for k, v in table if k != "fallback"},
        lambda key, problem: table.fail(key, problem),
    )
    if "wall_time" not in parsed:
        raise table.fail("wall_time", "every profile needs a wall-time limit")
    fallback = table.enum("fallback", Fallback, Fallback.NONE)
    return Limits().merged(**parsed), fallback


def _bind(table: Table) -> Bind:
    source = table.string("source")
    if not source.startswith("/"):
        raise table.fail("source", "expected an absolute host path")
    return Bind(source, _abspath(table, "target"), table.boolean("writable", False))


def _errno(table: Table, key: str, default: str = REQUIRED) -> int:
    value = table.raw(key, default)
    if isinstance(value, str) and isinstance(getattr(errno_mod, value, None), int):
        number: int = getattr(errno_mod, value)
        return number
    raise table.fail(key, f"expected an errno name such as EPERM, got {value!r}")


def _seccomp(top: Table) -> SeccompPolicy:
    if isinstance(top.raw("seccomp"), dict) and "namespace_clone" in top.raw("seccomp"):
        raise top.fail(
            "seccomp.namespace_clone",
            "unknown key",
            hint="it is now seccomp.unsafe_namespace_clone: every key that drops a "
            "built-in guard says 'unsafe'",
        )
    table = top.table("seccomp", _SECCOMP_KEYS)
    default = table.enum("default", SeccompAction, SeccompAction.KILL)
    if default is SeccompAction.ALLOW:
        raise table.fail("default", "an allowlist cannot default to 'allow'")
    default_errno = _errno(table, "default_errno", "EPERM")
    rules = []
    allow = table.strings("allow", "an array of syscall and @group names")
    try:
        rules.append(SeccompRule(syscall_groups.expand(allow), SeccompAction.ALLOW))
    except KeyError as e:
        raise table.fail(
            "allow",
            f"unknown syscall group {e.args[0]!r}; known: "
            + ", ".join(sorted(syscall_groups.GROUPS)),
        ) from None
    for rule in table.tables("rule", _RULE_KEYS):
        rules.append(_rule(rule))
    families = []
    named = (
        table.strings("socket_families", "an array of socket family names")
        if "socket_families" in table
        else list(SOCKET_FAMILIES)
    )
    for fam in named:
        if fam not in SOCKET_FAMILIES:
            raise table.fail(
                "socket_families", f"expected names from {sorted(SOCKET_FAMILIES)}, got {fam!r}"
            )
        families.append(int(SOCKET_FAMILIES[fam]))
    policy = SeccompPolicy(
        default=default,
        default_errno=default_errno,
        rules=tuple(rules),
        socket_families=tuple(families),
        unsafe_namespace_clone=table.boolean("unsafe_namespace_clone", False),
    )
    from .box.seccomp import filter_known, unknown_syscalls

    if filter_known(policy):  # compiled before: every name is known, no libseccomp needed
        return policy
    for i, seccomp_rule in enumerate(policy.rules):
        bad = unknown_syscalls(seccomp_rule.syscalls)
        if bad:
            key = "allow" if i == 0 else f"rule[{i - 1}].syscalls"
            raise table.fail(key, "unknown syscall name(s): " + ", ".join(bad))
    return policy


def _rule(table: Table) -> SeccompRule:
    names = table.strings("syscalls", "a non-empty array of syscall names")
    if not names:
        raise table.fail("syscalls", "expected a non-empty array of syscall names")
    try:
        syscalls = syscall_groups.expand(names)
    except KeyError as e:
        raise table.fail("syscalls", f"unknown syscall group {e.args[0]!r}") from None
    action = table.enum("action", SeccompAction)
    err = 0
    if action is SeccompAction.ERRNO:
        err = _errno(table, "errno")
    elif "errno" in table:
        raise table.fail("errno", "only an 'errno' action takes an errno")
    conditions = []
    for arg in table.tables("args", _ARG_KEYS):
        index = arg.integer("index")
        if not 0 <= index <= 5:
            raise arg.fail("index", "expected an argument index from 0 to 5")
        op = arg.raw("op", "eq")
        if op not in ("eq", "ne"):
            raise arg.fail("op", "expected 'eq' or 'ne'")
        conditions.append(
            ArgCondition(
                index=index,
                value=arg.integer("value", 0),
                mask=arg.integer("mask", 0xFFFF_FFFF_FFFF_FFFF),
                equal=op == "eq",
            )
        )
    return SeccompRule(syscalls, action, err, tuple(conditions))
