"""OCI image layouts and docker archives (``docker save``), in and out.

Reading treats every archive as hostile: a tar archive is first unpacked by the same extractor
as layers (budgets, no escapes, no devices) into the store's staging area; files are then opened
one directory descriptor at a time with ``O_NOFOLLOW``, so a symlink planted in a layout can
never make the loader read a host file; every blob is checked against its digest and size while
it is copied into the store.

Writing: an OCI layout (``oci-layout``, ``index.json``, ``blobs/sha256/HEX``) as a directory, or
as a tar when the output name ends in ``.tar``; a docker archive (``manifest.json``, the config
as ``HEX.json`` and each layer as an uncompressed ``HEX/layer.tar``) as a tar. Tar output is
deterministic (sorted, numeric 0:0 owners, zero mtimes).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ImageError
from ..hostpath import OutputFile, PathRefused, open_nofollow
from ..imageref import parse_reference
from .dirfd import (
    DIR_FLAGS,
    Unwalkable,
    copy_data,
    create_file,
    open_dir,
    open_regular,
    remove_tree,
)
from .extract import split_path
from .layerstream import GZIP_MAGIC
from .oci import (
    MAX_CONFIG,
    MAX_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    Descriptor,
    Index,
    canonical_json,
    digest_of,
    manifest_json,
    parse_config,
    parse_manifest,
)
from .store import Image, Store
from .tarstream import Budget

REF_NAME = "org.opencontainers.image.ref.name"
ARCHIVE_BUDGET = Budget(max_bytes=64 << 30, max_entries=100_000)


class _Dir:
    """Read files below a directory, opened once, without ever following a symlink."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd  # the caller's to close

    @contextlib.contextmanager
    def open(self, relative: str) -> Iterator[BinaryIO]:
        parts = split_path(relative)
        if not parts:
            raise ImageError(f"archive: bad path {relative!r}")
        try:
            # From the descriptor, not the path again: a box that can write above the
            # layout could otherwise swap a parent for a symlink between two reads.
            fd = open_dir(self.root_fd, parts[:-1])
            try:
                opened = open_regular(fd, parts[-1])  # never blocks on a FIFO
            finally:
                os.close(fd)
        except Unwalkable as e:
            raise ImageError(f"archive: cannot open {relative!r} ({e})") from None
        except OSError as e:
            raise ImageError(f"archive: cannot open {relative!r} ({e.strerror})") from None
        if opened is None:
            raise ImageError(f"archive: cannot open {relative!r} (not a regular file)")
        with os.fdopen(opened[0], "rb") as f:
            yield f

    def read(self, relative: str, limit: int) -> bytes:
        with self.open(relative) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"archive: {relative} is larger than {limit} bytes")
        return data

    def exists(self, relative: str) -> bool:
        try:
            with self.open(relative):
                return True
        except ImageError:
            return False


@contextlib.contextmanager
def _opened(path: Path, store: Store) -> Iterator[_Dir]:
    """A layout directory as it is, or a tar archive unpacked into staging."""
    try:  # a layout or an archive the caller named: never reached through a symlink
        checked = open_nofollow(os.path.abspath(path), os.O_RDONLY | os.O_NONBLOCK)
    except PathRefused as e:
        raise ImageError(f"cannot read {path}: {e.problem}") from None
    if stat.S_ISDIR(os.fstat(checked).st_mode):
        try:
            yield _Dir(checked)
        finally:
            os.close(checked)
        return
    os.close(checked)
    staging = tempfile.mkdtemp(dir=store.root / "tmp", prefix="load-")
    try:
        try:
            fd = open_nofollow(os.path.abspath(path), os.O_RDONLY | os.O_NONBLOCK)
        except PathRefused as e:
            raise ImageError(f"cannot read {path}: {e.problem}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageError(f"{path} is not a regular file or a directory")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            from .extract import extract_layer

            extract_layer(f, staging, ARCHIVE_BUDGET)
        staged = os.open(staging, DIR_FLAGS)  # the store's own staging directory
        try:
            yield _Dir(staged)
        finally:
            os.close(staged)
    finally:
        remove_tree(Path(staging))


def _copy_blob(src: _Dir, relative: str, descriptor: Descriptor, store: Store) -> None:
    with src.open(relative) as f:
        store.put_stream(f, descriptor.digest, descriptor.size)


def _blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def load(path: Path, store: Store, tag: str | None = None) -> list[tuple[Image, list[str]]]:
    """Load every image of an OCI layout or docker archive; returns images and their tags."""
    with store.using(), _opened(path, store) as src:
        if src.exists("oci-layout"):
            return _load_oci(src, store, tag)
        if src.exists("manifest.json"):
            return _load_docker(src, store, tag)
    raise ImageError(f"{path} is neither an OCI layout nor a docker archive")


def _load_oci(src: _Dir, store: Store, tag: str | None) -> list[tuple[Image, list[str]]]:
    index = parse_manifest(src.read("index.json", MAX_MANIFEST), OCI_INDEX)
    if not isinstance(index, Index):
        raise ImageError("archive: index.json is not an image index")
    loaded = []
    for descriptor in index.manifests:
        data = _verified(src, descriptor, MAX_MANIFEST)
        doc = parse_manifest(data, descriptor.media_type)
        if isinstance(doc, Index):  # a multi-platform image: take ours
            descriptor = doc.select()
            data = _verified(src, descriptor, MAX_MANIFEST)
            doc = parse_manifest(data, descriptor.media_type)
            if isinstance(doc, Index):
                raise ImageError("archive: nested indexes are not supported")
        _copy_blob(src, _blob_path(doc.config.digest), doc.config, store)
        for layer in doc.layers:
            _copy_blob(src, _blob_path(layer.digest), layer, store)
        image = store.add_image(data)
        names = [tag] if tag else []
        ref_name = dict(descriptor.annotations).get(REF_NAME)
        if ref_name and not tag:
            names = [ref_name if ":" in ref_name or "/" in ref_name else f"loaded:{ref_name}"]
        loaded.append((image, [store.tag(n, image.digest) for n in names]))
    return loaded


def _verified(src: _Dir, descriptor: Descriptor, limit: int) -> bytes:
    if descriptor.size > limit:
        raise ImageError(f"archive: {descriptor.digest} is larger than {limit} bytes")
    data = src.read(_blob_path(descriptor.digest), limit)
    if len(data) != descriptor.size or digest_of(data) != descriptor.digest:
        raise ImageError(f"archive: blob {descriptor.digest} does not match its digest or size")
    return data


def _load_docker(src: _Dir, store: Store, tag: str | None) -> list[tuple[Image, list[str]]]:
    try:
        entries = json.loads(src.read("manifest.json", MAX_MANIFEST))
    except ValueError:
        raise ImageError("archive: manifest.json is not valid JSON") from None
    if not isinstance(entries, list) or not entries:
        raise ImageError("archive: manifest.json must be a non-empty list")
    loaded = []
    for i, entry in enumerate(entries):
        what = f"archive: manifest.json[{i}]"
        if not isinstance(entry, dict):
            raise ImageError(f"{what} is not an object")
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        repo_tags = entry.get("RepoTags") or []
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImageError(f"{what}: Config and Layers are required")
        if not all(isinstance(n, str) for n in [*layer_names, *repo_tags]):
            raise ImageError(f"{what}: Layers and RepoTags must be strings")
        config = src.read(config_name, MAX_CONFIG)
        parsed = parse_config(config)
        if len(parsed.diff_ids) != len(layer_names):
            raise ImageError(f"{what}: config and Layers disagree on the number of layers")
        config_digest = store.put_bytes(config)
        layers = [_store_docker_layer(src, name, store) for name in layer_names]
        manifest = manifest_json(Descriptor(OCI_CONFIG, config_digest, len(config)), layers)
        image = store.add_image(manifest)
        names = [tag] if tag else [str(parse_reference(t)) for t in repo_tags]
        loaded.append((image, [store.tag(n, image.digest) for n in names]))
    return loaded


def _store_docker_layer(src: _Dir, name: str, store: Store) -> Descriptor:
    """Copy one layer file into the store; its digest is computed, as docker archives name
    layers by path (the config's diff ids are checked when the layer is unpacked)."""
    with src.open(name) as f:
        head = f.read(2)
        f.seek(0)
        size = os.fstat(f.fileno()).st_size
        digest = _file_digest(f)
        f.seek(0)
        store.put_stream(f, digest, size)
    return Descriptor(OCI_LAYER_GZIP if head == GZIP_MAGIC else OCI_LAYER, digest, size)


def _file_digest(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


# -- writing -------------------------------------------------------------------------------


class _TarOut:
    """A deterministic tar being written."""

    def __init__(self, out: BinaryIO) -> None:
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _info(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mtime = size, kind, 0
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.uid = info.gid = 0
        return info

    def directory(self, name: str) -> None:
        self.tar.addfile(self._info(name, 0, tarfile.DIRTYPE))

    def data(self, name: str, data: bytes) -> None:
        self.tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def file(self, name: str, path: str) -> None:
        with open(path, "rb") as f:
            self.tar.addfile(self._info(name, os.fstat(f.fileno()).st_size), f)

    def close(self) -> None:
        self.tar.close()


def _layout_entries(images: list[tuple[str, Image]], store: Store) -> tuple[bytes, list[str]]:
    """index.json and the digests of every blob an OCI layout of ``images`` holds."""
    manifests, blobs = [], []
    for name, image in images:
        data = store.read_blob(image.digest, MAX_MANIFEST)
        manifests.append(
            Descriptor(
                image.manifest.media_type, image.digest, len(data), annotations=((REF_NAME, name),)
            ).to_json()
        )
        blobs += [image.digest, image.config_digest, *(d.digest for d in image.manifest.layers)]
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    return index, sorted(set(blobs))


def save_oci(images: list[tuple[str, Image]], store: Store, output: Path) -> None:
    """Write an OCI layout: a directory, or a tar when ``output`` ends in ``.tar``."""
    index, blobs = _layout_entries(images, store)
    layout = canonical_json({"imageLayoutVersion": "1.0.0"})
    if output.suffix == ".tar":
        with _atomic(output) as out:
            tar = _TarOut(out)
            for d in ("blobs", "blobs/sha256"):
                tar.directory(d)
            for digest in blobs:
                tar.file(_blob_path(digest), str(store.blob_path(digest)))
            tar.data("index.json", index)
            tar.data("oci-layout", layout)
            tar.close()
        return
    # Everything through descriptors made here: a box that can write where the layout goes
    # must not turn a planted (or raced-in) symlink into root writing elsewhere.
    top = _output_dir(output)
    made: list[int] = [top]
    try:
        blobs_fd = _new_dir(top, "blobs")
        made.append(blobs_fd)
        sha_fd = _new_dir(blobs_fd, "sha256")
        made.append(sha_fd)
        for digest in blobs:
            with open(store.blob_path(digest), "rb") as f:
                _write_new(sha_fd, digest.split(":", 1)[1], f.fileno())
        _write_new(top, "index.json", data=index)
        _write_new(top, "oci-layout", data=layout)
    finally:
        for fd in made:
            os.close(fd)


def _output_dir(output: Path) -> int:
    """The layout's directory: made now, or an empty one already there, never a symlink."""
    try:
        parent = open_nofollow(os.path.abspath(output.parent), os.O_PATH | os.O_DIRECTORY)
    except PathRefused as e:
        raise ImageError(f"cannot write {output}: {e.problem}") from None
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(output.name, 0o755, dir_fd=parent)
        try:
            fd = os.open(output.name, DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            there = os.stat(output.name, dir_fd=parent, follow_symlinks=False)
            planted = stat.S_ISLNK(there.st_mode)
            problem = "it is a symlink (a box could have planted it)" if planted else e.strerror
            raise ImageError(f"cannot write {output}: {problem}") from None
    finally:
        os.close(parent)
    if os.listdir(fd):
        os.close(fd)
        raise ImageError(f"{output} exists and is not empty")
    return fd


def _new_dir(parent: int, name: str) -> int:
    try:
        os.mkdir(name, 0o755, dir_fd=parent)
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        raise ImageError(f"cannot make {name} in the layout: {e.strerror}") from None


def _write_new(parent: int, name: str, source: int | None = None, data: bytes = b"") -> None:
    try:
        fd = create_file(parent, name, 0o644)
    except OSError as e:
        raise ImageError(f"cannot write {name} in the layout: {e.strerror}") from None
    try:
        if source is not None:
            copy_data(source, fd)
        else:
            os.write(fd, data)
    finally:
        os.close(fd)


def save_docker(images: list[tuple[str, Image]], store: Store, output: Path) -> None:
    """Write a docker archive (the ``docker save`` format) with uncompressed layers."""
    entries = []
    with _atomic(output) as out, tempfile.TemporaryDirectory(dir=store.root / "tmp") as scratch:
        tar = _TarOut(out)
        written: set[str] = set()
        for name, image in images:
            config_name = image.config_digest.split(":", 1)[1] + ".json"
            if config_name not in written:
                tar.data(config_name, store.read_blob(image.config_digest, MAX_CONFIG))
                written.add(config_name)
            layer_names = []
            for layer, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True):
                layer_name = diff_id.split(":", 1)[1] + "/layer.tar"
                if layer_name not in written:
                    plain = os.path.join(scratch, "layer.tar")
                    _decompress(str(store.blob_path(layer.digest)), plain)
                    tar.directory(diff_id.split(":", 1)[1])
                    tar.file(layer_name, plain)
                    os.unlink(plain)
                    written.add(layer_name)
                layer_names.append(layer_name)
            entries.append({"Config": config_name, "RepoTags": [name], "Layers": layer_names})
        tar.data("manifest.json", canonical_json(entries))
        tar.close()


def _decompress(source: str, target: str) -> None:
    with open(source, "rb") as f, open(target, "wb") as out:
        if f.read(2) == GZIP_MAGIC:
            f.seek(0)
            with gzip.GzipFile(fileobj=f) as gz:
                try:
                    shutil.copyfileobj(gz, out, 1 << 20)
                except (OSError, EOFError, zlib.error) as e:
                    raise ImageError(f"stored layer {source} is damaged: {e}") from None
        else:
            f.seek(0)
            shutil.copyfileobj(f, out, 1 << 20)


@contextlib.contextmanager
def _atomic(output: Path) -> Iterator[BinaryIO]:
    """Write ``output`` through a new file renamed into place only when complete, never
    through a symlink (:class:`~sandbox.hostpath.OutputFile`)."""
    target = OutputFile(str(output), "--output")
    try:
        with os.fdopen(os.dup(target.fd), "wb") as f:
            yield f
        target.commit()
    except BaseException:
        target.discard()
        raise


__all__ = ["load", "save_docker", "save_oci"]
