"""``sandbox image build``: turn a build file and a context directory into an image.

Each ``RUN``, ``COPY`` and ``BUNDLE`` adds one layer; the other instructions change the config.
``RUN`` runs in a box of the ``build`` profile on the image so far, with a writable upper
directory on the host whose contents become the layer (whiteouts included); inside, the command
is uid 0 of its user namespace, mapped to the host id that owns unpacked layers, so it may change
any file of the image as a build's root does, but holds no capability, no network, and the
seccomp filter of the profile. ``COPY`` reads the context without following symlinks out of it;
``BUNDLE`` reads the host. The layer cache maps (parent chain, instruction, inputs) to a layer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from ..baseimage import world_readable
from ..errors import ImageError
from ..userns import image_owner
from . import elf
from .buildfile import Instruction, parse_buildfile
from .layerwriter import WrittenLayer, write_layer
from .oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    Descriptor,
    ImageConfig,
    canonical_json,
    manifest_json,
)
from .store import Image, Store, remove_tree

DEFAULT_FILE = "Sandboxfile"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
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


def tree_digest(root: str) -> str:
    """A digest of a staged tree: paths, types, modes, link targets and contents."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(f"{os.path.relpath(path, root)}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()


class Builder:
    """Builds one build file; ``progress`` receives one line per step."""

    def __init__(
        self, store: Store, progress: Progress, use_cache: bool = True, run_profile: str = "build"
    ) -> None:
        self.store = store
        self.progress = progress
        self.use_cache = use_cache
        self.run_profile = run_profile

    def build(self, buildfile: Path, context: Path, tags: list[str]) -> Image:
        """Build, store and tag the image; returns it."""
        try:
            data = buildfile.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read build file {buildfile}: {e.strerror}") from None
        instructions = parse_buildfile(data, str(buildfile))
        if not context.is_dir():
            raise ImageError(f"build context {context} is not a directory")
        state = _State()
        with self.store.using():
            for number, ins in enumerate(instructions, 1):
                started = time.monotonic()
                self.progress(f"[{number}/{len(instructions)}] {ins.text[:100]}")
                note = self.step(state, ins, buildfile, context.resolve())
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
        return image

    def step(self, state: _State, ins: Instruction, buildfile: Path, context: Path) -> str:
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
            with tempfile.TemporaryDirectory(dir=self.store.root / "tmp") as stage:
                if ins.keyword == "COPY":
                    copy_context(ins, context, stage, state.workdir or "/", where)
                else:
                    bundle(ins, stage, where)
                return self.layer(state, tree_digest(stage), lambda _: stage, upper=False)
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
        self, state: _State, inputs: str | None, make: Callable[[str], str], upper: bool
    ) -> str:
        """Reuse the cached layer for (chain, inputs) or make one from the dir ``make`` gives
        (``make`` gets a scratch directory; ``upper``: the result is an overlay upper)."""
        key = _hash(state.chain, inputs or "")
        cached = self._cached(key)
        if cached is not None:
            state.layers.append(cached)
            state.chain = key
            return f"cached layer {cached[0].digest[:19]}"
        build_dir = tempfile.mkdtemp(dir=self.store.root / "tmp", prefix="build-")
        try:
            source = make(build_dir)
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
        (self.store.root / "cache" / key).write_text(
            json.dumps({"digest": written.digest, "size": written.size, "diff_id": written.diff_id})
        )
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

    def run(self, state: _State, ins: Instruction, where: str, build_dir: str) -> str:
        """Run ``ins`` in a build box over the image so far; returns the upper directory."""
        from ..profiles import load_profile
        from ..spec import ImageRoot, Spec
        from ..supervisor import run_box

        upper = os.path.join(build_dir, "upper")
        owner = image_owner()
        for d in (build_dir, upper, os.path.join(build_dir, "work")):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)  # noqa: S103 - boxes must traverse their layers
            if os.geteuid() == 0:
                os.chown(d, *owner)
        profile = load_profile(self.run_profile)
        profile = replace(profile, uid=0, gid=0)
        layers = tuple(str(self.store.layer_path(d)) for _, d in reversed(state.layers))
        env = {"PATH": DEFAULT_PATH, "HOME": "/root"} | state.env
        spec = Spec(
            profile=replace(profile, env=()),
            argv=ins.args,
            limits=profile.limits,
            env=tuple(env.items()),
            cwd=state.workdir or "/",
            image=ImageRoot(f"build step {where}", "", layers, str(self.store.root), build_dir),
        )
        stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            report = run_box(spec, stdin, os.dup(2), os.dup(2))
        finally:
            os.close(stdin)
        if report.verdict.value != "ok":
            detail = report.error or f"exit code {report.exit_code}"
            raise ImageError(f"{where}: RUN failed: {report.verdict.value} ({detail})")
        return upper


def _safe_join(context: Path, relative: str, where: str) -> Path:
    """``relative`` inside ``context``, refusing '..' and symlinked directories on the way."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{where}: COPY source {relative!r} leaves the build context")
    path = context
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            raise ImageError(f"{where}: COPY source {relative!r} goes through a symlink or a file")
    return path / parts[-1] if parts else context


def copy_context(ins: Instruction, context: Path, stage: str, workdir: str, where: str) -> None:
    """Stage ``COPY``: symlinks are copied as symlinks, never followed."""
    *sources, dest = ins.args
    dest = os.path.normpath(os.path.join(workdir, dest)) + ("/" if dest.endswith("/") else "")
    mode = int(ins.option("chmod")[-1], 8) if ins.option("chmod") else None
    into_dir = dest.endswith("/") or len(sources) > 1
    for source in sources:
        path = _safe_join(context, source, where)
        if not path.exists() and not path.is_symlink():
            raise ImageError(f"{where}: COPY source {source!r} is not in the build context")
        if path.is_dir() and not path.is_symlink():
            target = Path(stage + dest.rstrip("/"))
            _copy_tree(path, target, mode)
        else:
            target = Path(stage + (dest.rstrip("/") + "/" + path.name if into_dir else dest))
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_one(path, target, mode)


def _copy_one(source: Path, target: Path, mode: int | None) -> None:
    st = os.lstat(source)
    if stat.S_ISLNK(st.st_mode):
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(os.readlink(source), target)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(source, target, follow_symlinks=False)
        os.chmod(target, mode if mode is not None else st.st_mode & 0o777)
    elif stat.S_ISDIR(st.st_mode):
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, mode if mode is not None else st.st_mode & 0o777)


def _copy_tree(source: Path, target: Path, mode: int | None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(source):  # never follows symlinked dirs
        rel = os.path.relpath(dirpath, source)
        for name in dirnames + filenames:
            _copy_one(Path(dirpath) / name, target / rel / name, mode)


def bundle(ins: Instruction, stage: str, where: str) -> None:
    """Stage ``BUNDLE``: host paths (and their symlink chains) plus their library closure."""
    excludes = ins.option("exclude")
    staged: list[str] = []
    for path in ins.args:
        if not os.path.lexists(path):
            raise ImageError(f"{where}: BUNDLE: {path} does not exist on this host")
        staged += _stage_host_path(path, stage, excludes, where)
    for lib in elf.closure(staged):
        _stage_host_path(lib, stage, excludes, where)


def _stage_host_path(path: str, stage: str, excludes: list[str], where: str) -> list[str]:
    """Copy host ``path`` to the same place in ``stage``, recreating symlinks on the way."""
    copied: list[str] = []
    parts = [p for p in path.split("/") if p]
    current = "/"
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        st = os.lstat(current)
        target = stage + current
        if stat.S_ISLNK(st.st_mode):
            link = os.readlink(current)
            if not os.path.lexists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(link, target)
            rest = "/".join(parts[i + 1 :])
            resolved = os.path.normpath(os.path.join(os.path.dirname(current), link))
            return copied + _stage_host_path(
                os.path.join(resolved, rest) if rest else resolved, stage, excludes, where
            )
        if i < len(parts) - 1:
            os.makedirs(target, exist_ok=True)
            continue
        if stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(current):
                dirnames[:] = [
                    d for d in dirnames if not _excluded(os.path.join(dirpath, d), excludes)
                ]
                for name in sorted(dirnames + filenames):
                    full = os.path.join(dirpath, name)
                    if not _excluded(full, excludes):
                        copied += _copy_host(full, stage, where)
            os.makedirs(target, exist_ok=True)
        else:
            copied += _copy_host(current, stage, where)
    return copied


def _excluded(path: str, excludes: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in excludes)


def _copy_host(path: str, stage: str, where: str) -> list[str]:
    st = os.lstat(path)
    target = stage + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if stat.S_ISLNK(st.st_mode):
        if os.path.lexists(target):
            return []
        os.symlink(os.readlink(path), target)
        # A link to a file (libstdc++.so -> libstdc++.so.6) brings the file; a link to a
        # directory does not bring the directory's whole tree.
        real = os.path.realpath(path)
        if os.path.isfile(real) and not os.path.lexists(stage + real):
            return _stage_host_path(real, stage, [], where)
        return []
    if stat.S_ISDIR(st.st_mode):
        os.makedirs(target, exist_ok=True)
        return []
    if not stat.S_ISREG(st.st_mode):
        return []
    if not world_readable(st):
        raise ImageError(
            f"{where}: BUNDLE: {path} is not world-readable: refusing to put a secret in an image"
        )
    if not os.path.lexists(target):
        shutil.copyfile(path, target, follow_symlinks=False)
        os.chmod(target, st.st_mode & 0o755)
    return [path]
