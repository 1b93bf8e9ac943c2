"""Policies (``policies/*.toml``): pick a profile for a request and set ceilings on its limits.

Rules are tried in order; a rule matches when every attribute it names (``purpose``,
``language``, ``tenant``) equals the request's (a list means any of). The first match names the
profile; ``default_profile`` applies when none does. Ceilings bound every limit: a request (or a
profile) asking for more is clamped down to the ceiling and the report lists what was clamped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .limits import LIMITS, Order, parse_limits
from .profiles import find_named, read_toml
from .spec import NetworkMode

ATTRIBUTES = ("purpose", "language", "tenant")
_TOP_KEYS = {"description", "default_profile", "rule", "ceilings", "allow"}
_RULE_KEYS = {"name", "profile", *ATTRIBUTES}
_ALLOW_KEYS = {"networks", "writable_binds", "binds"}
_VALUE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Package data (sandbox/data/policies links to the repository's policies/), like the profiles.
BUNDLED_POLICIES = Path(__file__).resolve().parent / "data" / "policies"
POLICY_DIRS = (Path("/etc/sandbox/policies"), BUNDLED_POLICIES)


@dataclass(frozen=True)
class Rule:
    """``profile`` applies when every attribute in ``match`` is one of its values."""

    name: str
    profile: str
    match: tuple[tuple[str, tuple[str, ...]], ...]

    def matches(self, attributes: dict[str, str]) -> bool:
        return all(attributes.get(key) in values for key, values in self.match)


@dataclass(frozen=True)
class Policy:
    """A validated policy file."""

    source: str
    description: str
    default_profile: str | None
    rules: tuple[Rule, ...]
    ceilings: tuple[tuple[str, float | int], ...]
    networks: tuple[NetworkMode, ...]
    binds: bool
    writable_binds: bool

    def select(self, attributes: dict[str, str]) -> tuple[str, str]:
        """(profile name, why) for a request's attributes."""
        for attribute, value in attributes.items():
            if attribute not in ATTRIBUTES:
                raise ConfigError(
                    self.source,
                    attribute,
                    "unknown request attribute (expected " + ", ".join(ATTRIBUTES) + ")",
                )
            if not _VALUE.match(value):
                raise ConfigError("request", attribute, f"invalid value {value!r}")
        for rule in self.rules:
            if rule.matches(attributes):
                return rule.profile, f"rule {rule.name!r}"
        if self.default_profile is None:
            shown = ", ".join(f"{k}={v}" for k, v in attributes.items()) or "no attributes"
            raise ConfigError(
                self.source, "rule", f"no rule matches ({shown}) and there is no default_profile"
            )
        return self.default_profile, "default_profile"


def find_policy(name_or_path: str | Path) -> Path:
    """A policy file as given (``./judge.toml``), or a name (``default``) looked up in
    ``/etc/sandbox/policies``, then the policies bundled with the package."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(".toml"):
        return Path(name_or_path)
    return find_named("policy", text, list(POLICY_DIRS))


def load_policy(path: str | Path) -> Policy:
    """Read and validate one policy file, given by path or by name (see :func:`find_policy`)."""
    found = find_policy(path)
    source = str(found)
    raw = read_toml(found)
    _known(raw, _TOP_KEYS, source, "")
    default = raw.get("default_profile")
    if default is not None and not isinstance(default, str):
        raise ConfigError(source, "default_profile", "expected a profile name")
    rules = []
    raw_rules = raw.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(source, "rule", "expected an array of [[rule]] tables")
    for i, r in enumerate(raw_rules):
        key = f"rule[{i}]"
        if not isinstance(r, dict):
            raise ConfigError(source, key, "expected a table")
        _known(r, _RULE_KEYS, source, key)
        profile = r.get("profile")
        if not isinstance(profile, str):
            raise ConfigError(source, f"{key}.profile", "expected a profile name")
        match = []
        for attribute in ATTRIBUTES:
            if attribute in r:
                value = r[attribute]
                values = value if isinstance(value, list) else [value]
                if not values or not all(isinstance(v, str) and _VALUE.match(v) for v in values):
                    raise ConfigError(
                        source,
                        f"{key}.{attribute}",
                        "expected a name or a non-empty array of names",
                    )
                match.append((attribute, tuple(values)))
        name = r.get("name", key)
        if not isinstance(name, str):
            raise ConfigError(source, f"{key}.name", "expected a string")
        rules.append(Rule(name, profile, tuple(match)))
    ceilings_raw = raw.get("ceilings", {})
    if not isinstance(ceilings_raw, dict):
        raise ConfigError(source, "ceilings", "expected a table")
    ceilings = parse_limits(ceilings_raw, lambda k, p: ConfigError(source, f"ceilings.{k}", p))
    for name in ceilings:
        if LIMITS[name].order is Order.UNORDERED:
            raise ConfigError(source, f"ceilings.{name}", "this limit has no order, so no ceiling")
    allow = raw.get("allow", {})
    if not isinstance(allow, dict):
        raise ConfigError(source, "allow", "expected a table")
    _known(allow, _ALLOW_KEYS, source, "allow")
    networks_raw = allow.get("networks", ["none"])
    try:
        networks = tuple(NetworkMode(n) for n in networks_raw)
    except (ValueError, TypeError):
        raise ConfigError(
            source, "allow.networks", "expected an array of 'none', 'loopback'"
        ) from None
    flags = {}
    for key, default_value in (("binds", True), ("writable_binds", False)):
        flags[key] = allow.get(key, default_value)
        if not isinstance(flags[key], bool):
            raise ConfigError(source, f"allow.{key}", "expected true or false")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(source, "description", "expected a string")
    return Policy(
        source,
        description,
        default,
        tuple(rules),
        tuple(sorted(ceilings.items())),
        networks,
        flags["binds"],
        flags["writable_binds"],
    )


def _known(table: dict[str, Any], allowed: set[str], source: str, prefix: str) -> None:
    for key in table:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                source, where, "unknown key (expected one of " + ", ".join(sorted(allowed)) + ")"
            )
