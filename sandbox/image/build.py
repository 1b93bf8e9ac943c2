"""``sandbox image build``: turn a build file and a context directory into an image.

Each ``RUN``, ``COPY`` and ``BUNDLE`` adds one layer; the other instructions change the config.
``RUN`` runs in a box of the ``build`` profile on the image so far, with a writable upper
directory whose contents become the layer (whiteouts included); inside, the command is uid 0 of
its user namespace, mapped to the host id that owns unpacked layers, so it may change any file of
the image as a build's root does, but holds no capability, no network, and the seccomp filter of
the profile. The upper directory is a size-capped tmpfs (the run profile's ``root_size``, or
``--root-size``), mounted in a private mount namespace of the builder process, so a step cannot
fill the host's disk. ``COPY`` reads the context and writes the staging tree only through
directory descriptors (:mod:`.dirfd`): no symlink, in the context or staged by an earlier
source, is ever followed, and a FIFO never blocks; ``BUNDLE`` reads the host. The layer cache
maps (parent chain, instruction, inputs) to a layer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from ..baseimage import world_readable
from ..box.userns import HostIds, image_owner, write_maps
from ..errors import ImageError
from ..hostpath import PathRefused, open_nofollow
from ..kernel import (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MNT_DETACH,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    Kernel,
)
from ..profiles import load_profile
from ..report import Report
from ..spec import Spec, build_step_spec
from ..units import format_size
from . import elf
from .buildfile import Instruction, parse_buildfile
from .dirfd import (
    DIR_FLAGS,
    Unwalkable,
    copy_data,
    create_file,
    open_dir,
    open_regular,
    remove_entry,
    remove_tree,
    walk,
)
from .layerwriter import WrittenLayer, write_layer
from .oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    Descriptor,
    ImageConfig,
    canonical_json,
    manifest_json,
)
from .store import Image, Store

DEFAULT_FILE = "Sandboxfile"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What a RUN step may write when neither ``--root-size`` nor the run profile's ``root_size``
#: says: its changes live in memory (tmpfs) until they become a layer.
DEFAULT_STEP_SIZE = 1 << 30
MAX_BUILDFILE = 1 << 20
Progress = Callable[[str], None]


@dataclass
class _State:
    layers: list[tuple[Descriptor, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, object]] = field(default_factory=list)
    chain: str = "scratch"

    def config(self) -> ImageConfig:
        return ImageConfig(
            architecture="amd64",
            os="linux",
            diff_ids=tuple(d for _, d in self.layers),
            env=tuple(self.env.items()),
            entrypoint=self.entrypoint,
            cmd=self.cmd,
            workdir=self.workdir,
            user=self.user,
            labels=tuple(sorted(self.labels.items())),
            history=tuple(self.history),
        )


def _hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def tree_digest(root_fd: int) -> str:
    """A digest of a staged tree: paths, types, modes, link targets and contents."""
    h = hashlib.sha256()
    for node in walk(root_fd):
        h.update(f"{node.rel}\0{node.st.st_mode:o}\0".encode())
        if stat.S_ISLNK(node.st.st_mode):
            h.update(os.readlink(node.name, dir_fd=node.dir_fd).encode())
        elif stat.S_ISREG(node.st.st_mode):
            opened = open_regular(node.dir_fd, node.name)
            if opened is None:
                raise ImageError(f"staged {node.rel} changed while it was read")
            with os.fdopen(opened[0], "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _read_buildfile(path: Path) -> bytes:
    """The build file's bytes; ``O_NONBLOCK`` and fstat(2): a FIFO there never blocks."""
    try:
        # Never through a symlink: a box may have planted one in a context it could write
        # (``Sandboxfile -> /etc/shadow``), and parse errors quote what they read.
        fd = open_nofollow(os.path.abspath(path), os.O_RDONLY | os.O_NONBLOCK)
    except PathRefused as e:
        raise ImageError(f"cannot read build file {path}: {e.problem}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"build file {path} is not a regular file")
        data = f.read(MAX_BUILDFILE + 1)
    if len(data) > MAX_BUILDFILE:
        raise ImageError(f"build file {path} is larger than {format_size(MAX_BUILDFILE)}")
    return data


class BoxRunner(Protocol):
    """Runs a box to its end and returns its report, as :func:`sandbox.supervisor.run_box` does
    (``stdin_fd``, ``stdout`` and ``stderr`` are descriptors the box takes over).

    Whoever starts a build passes one in, so the image engine, below the supervisor, never
    imports it.
    """

    def __call__(self, spec: Spec, stdin_fd: int, stdout: int, stderr: int, /) -> Report: ...


class Builder:
    """Builds one build file; ``progress`` receives one line per step, ``run_step`` runs the
    box of each RUN step (its Spec made by :func:`~sandbox.spec.build_step_spec` from the
    ``run_profile`` profile).

    ``root_size`` caps what each RUN step may write (its upper directory); None: the run
    profile's ``root_size``, else :data:`DEFAULT_STEP_SIZE`.
    """

    def __init__(
        self,
        store: Store,
        progress: Progress,
        run_step: BoxRunner,
        use_cache: bool = True,
        run_profile: str = "build",
        root_size: int | None = None,
    ) -> None:
        self.store = store
        self.progress = progress
        self.run_step = run_step
        self.use_cache = use_cache
        self.run_profile = run_profile
        self.root_size = root_size

    def build(self, buildfile: Path, context: Path, tags: list[str]) -> Image:
        """Build, store and tag the image; returns it."""
        instructions = parse_buildfile(_read_buildfile(buildfile), str(buildfile))
        try:
            # The context too: a planted ``ctx -> /`` would put the host's files in the image.
            context_fd = open_nofollow(
                os.path.abspath(context), os.O_RDONLY | os.O_DIRECTORY
            )
        except PathRefused as e:
            raise ImageError(f"build context {context}: {e.problem}") from None
        state = _State()
        try:
            with self.store.using():
                for number, ins in enumerate(instructions, 1):
                    started = time.monotonic()
                    self.progress(f"[{number}/{len(instructions)}] {ins.text[:100]}")
                    note = self.step(state, ins, buildfile, context_fd)
                    self.progress(f"    -> {note} ({time.monotonic() - started:.2f} s)")
                config = canonical_json(state.config().to_json())
                config_digest = self.store.put_bytes(config)
                manifest = manifest_json(
                    Descriptor(OCI_CONFIG, config_digest, len(config)),
                    [d for d, _ in state.layers],
                )
                image = self.store.add_image(manifest)
                for tag in tags:
                    self.store.tag(tag, image.digest)
        finally:
            os.close(context_fd)
        return image

    def step(self, state: _State, ins: Instruction, buildfile: Path, context_fd: int) -> str:
        where = f"{buildfile}:{ins.line}"
        state.history.append(
            {
                "created_by": ins.text[:1000],
                "empty_layer": ins.keyword not in ("RUN", "COPY", "BUNDLE"),
            }
        )
        if ins.keyword == "FROM":
            return self.base(state, ins.args[0])
        state.chain = _hash(state.chain, ins.text)
        if ins.keyword == "ENV":
            for pair in ins.args:
                name, _, value = pair.partition("=")
                state.env[name] = value
        elif ins.keyword == "LABEL":
            for pair in ins.args:
                name, _, value = pair.partition("=")
                state.labels[name] = value
        elif ins.keyword == "WORKDIR":
            state.workdir = os.path.normpath(os.path.join(state.workdir or "/", ins.args[0]))
        elif ins.keyword == "USER":
            state.user = ins.args[0]
        elif ins.keyword == "CMD":
            state.cmd = ins.args
        elif ins.keyword == "ENTRYPOINT":
            state.entrypoint = ins.args
        elif ins.keyword == "RUN":
            return self.layer(state, None, lambda d: self.run(state, ins, where, d), upper=True)
        else:
            stage = tempfile.mkdtemp(dir=self.store.root / "tmp", prefix="stage-")
            try:
                stage_fd = os.open(stage, DIR_FLAGS)
                try:
                    stager = _Stager(stage_fd, where)
                    if ins.keyword == "COPY":
                        copy_context(ins, context_fd, stager, state.workdir or "/")
                    else:
                        bundle(ins, stager)
                    stager.finish()
                    digest = tree_digest(stage_fd)
                finally:
                    os.close(stage_fd)
                return self.layer(
                    state, digest, lambda _: contextlib.nullcontext(stage), upper=False
                )
            finally:
                remove_tree(Path(stage))
        return "config"

    def base(self, state: _State, reference: str) -> str:
        if reference == "scratch":
            return "empty image"
        image = self.store.image(reference)
        config = image.config
        state.layers = list(zip(image.manifest.layers, config.diff_ids, strict=True))
        state.env = dict(config.env)
        state.entrypoint, state.cmd = config.entrypoint, config.cmd
        state.workdir, state.user = config.workdir, config.user
        state.labels = dict(config.labels)
        state.history = [*config.history, *state.history]
        state.chain = image.digest
        return f"{len(state.layers)} layers from {image.digest[:19]}"

    def layer(
        self,
        state: _State,
        inputs: str | None,
        make: Callable[[str], contextlib.AbstractContextManager[str]],
        upper: bool,
    ) -> str:
        """Reuse the cached layer for (chain, inputs) or make one from the dir ``make`` gives
        while its context is open (``make`` gets a scratch directory; ``upper``: the result is
        an overlay upper)."""
        key = _hash(state.chain, inputs or "")
        cached = self._cached(key)
        if cached is not None:
            state.layers.append(cached)
            state.chain = key
            return f"cached layer {cached[0].digest[:19]}"
        build_dir = tempfile.mkdtemp(dir=self.store.root / "tmp", prefix="build-")
        try:
            with make(build_dir) as source:
                layers: list[WrittenLayer] = []

                def write(out: BinaryIO) -> str:
                    layers.append(write_layer(source, out, upper=upper))
                    return layers[0].digest

                self.store.write_blob(write)
            written = layers[0]
        finally:
            remove_tree(Path(build_dir))
        descriptor = Descriptor(OCI_LAYER_GZIP, written.digest, written.size)
        self.store.unpack(descriptor, written.diff_id)
        state.layers.append((descriptor, written.diff_id))
        state.chain = key
        entry = {"digest": written.digest, "size": written.size, "diff_id": written.diff_id}
        fd, tmp = tempfile.mkstemp(dir=self.store.root / "tmp", prefix="cache-")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, self.store.root / "cache" / key)
        return f"layer {written.digest[:19]}, {written.size / 1e6:.1f} MB"

    def _cached(self, key: str) -> tuple[Descriptor, str] | None:
        if not self.use_cache:
            return None
        try:
            entry = json.loads((self.store.root / "cache" / key).read_text())
            descriptor = Descriptor(OCI_LAYER_GZIP, entry["digest"], int(entry["size"]))
            diff_id = str(entry["diff_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (
            not self.store.has_blob(descriptor.digest)
            or not self.store.layer_path(diff_id).is_dir()
        ):
            return None
        return descriptor, diff_id

    @contextlib.contextmanager
    def run(self, state: _State, ins: Instruction, where: str, build_dir: str) -> Iterator[str]:
        """Run ``ins`` in a build box over the image so far; yields the upper directory, on a
        tmpfs of the step's size that is unmounted (and so freed) when the context ends."""
        profile = load_profile(self.run_profile)
        size = self.root_size or profile.limits.root_size or DEFAULT_STEP_SIZE
        with _capped_dir(build_dir, size, where):
            env = {"PATH": DEFAULT_PATH, "HOME": "/root"} | state.env
            spec = build_step_spec(
                profile,
                ins.args,
                env=tuple(env.items()),
                cwd=state.workdir or "/",
                step=where,
                layers=tuple(str(self.store.layer_path(d)) for _, d in reversed(state.layers)),
                store=str(self.store.root),
                upper=build_dir,
            )
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                report = self.run_step(spec, stdin, os.dup(2), os.dup(2))
            finally:
                os.close(stdin)
            full = os.statvfs(build_dir)
            if full.f_bavail == 0 or full.f_favail == 0:
                raise ImageError(
                    f"{where}: RUN wrote more than the {format_size(size)} a build step may "
                    "write (root_size)",
                    hint="raise it with `sandbox image build --root-size SIZE` or the run "
                    "profile's root_size",
                )
            if report.verdict.value != "ok":
                detail = report.error or f"exit code {report.exit_code}"
                raise ImageError(f"{where}: RUN failed: {report.verdict.value} ({detail})")
            yield os.path.join(build_dir, "upper")


_MOUNTS_PRIVATE = False


def _private_mount_namespace() -> None:
    """Move this process, once, into a mount namespace of its own, so a step's tmpfs is seen
    by its box and the builder only (and vanishes with them, even on SIGKILL).

    Without root, a user namespace mapping only our own ids comes with it (user_namespaces(7):
    the namespace's owner may mount tmpfs in it); the boxes' namespaces nest in it as usual.
    unshare(2) with CLONE_NEWUSER requires a single-threaded caller.
    """
    global _MOUNTS_PRIVATE
    if _MOUNTS_PRIVATE:
        return
    if threading.active_count() != 1:
        raise ImageError("a build with RUN steps must run in a single-threaded process")
    k = Kernel()
    try:
        if os.geteuid() == 0:
            k.unshare(CLONE_NEWNS)
        else:
            uid, gid = os.geteuid(), os.getegid()
            k.unshare(CLONE_NEWUSER | CLONE_NEWNS)
            write_maps(os.getpid(), uid, gid, HostIds(uid, gid))
        # Private first: a mount in a copy of a shared tree would propagate to the host's.
        k.mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as e:
        raise ImageError(f"cannot make a private mount namespace for RUN steps: {e}") from None
    _MOUNTS_PRIVATE = True


@contextlib.contextmanager
def _capped_dir(build_dir: str, size: int, where: str) -> Iterator[None]:
    """Mount a ``size``-byte tmpfs on ``build_dir`` holding the step's ``upper`` and ``work``,
    owned by the image owner; unmount it at the end."""
    _private_mount_namespace()
    k = Kernel()
    owner = image_owner()
    ids = f",uid={owner[0]},gid={owner[1]}" if os.geteuid() == 0 else ""
    inodes = max(65536, size // 8192)
    try:
        k.mount(
            "tmpfs",
            build_dir,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"size={size},nr_inodes={inodes},mode=0700{ids}",
        )
    except OSError as e:
        raise ImageError(f"{where}: cannot mount the RUN step's tmpfs: {e}") from None
    try:
        fd = os.open(build_dir, DIR_FLAGS)
        try:
            for name, mode in (("upper", 0o755), ("work", 0o700)):
                os.mkdir(name, 0o700, dir_fd=fd)
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                try:
                    os.fchmod(sub, mode)  # upper's mode is the box's "/"
                    if os.geteuid() == 0:
                        os.fchown(sub, *owner)
                finally:
                    os.close(sub)
        finally:
            os.close(fd)
        yield
    finally:
        k.umount2(build_dir, MNT_DETACH)


class _Stager:
    """Writes a COPY's or BUNDLE's staging tree through directory descriptors only.

    Later sources win, as in docker: what an earlier one put at a name is removed first
    (unlinkat(2), never followed), and every file is made ``O_EXCL|O_NOFOLLOW``, so a symlink
    an earlier source staged is replaced, never written or chmodded through; a staged symlink
    on the way to a destination refuses the instruction. Directory modes are set last, deepest
    first, so a read-only directory can still be filled.
    """

    def __init__(self, stage_fd: int, where: str) -> None:
        self.fd = stage_fd
        self.where = where
        self.dirs: dict[tuple[str, ...], int] = {}

    def _made(self, parent_fd: int, name: str, parts: tuple[str, ...]) -> None:
        self.dirs.setdefault(parts, 0o755)

    def directory(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the staged directory ``parts``, made as needed."""
        try:
            return open_dir(self.fd, parts, create=True, made=self._made)
        except Unwalkable as e:
            raise ImageError(f"{self.where}: staging /{e}") from None

    def exists(self, parts: tuple[str, ...]) -> bool:
        parent = self.directory(parts[:-1])
        try:
            os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(parent)

    def symlink(self, link: str, parts: tuple[str, ...], replace_old: bool) -> None:
        parent = self.directory(parts[:-1])
        try:
            if replace_old:
                remove_entry(parent, parts[-1])
            with contextlib.suppress(FileExistsError):
                os.symlink(link, parts[-1], dir_fd=parent)
        finally:
            os.close(parent)

    def file(self, source_fd: int, parts: tuple[str, ...], mode: int) -> None:
        """Copy the open regular file ``source_fd`` to a new staged file ``parts``."""
        parent = self.directory(parts[:-1])
        try:
            remove_entry(parent, parts[-1])
            fd = create_file(parent, parts[-1], mode)
            try:
                copy_data(source_fd, fd)
            finally:
                os.close(fd)
        finally:
            os.close(parent)

    def mkdir(self, parts: tuple[str, ...], mode: int | None) -> None:
        """A staged directory ``parts`` (``mode`` applied at the end; 0755 if None)."""
        parent = self.directory(parts[:-1])
        try:
            remove_entry(parent, parts[-1], keep_dir=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
        finally:
            os.close(parent)
        if mode is None:
            self.dirs.setdefault(parts, 0o755)
        else:
            self.dirs[parts] = mode

    def finish(self) -> None:
        for parts in sorted(self.dirs, key=len, reverse=True):
            try:
                fd = open_dir(self.fd, parts)
            except Unwalkable:
                continue  # replaced by a later source
            try:
                os.fchmod(fd, self.dirs[parts])
            finally:
                os.close(fd)


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p not in ("", "."))


def copy_context(ins: Instruction, context_fd: int, stager: _Stager, workdir: str) -> None:
    """Stage ``COPY``: symlinks are copied as symlinks, never followed; FIFOs, sockets and
    devices in a copied directory are skipped (and refused when named)."""
    where = stager.where
    *sources, dest = ins.args
    dest = os.path.normpath(os.path.join(workdir, dest)) + ("/" if dest.endswith("/") else "")
    mode = int(ins.option("chmod")[-1], 8) if ins.option("chmod") else None
    into_dir = dest.endswith("/") or len(sources) > 1
    dest_parts = _parts(dest)
    for source in sources:
        parts = _parts(source)
        if ".." in parts:
            raise ImageError(f"{where}: COPY source {source!r} leaves the build context")
        try:
            parent = open_dir(context_fd, parts[:-1])
        except Unwalkable:
            raise ImageError(
                f"{where}: COPY source {source!r} goes through a symlink or a file, or is not "
                "in the build context"
            ) from None
        try:
            _copy_source(stager, parent, parts, source, dest_parts, into_dir, mode)
        finally:
            os.close(parent)


def _copy_source(
    stager: _Stager,
    parent: int,
    parts: tuple[str, ...],
    source: str,
    dest_parts: tuple[str, ...],
    into_dir: bool,
    mode: int | None,
) -> None:
    where = stager.where
    if not parts:  # the context itself
        _copy_tree(stager, parent, dest_parts, mode)
        return
    name = parts[-1]
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise ImageError(f"{where}: COPY source {source!r} is not in the build context") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            raise ImageError(f"{where}: COPY source {source!r}: {e.strerror}") from None
        try:
            _copy_tree(stager, fd, dest_parts, mode)
        finally:
            os.close(fd)
        return
    target = (*dest_parts, name) if into_dir else dest_parts
    if not target:
        raise ImageError(f"{where}: COPY {source!r}: the destination names no file")
    if not _copy_entry(stager, parent, name, st, target, mode):
        raise ImageError(f"{where}: COPY source {source!r} is not a file, directory or symlink")


def _copy_tree(stager: _Stager, fd: int, target: tuple[str, ...], mode: int | None) -> None:
    if target:
        stager.mkdir(target, None)
    for node in walk(fd):  # never follows symlinked directories
        _copy_entry(stager, node.dir_fd, node.name, node.st, (*target, *node.rel.split("/")), mode)


def _copy_entry(
    stager: _Stager,
    dir_fd: int,
    name: str,
    st: os.stat_result,
    target: tuple[str, ...],
    mode: int | None,
) -> bool:
    """Stage one context entry at ``target``; False if it is no file, directory or symlink."""
    if stat.S_ISLNK(st.st_mode):
        stager.symlink(os.readlink(name, dir_fd=dir_fd), target, replace_old=True)
    elif stat.S_ISDIR(st.st_mode):
        stager.mkdir(target, mode if mode is not None else st.st_mode & 0o777)
    elif stat.S_ISREG(st.st_mode):
        opened = open_regular(dir_fd, name)  # O_NONBLOCK: a FIFO swapped in does not block
        if opened is None:
            return False
        fd, fst = opened
        try:
            stager.file(fd, target, mode if mode is not None else fst.st_mode & 0o777)
        finally:
            os.close(fd)
    else:
        return False
    return True


def bundle(ins: Instruction, stager: _Stager) -> None:
    """Stage ``BUNDLE``: host paths (and their symlink chains) plus their library closure."""
    where = stager.where
    excludes = ins.option("exclude")
    staged: list[str] = []
    for path in ins.args:
        if not os.path.lexists(path):
            raise ImageError(f"{where}: BUNDLE: {path} does not exist on this host")
        staged += _stage_host_path(path, stager, excludes)
    for lib in elf.closure(staged):
        _stage_host_path(lib, stager, excludes)


def _world_reachable(path: str) -> bool:
    """Every directory above ``path``'s real location may be entered by anyone: a 0644 file in
    a 0700 directory is still a secret (a planted symlink could point BUNDLE at one)."""
    directory = os.path.dirname(os.path.realpath(path))
    while True:
        try:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        if directory == "/":
            return True
        directory = os.path.dirname(directory)


def _stage_host_path(path: str, stager: _Stager, excludes: list[str]) -> list[str]:
    """Copy host ``path`` to the same place in the stage, recreating symlinks on the way."""
    copied: list[str] = []
    parts = [p for p in path.split("/") if p]
    current = "/"
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode):
            link = os.readlink(current)
            stager.symlink(link, _parts(current), replace_old=False)
            rest = "/".join(parts[i + 1 :])
            resolved = os.path.normpath(os.path.join(os.path.dirname(current), link))
            return copied + _stage_host_path(
                os.path.join(resolved, rest) if rest else resolved, stager, excludes
            )
        if i < len(parts) - 1:
            os.close(stager.directory(_parts(current)))
            continue
        if stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(current):
                dirnames[:] = [
                    d for d in dirnames if not _excluded(os.path.join(dirpath, d), excludes)
                ]
                for name in sorted(dirnames + filenames):
                    full = os.path.join(dirpath, name)
                    if not _excluded(full, excludes):
                        copied += _copy_host(full, stager)
            os.close(stager.directory(_parts(current)))
        else:
            copied += _copy_host(current, stager)
    return copied


def _excluded(path: str, excludes: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in excludes)


def _copy_host(path: str, stager: _Stager) -> list[str]:
    st = os.lstat(path)
    target = _parts(path)
    if stat.S_ISLNK(st.st_mode):
        if stager.exists(target):
            return []
        stager.symlink(os.readlink(path), target, replace_old=False)
        # A link to a file (libstdc++.so -> libstdc++.so.6) brings the file; a link to a
        # directory does not bring the directory's whole tree.
        real = os.path.realpath(path)
        if os.path.isfile(real) and not stager.exists(_parts(real)):
            return _stage_host_path(real, stager, [])
        return []
    if stat.S_ISDIR(st.st_mode):
        os.close(stager.directory(target))
        return []
    if not stat.S_ISREG(st.st_mode):
        return []
    secret = ImageError(
        f"{stager.where}: BUNDLE: {path} is not world-readable: refusing to put a secret in an "
        "image"
    )
    if not world_readable(st) or not _world_reachable(path):
        raise secret
    if stager.exists(target):
        return [path]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"{stager.where}: BUNDLE: cannot read {path}: {e.strerror}") from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            return []
        if not world_readable(fst):  # the file opened, not the one looked at
            raise secret
        stager.file(fd, target, fst.st_mode & 0o755)
    finally:
        os.close(fd)
    return [path]
