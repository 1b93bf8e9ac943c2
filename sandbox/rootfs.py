"""The box's root filesystem: parent side opens what the root is made of, child side mounts it.

Parent (:func:`plan_root`): checks every layer and bind source exists and what it is, so a bad
request fails with a clear message before anything starts. (Descriptors cannot carry them over:
overlayfs and bind mounts refuse a path whose mount belongs to another mount namespace.)

Child (:func:`build_root`, run by the box's init inside its user and mount namespaces):

1. ``/`` becomes recursively private so no mount propagates back to the host
   (mount_namespaces(7)).
2. A small tmpfs on a staging directory holds the overlay's upper layer; the root is
   ``overlay(layers)`` with that upper, so mount points can be created, and is then made
   read-only at the mount level (``mount_setattr``), with ``nosuid,nodev``.
3. Host binds (read-only, recursive, ``nosuid,nodev``), size-capped tmpfs for ``/tmp`` and the
   work dir, a minimal ``/dev`` of bound host device nodes, and a fresh ``/proc`` (mounted before
   the old root goes: the kernel only allows a proc mount in a user namespace while a fully
   visible proc exists, see ``mount_too_revealing``), with Docker's masked and read-only paths.
4. ``pivot_root(".", ".")`` and a lazy unmount of the old root (pivot_root(2), "NOTES").
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from .baseimage import ensure_base_layer
from .errors import ConfigError
from .kernel import (
    MNT_DETACH,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    KernelOps,
)
from .spec import Bind, Spec

#: Where the child assembles the root inside its own mount namespace. Overmounting it there is
#: invisible to the host; /tmp exists on every Linux host and is traversable by any uid.
STAGE = "/tmp"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("shm", "/tmp"),
)
# Docker's default masks (moby oci/defaults.go): hidden files get /dev/null, dirs an empty tmpfs.
PROC_MASKED = (
    "acpi",
    "asound",
    "interrupts",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
    "sysrq-trigger",
)
PROC_READONLY = ("bus", "fs", "irq", "sys")


@dataclass(frozen=True)
class MountSource:
    """A host path to bind at ``target``."""

    source: str
    target: str
    writable: bool
    is_dir: bool


@dataclass(frozen=True)
class RootPlan:
    """Everything the child needs to build the root."""

    layers: tuple[str, ...]
    binds: tuple[MountSource, ...]
    tmp_size: int
    work_size: int
    workdir: str
    noexec_tmp: bool
    uid: int
    gid: int
    cwd: str | None = None  # where the program starts; the work dir if None
    root_size: int | None = None  # writable root of this size; read-only if None
    build_dir: str | None = None  # a build step's host dir holding upper/ and work/


def _check_source(bind: Bind, source_name: str) -> MountSource:
    try:
        st = os.stat(bind.source)
    except OSError as e:
        raise ConfigError(
            source_name, f"bind {bind.source}:{bind.target}", f"cannot use the source: {e.strerror}"
        ) from None
    return MountSource(
        os.path.realpath(bind.source),
        os.path.normpath(bind.target),
        bind.writable,
        stat.S_ISDIR(st.st_mode),
    )


def _check_target(bind: Bind, source_name: str) -> None:
    if ".." in bind.target.split("/") or "\0" in bind.target:
        raise ConfigError(
            source_name, f"bind {bind.source}:{bind.target}", "the target must not contain '..'"
        )
    target = os.path.normpath(bind.target)
    if (
        not target.startswith("/")
        or target in ("/", "/proc", "/dev")
        or any(target.startswith(p) for p in ("/proc/", "/dev/"))
    ):
        raise ConfigError(
            source_name,
            f"bind {bind.source}:{bind.target}",
            "the target must be an absolute path outside /, /proc and /dev",
        )


def plan_root(spec: Spec) -> RootPlan:
    """Check and describe the layers and binds of ``spec``'s root."""
    profile = spec.profile
    binds = []
    if spec.image is not None:
        layers = spec.image.layers
    else:
        base = ensure_base_layer(spec.hostname or profile.hostname, profile.uid, profile.gid)
        layers = (str(base.path),)
        binds = [_check_source(Bind(d, d), "host base") for d in base.host_binds]
    for bind in (*profile.binds, *spec.binds):
        source = profile.source if bind in profile.binds else "request"
        _check_target(bind, source)
        binds.append(_check_source(bind, source))
    if spec.link is not None:  # the group's members by name
        binds.append(_check_source(Bind(spec.link.hosts_file, "/etc/hosts"), "group"))
    return RootPlan(
        layers=layers,
        binds=tuple(binds),
        tmp_size=spec.limits.tmp_size,
        work_size=spec.limits.work_size,
        workdir=profile.workdir,
        noexec_tmp=profile.noexec_tmp,
        uid=profile.uid,
        gid=profile.gid,
        cwd=spec.cwd,
        root_size=spec.limits.root_size,
        build_dir=spec.image.upper if spec.image is not None else None,
    )


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _refuse_escape(root: str, path: str) -> None:
    """A mount point's parent must resolve inside the new root (a symlink in a layer could
    otherwise point a mount, or a created mount point, at a path of the host)."""
    real = os.path.realpath(path)
    if real != root and not real.startswith(root + "/"):
        raise OSError(errno.ELOOP, "mount point resolves outside the box's root", path)


def _refuse_layer_symlinks(layer_fds: list[int], target: str) -> None:
    """A directory made in the upper layer would hide a layer's symlink of the same name
    (``/bin -> usr/bin``) and break every path through it: bind to the real path instead."""
    parts = target.strip("/").split("/")
    for depth in range(1, len(parts)):
        prefix = "/" + "/".join(parts[:depth])
        for fd in layer_fds:
            if os.path.islink(f"/proc/self/fd/{fd}{prefix}"):
                raise OSError(errno.ELOOP, f"{prefix} is a symlink in the image", target)


def _make_mount_point(path: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.lexists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _bind(k: KernelOps, source: str, target: str, attrs: int) -> None:
    k.mount(source, target, None, MS_BIND | MS_REC)
    k.mount_setattr(target, attrs, recursive=True)


def _open_path(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def build_root(k: KernelOps, plan: RootPlan) -> None:
    """Child side: assemble the root described by ``plan`` and pivot into it.

    Sources are opened first, with the caller's host uid (so a bind from a directory only the
    caller may enter works), as ``O_PATH`` descriptors in this mount namespace; then file
    creation switches to the box's ids (the caller's uid has no mapping here, and files need an
    owner the namespace can name: EOVERFLOW otherwise) and mounts use ``/proc/self/fd/N``.
    """
    k.mount(None, "/", None, MS_REC | MS_PRIVATE)
    layer_fds = [_open_path(layer) for layer in plan.layers]
    bind_fds = [_open_path(m.source) for m in plan.binds]
    build_fd = _open_path(plan.build_dir) if plan.build_dir else None
    k.set_fsids(plan.uid, plan.gid)
    stage_size = (plan.root_size or 0) + (1 << 20)
    k.mount(
        "tmpfs",
        STAGE,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={stage_size},nr_inodes=65536,mode=0700",
    )
    for name in ("points", "upper", "work", "root"):
        os.mkdir(f"{STAGE}/{name}", 0o755)
    root = f"{STAGE}/root"
    # A build step keeps /box out of its layer: it runs in the image's own directories.
    writable_dirs = ("/tmp",) if build_fd is not None else ("/tmp", plan.workdir)
    binds = sorted(zip(plan.binds, bind_fds, strict=True), key=lambda b: b[0].target)
    # Mount points go into a small layer of their own on top of the image's, so they never
    # land in a build step's upper (its layer) and need no write access to the image.
    fixed = (*writable_dirs, "/dev", "/proc")
    targets = [(t, True, True) for t in fixed] + [(m.target, m.is_dir, False) for m, _ in binds]
    for target, is_dir, always in targets:
        if any(_is_under(target, d) and d != target for d in writable_dirs):
            continue  # made once that tmpfs is mounted
        if always or not any(os.path.lexists(f"/proc/self/fd/{fd}{target}") for fd in layer_fds):
            _refuse_layer_symlinks(layer_fds, target)
            _make_mount_point(f"{STAGE}/points{target}", is_dir)
    lowers = ":".join([f"{STAGE}/points", *(f"/proc/self/fd/{fd}" for fd in layer_fds)])
    if build_fd is not None:
        upper, work = f"/proc/self/fd/{build_fd}/upper", f"/proc/self/fd/{build_fd}/work"
    else:
        upper, work = f"{STAGE}/upper", f"{STAGE}/work"
    # redirect_dir=nofollow and metacopy=off: a lower layer's xattrs must never send a lookup
    # elsewhere (overlayfs docs, "Permission model"; CVE-2021-3493-class confusion); userxattr:
    # the box's user namespace reads user.overlay.* (its layers were unpacked that way).
    k.mount(
        "overlay",
        root,
        "overlay",
        MS_NOSUID | MS_NODEV,
        f"lowerdir={lowers},upperdir={upper},workdir={work},userxattr,"
        "redirect_dir=nofollow,metacopy=off",
    )
    noexec = MS_NOEXEC if plan.noexec_tmp else 0
    k.mount(
        "tmpfs",
        root + "/tmp",
        "tmpfs",
        MS_NOSUID | MS_NODEV | noexec,
        f"size={plan.tmp_size},nr_inodes=16384,mode=1777",
    )
    if build_fd is None:
        k.mount(
            "tmpfs",
            root + plan.workdir,
            "tmpfs",
            MS_NOSUID | MS_NODEV | noexec,
            f"size={plan.work_size},nr_inodes=16384,mode=0755,uid={plan.uid},gid={plan.gid}",
        )
    ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    for source, fd in binds:
        path = root + source.target
        _refuse_escape(root, os.path.dirname(path))
        _make_mount_point(path, source.is_dir)
        attrs = ro & ~MOUNT_ATTR_RDONLY if source.writable else ro
        _bind(k, f"/proc/self/fd/{fd}", path, attrs)
    for fd in layer_fds + bind_fds + ([build_fd] if build_fd is not None else []):
        os.close(fd)
    _build_dev(k, root + "/dev")
    _build_proc(k, root + "/proc")
    writable_root = plan.root_size is not None or build_fd is not None
    k.mount_setattr(root, ro & ~MOUNT_ATTR_RDONLY if writable_root else ro, recursive=False)

    k.chdir(root)
    k.pivot_root(".", ".")
    k.umount2(".", MNT_DETACH)
    k.chdir(plan.cwd or plan.workdir)


def _build_dev(k: KernelOps, dev: str) -> None:
    k.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in DEVICES:
        _make_mount_point(f"{dev}/{name}", False)
        # Device nodes cannot be made in a user namespace; bind the host's (as bwrap does).
        _bind(k, f"/dev/{name}", f"{dev}/{name}", MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
    for name, target in DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    k.mount_setattr(dev, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, recursive=False)


def _build_proc(k: KernelOps, proc: str) -> None:
    k.mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in PROC_MASKED:
        path = f"{proc}/{name}"
        if os.path.isdir(path):
            k.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0,mode=0")
            k.mount_setattr(path, MOUNT_ATTR_RDONLY, recursive=False)
        elif os.path.exists(path):
            _bind(k, "/dev/null", path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
    for name in PROC_READONLY:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            _bind(k, path, path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
