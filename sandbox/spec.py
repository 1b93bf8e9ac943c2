"""The frozen, validated description of one run: everything the box needs, nothing mutable.

A :class:`Profile` is what a ``profiles/*.toml`` file resolves to; a :class:`Spec` is a profile plus
one request (the command, binds, limit overrides) after the policy has clamped it. Runtime state
(pids, cgroup paths, file descriptors) never lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .limits import Limits  # the limit registry; every Spec carries one


class NetworkMode(StrEnum):
    """What the box's own network namespace contains."""

    NONE = "none"
    LOOPBACK = "loopback"
    LINKED = "linked"  # a private segment shared by the boxes of one group (see box/network.py)


class SeccompAction(StrEnum):
    """What the filter does with a syscall a rule matches."""

    ALLOW = "allow"
    KILL = "kill"
    ERRNO = "errno"


class Fallback(StrEnum):
    """What to do when the host has no usable cgroup for memory and pids limits."""

    NONE = "none"  # fail closed: refuse the run
    RLIMIT = "rlimit"  # enforce memory with RLIMIT_AS and pids with RLIMIT_NPROC


@dataclass(frozen=True, slots=True)
class ArgCondition:
    """One seccomp argument comparison: ``(arg[index] & mask) == value`` (or ``!=``)."""

    index: int
    value: int
    mask: int = 0xFFFF_FFFF_FFFF_FFFF
    equal: bool = True


@dataclass(frozen=True, slots=True)
class SeccompRule:
    """Syscalls (names, already expanded from groups) and what the filter does with them."""

    syscalls: tuple[str, ...]
    action: SeccompAction
    errno: int = 0
    conditions: tuple[ArgCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class SeccompPolicy:
    """The whole filter: rules in order, the default for every other syscall and guards."""

    default: SeccompAction
    default_errno: int
    rules: tuple[SeccompRule, ...]
    socket_families: tuple[int, ...]
    unsafe_namespace_clone: bool


@dataclass(frozen=True, slots=True)
class Bind:
    """A host path made visible in the box (read-only unless ``writable``)."""

    source: str
    target: str
    writable: bool = False


@dataclass(frozen=True, slots=True)
class Profile:
    """What a sandbox may do: one resolved ``profiles/*.toml`` (after ``extends``)."""

    name: str
    source: str
    content_hash: str
    description: str
    hostname: str
    network: NetworkMode
    uid: int
    gid: int
    workdir: str
    noexec_tmp: bool
    env: tuple[tuple[str, str], ...]
    limits: Limits
    fallback: Fallback
    seccomp: SeccompPolicy
    binds: tuple[Bind, ...] = ()
    image: str | None = None  # the image boxes run on; the host's /usr on a base layer if None


@dataclass(frozen=True, slots=True)
class Link:
    """What one box of a linked group needs to join its group's segment."""

    netns: str  # the group's named network namespace, holding the bridge
    index: int  # the box's position in the group: names its bridge port
    address: str
    prefix: int
    hosts_file: str  # the group's /etc/hosts, bound over the box's


@dataclass(frozen=True, slots=True)
class ImageRoot:
    """An image a box runs on: its unpacked layers, top first, from the image store."""

    reference: str
    digest: str  # the manifest's
    layers: tuple[str, ...]
    store: str  # the store's directory: a run holds its shared lock so prune waits
    upper: str | None = None  # a build step's upper directory on the host (becomes a layer)


@dataclass(frozen=True, slots=True)
class Spec:
    """One run: a profile plus the request, after the policy clamped it."""

    profile: Profile
    argv: tuple[str, ...]
    limits: Limits
    binds: tuple[Bind, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    clamped: tuple[str, ...] = field(default=())
    hostname: str | None = None  # a group member's name; the profile's otherwise
    link: Link | None = None
    image: ImageRoot | None = None  # the root's layers; the host's /usr on a base layer if None

    @property
    def environment(self) -> dict[str, str]:
        """The program's whole environment: the profile's allowlist, then the request's."""
        return dict(self.profile.env) | dict(self.env)
