"""The box's root filesystem: parent side opens what the root is made of, child side mounts it.

Parent (:func:`plan_root`): opens every layer and bind source once, without following any
symlink (:mod:`sandbox.hostpath`: a box may have planted one in a directory it could write), and
checks what it is, so a bad request fails with a clear message before anything starts. What was
checked is what gets mounted:

* as root, the parent turns each descriptor into a detached copy of its mount tree
  (``open_tree(OPEN_TREE_CLONE)``), which the box's init attaches inside its own mount namespace
  (``move_mount``); the box's processes never open a host path by name, so they can run as the
  box's unprivileged host uid from before the user namespace exists;
* rootless (no ``open_tree`` without CAP_SYS_ADMIN), the box's init opens each path again the
  same way inside its new mount namespace (a bind from a descriptor of another mount namespace
  is refused by the kernel) and refuses it unless it is the very inode the parent checked.

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

from ..baseimage import ensure_base_layer
from ..errors import ConfigError, HostError
from ..hostpath import PathRefused, check_source, open_nofollow
from ..kernel import (
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
    clone_tree,
)
from ..spec import Bind, Spec
from .plan import ChildPlan, HostDir, MountSource, PhaseError, RootPlan
from .userns import bound_counters_from_inside

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


def _host_dir(path: str, detach: bool, what: str, where: str, *, directory: bool) -> HostDir:
    """Check ``path`` (never through a symlink); as root, make its detached tree."""
    try:
        fd, checked = check_source(path)
    except PathRefused as e:
        raise ConfigError(where, what, f"cannot use the source: {e.problem}") from None
    try:
        if directory and not checked.is_dir:
            raise ConfigError(where, what, f"{path} is not a directory")
        if not detach:
            return HostDir(checked)
        try:
            return HostDir(checked, clone_tree(fd))
        except OSError as e:
            raise HostError(f"cannot take a copy of the mount at {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _check_source(bind: Bind, source_name: str, detach: bool) -> MountSource:
    what = f"bind {bind.source}:{bind.target}"
    return MountSource(
        _host_dir(bind.source, detach, what, source_name, directory=False),
        os.path.normpath(bind.target),
        bind.writable,
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


def run_binds(spec: Spec) -> tuple[Bind, ...]:
    """The request's binds a box built ahead can take at its run: as root (they arrive as
    detached trees), each directly in the work dir (its mount point is made in that run's
    fresh tmpfs, never inside another bind), no two on one target."""
    if os.geteuid() != 0:
        return ()
    workdir = spec.profile.workdir.rstrip("/")
    targets = [os.path.normpath(b.target) for b in (*spec.profile.binds, *spec.binds)]
    return tuple(
        b
        for b in spec.binds
        if os.path.dirname(os.path.normpath(b.target)) == workdir
        and targets.count(os.path.normpath(b.target)) == 1
        and not any(t.startswith(os.path.normpath(b.target) + "/") for t in targets)
    )


def plan_run_binds(spec: Spec, binds: tuple[Bind, ...]) -> tuple[MountSource, ...]:
    """Check ``binds`` (as :func:`plan_root` does) and make their detached trees; the caller
    closes them (``source.tree_fd``)."""
    made: list[MountSource] = []
    try:
        for bind in binds:
            _check_target(bind, "request")
            made.append(_check_source(bind, "request", detach=True))
    except BaseException:
        for mount in made:
            if mount.source.tree_fd is not None:
                os.close(mount.source.tree_fd)
        raise
    return tuple(made)


def plan_root(spec: Spec) -> RootPlan:
    """Check and describe the layers and binds of ``spec``'s root.

    As root the result holds detached mount trees: the caller must close
    :meth:`RootPlan.descriptors` (after the fork, or when anything here fails).
    """
    profile = spec.profile
    for bind in (*profile.binds, *spec.binds):
        _check_target(bind, profile.source if bind in profile.binds else "request")
    detach = os.geteuid() == 0
    made: list[HostDir] = []

    def host_dir(path: str, what: str, where: str) -> HostDir:
        made.append(_host_dir(path, detach, what, where, directory=True))
        return made[-1]

    def bind_source(bind: Bind, where: str) -> MountSource:
        mount = _check_source(bind, where, detach)
        made.append(mount.source)
        return mount

    try:
        binds = []
        if spec.image is not None:
            layers = tuple(host_dir(p, "layer", spec.image.reference) for p in spec.image.layers)
        else:
            base = ensure_base_layer(spec.hostname or profile.hostname, profile.uid, profile.gid)
            layers = (host_dir(str(base.path), "layer", "host base"),)
            binds = [bind_source(Bind(d, d), "host base") for d in base.host_binds]
        for bind in (*profile.binds, *spec.binds):
            binds.append(bind_source(bind, profile.source if bind in profile.binds else "request"))
        if spec.link is not None:  # the group's members by name
            binds.append(bind_source(Bind(spec.link.hosts_file, "/etc/hosts"), "group"))
        build_dir = None
        if spec.image is not None and spec.image.upper is not None:
            build_dir = host_dir(spec.image.upper, "build directory", spec.image.reference)
    except BaseException:
        for d in made:
            if d.tree_fd is not None:
                os.close(d.tree_fd)
        raise
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
        build_dir=build_dir,
    )


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _refuse_escape(root: str, path: str) -> None:
    """A mount point's parent must resolve inside the new root (a symlink in a layer could
    otherwise point a mount, or a created mount point, at a path of the host)."""
    real = os.path.realpath(path)
    if real != root and not real.startswith(root + "/"):
        raise OSError(errno.ELOOP, "mount point resolves outside the box's root", path)


def _refuse_layer_symlinks(layer_dirs: list[str], target: str) -> None:
    """A directory made in the upper layer would hide a layer's symlink of the same name
    (``/bin -> usr/bin``) and break every path through it: bind to the real path instead."""
    parts = target.strip("/").split("/")
    for depth in range(1, len(parts)):
        prefix = "/" + "/".join(parts[:depth])
        for directory in layer_dirs:
            if os.path.islink(f"{directory}{prefix}"):
                raise OSError(errno.ELOOP, f"{prefix} is a symlink in the image", target)


def _make_mount_point(k: KernelOps, path: str, is_dir: bool) -> None:
    if is_dir:
        k.make_dirs(path)
    else:
        k.make_dirs(os.path.dirname(path))
        if not os.path.lexists(path):
            k.make_file(path)


def _bind(k: KernelOps, source: str, target: str, attrs: int) -> None:
    k.mount(source, target, None, MS_BIND | MS_REC)
    k.mount_setattr(target, attrs, recursive=True)


def _reopen(host: HostDir) -> int:
    """Rootless: open a checked path again in this mount namespace, and only if it is still
    the inode the supervisor checked (nothing swapped in between)."""
    path = host.checked.path
    try:
        fd = open_nofollow(path, os.O_PATH)
    except PathRefused as e:
        raise OSError(errno.ELOOP, e.problem, path) from None
    if not host.checked.same_as(os.fstat(fd)):
        os.close(fd)
        raise OSError(errno.ESTALE, "changed since the supervisor checked it", path)
    return fd


def _tree(host: HostDir) -> int:
    if host.tree_fd is None:
        raise OSError(errno.EBADF, "no mount tree for this host path", host.checked.path)
    return host.tree_fd


class _Sources:
    """The host dirs of a plan as paths this mount namespace can mount from."""

    def __init__(self) -> None:
        self.fds: list[int] = []  # descriptors to close once the root is built

    def open(self, host: HostDir) -> str | None:
        """Rootless: ``/proc/self/fd/N`` of a re-checked descriptor; None for a tree."""
        if host.tree_fd is not None:
            self.fds.append(host.tree_fd)
            return None
        self.fds.append(_reopen(host))
        return f"/proc/self/fd/{self.fds[-1]}"

    def place(self, k: KernelOps, host: HostDir, opened: str | None, path: str) -> str:
        """A directory path for ``host``: the opened one, or its tree attached at ``path``."""
        if host.tree_fd is None and opened is not None:
            return opened
        k.mkdir(path)
        k.attach_tree(_tree(host), path)
        return path

    def bind(
        self, k: KernelOps, host: HostDir, opened: str | None, target: str, attrs: int
    ) -> None:
        """Mount ``host`` at ``target`` with ``attrs`` (recursively)."""
        if host.tree_fd is None and opened is not None:
            k.mount(opened, target, None, MS_BIND | MS_REC)
        else:
            k.attach_tree(_tree(host), target)
        k.mount_setattr(target, attrs, recursive=True)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def build_root(k: KernelOps, plan: RootPlan) -> None:
    """Child side: assemble the root described by ``plan`` and pivot into it.

    Rootless, sources are opened first, with the caller's host uid (so a bind from a directory
    only the caller may enter works), as ``O_PATH`` descriptors in this mount namespace; as
    root, the supervisor's detached trees are attached instead. Then file creation switches to
    the box's ids (files need an owner the namespace can name: EOVERFLOW otherwise).
    """
    k.mount(None, "/", None, MS_REC | MS_PRIVATE)
    sources = _Sources()
    opened_layers = [sources.open(layer) for layer in plan.layers]
    opened_binds = [sources.open(m.source) for m in plan.binds]
    opened_build = sources.open(plan.build_dir) if plan.build_dir is not None else None
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
        k.mkdir(f"{STAGE}/{name}")
    layer_dirs = [
        sources.place(k, layer, opened, f"{STAGE}/layer{i}")
        for i, (layer, opened) in enumerate(zip(plan.layers, opened_layers, strict=True))
    ]
    build = (
        sources.place(k, plan.build_dir, opened_build, f"{STAGE}/build")
        if plan.build_dir is not None
        else None
    )
    root = f"{STAGE}/root"
    # A build step keeps /box out of its layer: it runs in the image's own directories.
    writable_dirs = ("/tmp",) if build is not None else ("/tmp", plan.workdir)
    binds = sorted(zip(plan.binds, opened_binds, strict=True), key=lambda b: b[0].target)
    # Mount points go into a small layer of their own on top of the image's, so they never
    # land in a build step's upper (its layer) and need no write access to the image.
    fixed = (*writable_dirs, "/dev", "/proc")
    targets = [(t, True, True) for t in fixed] + [(m.target, m.is_dir, False) for m, _ in binds]
    for target, is_dir, always in targets:
        if any(_is_under(target, d) and d != target for d in writable_dirs):
            continue  # made once that tmpfs is mounted
        if always or not any(os.path.lexists(f"{d}{target}") for d in layer_dirs):
            _refuse_layer_symlinks(layer_dirs, target)
            _make_mount_point(k, f"{STAGE}/points{target}", is_dir)
    lowers = ":".join([f"{STAGE}/points", *layer_dirs])
    if build is not None:
        upper, work = f"{build}/upper", f"{build}/work"
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
    if build is None:
        k.mount(
            "tmpfs",
            root + plan.workdir,
            "tmpfs",
            MS_NOSUID | MS_NODEV | noexec,
            f"size={plan.work_size},nr_inodes=16384,mode=0755,uid={plan.uid},gid={plan.gid}",
        )
    ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    for mount, opened in binds:
        path = root + mount.target
        _refuse_escape(root, os.path.dirname(path))
        _make_mount_point(k, path, mount.is_dir)
        attrs = ro & ~MOUNT_ATTR_RDONLY if mount.writable else ro
        sources.bind(k, mount.source, opened, path, attrs)
    sources.close()
    _build_dev(k, root + "/dev")
    _build_proc(k, root + "/proc")
    writable_root = plan.root_size is not None or build is not None
    k.mount_setattr(root, ro & ~MOUNT_ATTR_RDONLY if writable_root else ro, recursive=False)

    k.chdir(root)
    k.pivot_root(".", ".")
    k.umount2(".", MNT_DETACH)
    k.chdir(plan.cwd or plan.workdir)


def _build_dev(k: KernelOps, dev: str) -> None:
    k.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in DEVICES:
        _make_mount_point(k, f"{dev}/{name}", False)
        # Device nodes cannot be made in a user namespace; bind the host's (as bwrap does).
        _bind(k, f"/dev/{name}", f"{dev}/{name}", MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
    for name, target in DEV_LINKS:
        k.symlink(target, f"{dev}/{name}")
    k.mount_setattr(dev, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, recursive=False)


def _build_proc(k: KernelOps, proc: str) -> None:
    k.mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    bound_counters_from_inside(proc)  # before /proc/sys becomes read-only below
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


# --- child side: the box's init builds the root, the Python init's program waits for it -----


def child_mount_root(k: KernelOps, plan: ChildPlan) -> None:
    build_root(k, plan.root)


def child_announce_root(k: KernelOps, plan: ChildPlan) -> None:
    """Tell the program's process (forked early, waiting) that the root is ready."""
    k.write(plan.root_ready[1], b"1")
    k.close(plan.root_ready[1])


def child_await_root(k: KernelOps, plan: ChildPlan) -> None:
    """Wait for init to build the root, then enter the work dir.

    pivot_root(2) moved this process's root (it was the old root) but not its working
    directory, which was the caller's: it must be replaced before anything else runs here.
    """
    read_end, write_end = plan.root_ready
    k.close(write_end)
    if k.read(read_end, 1) != b"1":
        raise PhaseError("await_root", "wait for the root", 0, "init failed to build it")
    k.close(read_end)
    k.chdir(plan.root.cwd or plan.root.workdir)
