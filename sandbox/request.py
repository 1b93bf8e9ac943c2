"""One request (command, profile or policy, binds, limit overrides) resolved into a Spec.

The CLI and the library both go through :func:`resolve`, so the same rules apply to both: the
policy picks the profile, request limits override the profile's, and the policy's ceilings clamp
the result.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .limits import LIMITS, Limits, clamp_to, parse_limits
from .profiles import load_profile
from .spec import Bind, ImageRoot, Spec, WorkspaceRoot, check_bind_target

if TYPE_CHECKING:
    from .image.oci import ImageConfig
    from .policy import Policy

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
    workspace: WorkspaceRoot | None = None  # the work dir is this workspace (workspace.py)


def parse_bind(text: str, writable: bool) -> Bind:
    """``SRC:DST`` from the command line (SRC relative to the current directory)."""
    flag = "--bind" if writable else "--ro-bind"
    source, sep, target = text.partition(":")
    if not sep or not source or not target:
        raise ConfigError("request", flag, f"expected SRC:DST, got {text!r}")
    bind = Bind(str(Path(source).absolute()), target, writable)
    check_bind_target(bind, flag)
    return bind


def clamp(limits: Limits, policy: Policy | None) -> tuple[Limits, tuple[str, ...]]:
    """Apply the policy's ceilings; returns the limits and a note per clamped limit."""
    if policy is None:
        return limits, ()
    clamped, lowered = clamp_to(limits, dict(policy.ceilings))
    notes = tuple(
        f"{name}: {LIMITS[name].format(asked)} -> {LIMITS[name].format(ceiling)} "
        f"({policy.source}: ceilings.{name})"
        for name, asked, ceiling in lowered
    )
    return clamped, notes


def resolve(request: Request) -> Spec:
    """Validate ``request`` and turn it into the frozen Spec of one run."""
    _check_types(request)
    policy = None
    if request.policy is not None:
        from .policy import load_policy  # here: a run without a policy never needs it

        policy = load_policy(request.policy)
    attributes = dict(request.attributes)
    if attributes and policy is None:
        raise ConfigError(
            "request",
            ", ".join(attributes),
            "purpose, language and tenant are a policy's inputs, and no policy is given",
            hint="add --policy FILE (policy= in Python), or drop them",
        )
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
            raise ConfigError(
                "request", f"env.{key}", "expected NAME=value strings without NUL bytes"
            )
    if request.workspace is not None:
        # The sandbox's own size-capped tmpfs, not a host path of the caller's: no policy
        # key governs it, and it is bound last, over the box's own work dir.
        binds = (*binds, Bind(request.workspace.path, profile.workdir, writable=True))
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
    if not argv:
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
        workspace=request.workspace,
    )


def _image_root(reference: str) -> tuple[ImageRoot, ImageConfig]:
    from .image.store import Store

    store = Store()
    image = store.image(reference)
    layers = store.layer_dirs(image)
    return ImageRoot(reference, image.digest, layers, str(store.root)), image.config


def _check_types(request: Request) -> None:
    """Every field's type, so a wrong one is a ConfigError naming it, never a TypeError."""
    if isinstance(request.argv, str | bytes) or not isinstance(request.argv, Sequence):
        raise ConfigError(
            "request",
            "argv",
            f"expected a list of strings, got {type(request.argv).__name__} {request.argv!r}",
            hint="a command is a list: ['ls', '-l'], not 'ls -l'",
        )
    if not all(isinstance(a, str) for a in request.argv):
        raise ConfigError("request", "argv", "expected every argument to be a string")
    for key, value in (("profile", request.profile), ("image", request.image)):
        if value is not None and not isinstance(value, str):
            raise ConfigError("request", key, f"expected a name or path string, got {value!r}")
    if request.policy is not None and not isinstance(request.policy, str | os.PathLike):
        raise ConfigError("request", "policy", f"expected a path, got {request.policy!r}")
    if not isinstance(request.attributes, Mapping) or not all(
        isinstance(v, str) for v in request.attributes.values()
    ):
        raise ConfigError("request", "attributes", "expected purpose/language/tenant strings")
    if isinstance(request.binds, str | bytes) or not all(
        isinstance(b, Bind) for b in request.binds
    ):
        raise ConfigError("request", "binds", "expected a list of binds")
    if not isinstance(request.env, Mapping):
        raise ConfigError(
            "request", "env", f"expected a mapping of NAME to value, got {request.env!r}"
        )
    if not isinstance(request.limits, Mapping):
        raise ConfigError("request", "limits", "expected a mapping of limit names to values")
