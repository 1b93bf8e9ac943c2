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

from .errors import ConfigError
from .limits import LIMITS, Order, parse_limits
from .profiles import find_named
from .spec import NetworkMode
from .tomlreader import Table

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
    top = Table.read(found, _TOP_KEYS)
    default = top.optional_string("default_profile", "a profile name")
    rules = []
    for r in top.tables("rule", _RULE_KEYS):
        profile = r.string("profile", expected="a profile name")
        match = []
        for attribute in ATTRIBUTES:
            if attribute in r:
                value = r.raw(attribute)
                values = value if isinstance(value, list) else [value]
                if not values or not all(isinstance(v, str) and _VALUE.match(v) for v in values):
                    raise r.fail(attribute, "expected a name or a non-empty array of names")
                match.append((attribute, tuple(values)))
        name = r.string("name", r.path)
        rules.append(Rule(name, profile, tuple(match)))
    ceilings_table = top.table("ceilings", None)
    ceilings = parse_limits(dict(ceilings_table), ceilings_table.fail)
    for name in ceilings:
        if LIMITS[name].order is Order.UNORDERED:
            raise ceilings_table.fail(name, "this limit has no order, so no ceiling")
    allow = top.table("allow", _ALLOW_KEYS)
    try:
        networks = tuple(NetworkMode(n) for n in allow.raw("networks", ["none"]))
    except (ValueError, TypeError):
        raise allow.fail("networks", "expected an array of 'none', 'loopback'") from None
    return Policy(
        source,
        top.string("description", ""),
        default,
        tuple(rules),
        tuple(sorted(ceilings.items())),
        networks,
        allow.boolean("binds", True),
        allow.boolean("writable_binds", False),
    )
