"""The frozen, validated description of one run: everything the box needs, nothing mutable.

A :class:`Profile` is what a ``profiles/*.toml`` file resolves to; a :class:`Spec` is a profile plus
one request (the command, binds, limit overrides) after the policy has clamped it. Runtime state
(pids, cgroup paths, file descriptors) never lives here.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from .errors import ConfigError
from .limits import Limits  # the limit registry; every Spec carries one

_SYSTEM_DIR = re.compile(r"^/(|(usr|bin|sbin|lib[^/]*|etc)(/.*)?)$")
#: The kernel's limits on execve's strings (linux/binfmts.h): MAX_ARG_STRLEN per string, and
#: for all of them with their pointers a quarter of RLIMIT_STACK, at most 6 MiB, at least
#: ARG_MAX (fs/exec.c, bprm_stack_limits). PATH_MAX is kept for the file name, copied too.
MAX_ARG_STRLEN = 32 * 4096
ARG_MAX = 128 << 10
_ARGS_MOST = 6 << 20
_PATH_MAX = 4096


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
class WorkspaceRoot:
    """A workspace a run's work dir is (sandbox/workspace.py): its size-capped tmpfs on the host
    and the host ids that own it, the same for every run in it."""

    path: str  # the tmpfs's mount point, in a root-only directory of the state dir
    uid: int
    gid: int
    init: int  # the host id of the box's pid 1 (box/userns.py)
    size: int  # bytes: the tmpfs's size


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
    workspace: WorkspaceRoot | None = None  # bound at the work dir, kept across runs

    def __post_init__(self) -> None:
        """The one validation every Spec passes, however it is made (``resolve``, a build
        step, ``dataclasses.replace``): who the program is, where binds may go, and a command
        execve can take. A box built ahead is a Spec without argv (its shape)."""
        if BUILD_STEP_ID in (self.profile.uid, self.profile.gid) and (
            self.image is None or self.image.upper is None
        ):
            # The one exception is a build step's (build_step_spec); no other box is root.
            raise ConfigError("request", "uid", "uid and gid 0 are only a build step's")
        for bind in self.binds:
            check_bind_target(bind, f"bind {bind.source}:{bind.target}")
        if self.argv:
            argv = self.argv
            if not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
                raise ConfigError(
                    "request", "argv", "expected a non-empty command without NUL bytes"
                )
            _check_exec_size(argv, self.environment, self.limits.stack)

    @property
    def environment(self) -> dict[str, str]:
        """The program's whole environment: the profile's allowlist, then the request's."""
        return dict(self.profile.env) | dict(self.env)


#: The uid and gid of a build step's program inside its user namespace (see build_step_spec).
BUILD_STEP_ID = 0


def build_step_spec(
    profile: Profile,
    argv: tuple[str, ...],
    *,
    env: tuple[tuple[str, str], ...],
    cwd: str,
    step: str,
    layers: tuple[str, ...],
    store: str,
    upper: str,
) -> Spec:
    """The Spec of one ``RUN`` step of an image build: the only box whose program is uid 0.

    Every profile's ``box.uid``/``box.gid`` is 1 to 65533 (profiles.py refuses 0): a box is
    never root, not even of its own user namespace. A build step is the one exception, made
    only here, because its command must be able to change every file of the image as a
    build's root does (install packages, chown, remove what the base image holds). It is
    still unprivileged: uid and gid 0 of the box's own user namespace, mapped to the host's
    image owner, never to host root (the supervisor picks those host ids for a root with an
    ``upper`` directory: :func:`sandbox.box.userns.build_step_ids`). It keeps everything else
    of ``profile``: its own user, pid, mount, network, IPC, UTS and cgroup namespaces, no
    capability in any set once the program runs, no_new_privs, the seccomp filter, the
    network mode and the limits. Only the environment is the build's (``env``), not the
    profile's allowlist. The root is the image so far (``layers``, top first, from the store
    at ``store``) with ``upper``, the step's upper directory, whose contents become the layer.
    """
    return Spec(
        profile=replace(profile, uid=BUILD_STEP_ID, gid=BUILD_STEP_ID, env=()),
        argv=argv,
        limits=profile.limits,
        env=env,
        cwd=cwd,
        image=ImageRoot(f"build step {step}", "", layers, store, upper),
    )


def check_bind_target(bind: Bind, key: str) -> None:
    """Refuse a target on or under the box's read-only system directories, before any setup.

    The root, ``/usr`` (the host's, read-only) and its ``/bin``, ``/sbin``, ``/lib*`` links,
    and the synthesized ``/etc`` make the box work: a bind there cannot make its mount point, or
    it hides what every program needs. (``/proc`` and ``/dev`` are refused with the root plan.)
    """
    target = bind.target
    if not isinstance(target, str) or not target.startswith("/") or "\0" in target:
        raise ConfigError("request", key, f"expected an absolute target path, got {target!r}")
    if ".." in target.split("/"):
        raise ConfigError("request", key, f"the target must not contain '..', got {target!r}")
    if _SYSTEM_DIR.match("/" + os.path.normpath(target).lstrip("/")):  # POSIX keeps "//"
        raise ConfigError(
            "request",
            key,
            f"{target} is on or under a read-only system directory of the box "
            "(/, /usr, /bin, /sbin, /lib*, /etc)",
            hint="bind under /box or /tmp, or to a new top-level directory such as /data",
        )


def _check_exec_size(argv: Sequence[str], env: Mapping[str, str], stack: int | None) -> None:
    """execve would fail with E2BIG inside the box: refuse before it starts, saying why."""
    strings = [*argv, *(f"{k}={v}" for k, v in env.items())]
    total = 8 * len(strings) + _PATH_MAX
    for index, text in enumerate(strings):
        what = f"argv[{index}]" if index < len(argv) else f"env.{text.partition('=')[0]}"
        try:
            size = len(os.fsencode(text)) + 1
        except UnicodeEncodeError as e:
            raise ConfigError(
                "request", what, f"cannot be encoded for execve: {e.reason}"
            ) from None
        if size > MAX_ARG_STRLEN:
            raise ConfigError(
                "request",
                what,
                f"{size} bytes is over the kernel's {MAX_ARG_STRLEN // 1024} KiB per string "
                "(MAX_ARG_STRLEN)",
                hint="pass large data through stdin or a bound file",
            )
        total += size
    if stack is None:
        stack = resource.getrlimit(resource.RLIMIT_STACK)[0]  # what the box inherits
    most = max(
        min(_ARGS_MOST, stack // 4 if stack != resource.RLIM_INFINITY else _ARGS_MOST), ARG_MAX
    )
    if total > most:
        raise ConfigError(
            "request",
            "argv",
            f"the command and environment take {total} bytes, over the kernel's {most} "
            "(ARG_MAX: a quarter of the stack limit, at most 6 MiB)",
            hint="pass large data through stdin or a bound file",
        )
