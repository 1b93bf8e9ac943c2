"""One request (command, profile or policy, binds, limit overrides) resolved into a Spec.

The CLI and the library both go through :func:`resolve`, so the same rules apply to both: the
policy picks the profile, request limits override the profile's, and the policy's ceilings clamp
the result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .policy import Policy, load_policy
from .profiles import load_profile, parse_limits
from .spec import ABSENT_IS_TIGHTEST, Bind, ImageRoot, Limits, Spec

if TYPE_CHECKING:
    from .image.oci import ImageConfig

DEFAULT_PROFILE = "strict"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Request:
    """What a caller asks for; every field is validated by :func:`resolve`."""

    argv: Sequence[str]
    profile: str | None = None
    policy: str | Path | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    binds: Sequence[Bind] = ()
    limits: Mapping[str, object] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    image: str | None = None  # overrides the profile's ``image``


def parse_bind(text: str, writable: bool) -> Bind:
    """``SRC:DST`` from the command line (SRC relative to the current directory)."""
    source, sep, target = text.partition(":")
    if not sep or not source or not target:
        raise ConfigError(
            "request", "--bind" if writable else "--ro-bind", f"expected SRC:DST, got {text!r}"
        )
    return Bind(str(Path(source).absolute()), target, writable)


def clamp(limits: Limits, policy: Policy | None) -> tuple[Limits, tuple[str, ...]]:
    """Apply the policy's ceilings; returns the limits and a note per clamped limit."""
    if policy is None:
        return limits, ()
    changes: dict[str, float | int] = {}
    notes = []
    for name, ceiling in policy.ceilings:
        value = getattr(limits, name)
        if value is None and name in ABSENT_IS_TIGHTEST:
            continue
        if value is None or value > ceiling:
            changes[name] = ceiling
            notes.append(f"{name}: {value} -> {ceiling} ({policy.source}: ceilings.{name})")
    return limits.merged(**changes), tuple(notes)


def resolve(request: Request) -> Spec:
    """Validate ``request`` and turn it into the frozen Spec of one run."""
    policy = load_policy(request.policy) if request.policy is not None else None
    attributes = dict(request.attributes)
    if policy is not None:
        chosen, _ = policy.select(attributes)
        if request.profile is not None and request.profile != chosen:
            raise ConfigError(
                policy.source,
                "rule",
                f"the policy selects profile {chosen!r}, not {request.profile!r}",
            )
        profile = load_profile(chosen)
    else:
        profile = load_profile(request.profile or DEFAULT_PROFILE)
    overrides = parse_limits(
        dict(request.limits), lambda key, problem: ConfigError("request", key, problem)
    )
    limits, clamped = clamp(profile.limits.merged(**overrides), policy)
    binds = tuple(request.binds)
    if policy is not None:
        if profile.network not in policy.networks:
            raise ConfigError(
                policy.source,
                "allow.networks",
                f"profile {profile.name!r} asks for network "
                f"{profile.network.value!r}, which this policy does not allow",
            )
        if binds and not policy.binds:
            raise ConfigError(policy.source, "allow.binds", "this policy allows no binds")
        if any(b.writable for b in binds) and not policy.writable_binds:
            raise ConfigError(
                policy.source,
                "allow.writable_binds",
                "this policy allows read-only binds only (use --ro-bind)",
            )
    for key, value in request.env.items():
        if not _ENV_NAME.match(key) or not isinstance(value, str) or "\0" in value:
            raise ConfigError("request", f"env.{key}", "expected NAME=value without NUL bytes")
    argv = tuple(request.argv)
    env = tuple(request.env.items())
    image, cwd = None, None
    reference = request.image or profile.image
    if reference is not None:
        image, config = _image_root(reference)
        # The image's command and environment apply; its User never does (the profile's uid
        # is the box's), and neither do its volumes or ports.
        argv = (*(config.entrypoint or ()), *(argv or config.cmd or ()))
        env = (*config.env, *env)
        cwd = config.workdir or None
    if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
        raise ConfigError("request", "argv", "expected a non-empty command without NUL bytes")
    return Spec(
        profile=profile,
        argv=argv,
        limits=limits,
        binds=binds,
        env=env,
        cwd=cwd,
        clamped=clamped,
        image=image,
    )


def _image_root(reference: str) -> tuple[ImageRoot, ImageConfig]:
    from .image.store import Store

    store = Store()
    image = store.image(reference)
    layers = store.layer_dirs(image)
    return ImageRoot(reference, image.digest, layers, str(store.root)), image.config
