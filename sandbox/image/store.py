"""The content-addressed image store, safe for concurrent builds, pulls, runs and pruning.

Layout under ``<state dir>/images``::

    blobs/sha256/HEX      manifests, configs and compressed layers, named by their digest
    layers/HEX/           unpacked layers, named by diff id, shared by every image and run
    refs.json             tag -> manifest digest
    cache/KEY             build cache: instruction and inputs -> layer
    tmp/                  staging (same filesystem, so results appear by one rename(2))
    lock                  flock: shared while building, pulling or running; exclusive to prune

The store is private to the user who owns it: its root and every directory of its layout are
0700 and blobs 0600 (a layer may hold world-writable directories such as ``/tmp``, and a COPY may
add a 0600 file: no other local user may read, change or add to what boxes will see). A store
root that is not owned by us or that others may enter is refused rather than used (whatever is
in it may have been changed); one we have just made gets its mode whatever the umask. Boxes do
not need to traverse it: their init opens its layers with the caller's credentials and mounts
them through ``/proc/self/fd``.

Blobs and layers are written under ``tmp/`` and renamed into place only once their digest is
verified, so a reader never sees a partial one and two writers of the same content cannot corrupt
it (the second rename finds the first's result and discards its own). Tags change under an
exclusive lock on ``refs.json.lock`` with an atomic replace. ``prune`` takes ``lock`` exclusively,
so it never removes a blob a writer has not tagged yet or a layer a running box has mounted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from ..box.userns import image_owner
from ..errors import HostError, ImageError
from ..imageref import Reference, check_digest, parse_reference
from ..state import state_dir
from ..storelock import STORE_LOCK, lock_file
from .dirfd import DIR_FLAGS, remove_tree, tree_size
from .extract import extract_layer
from .oci import (
    MAX_CONFIG,
    MAX_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_config,
    parse_manifest,
)
from .tarstream import Budget

CHUNK = 1 << 20
LAYOUT = ("blobs", "blobs/sha256", "layers", "cache", "tmp")
_NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_IMAGE_BYTES = 16 << 30  # uncompressed, all layers of one image together


@dataclass(frozen=True)
class Image:
    """A tagged or digest-named image as the store holds it."""

    reference: str
    digest: str  # the manifest's
    manifest: Manifest
    config_digest: str
    config: ImageConfig


def _hex(digest: str) -> str:
    return check_digest(digest).split(":", 1)[1]


class Store:
    """One image store (``$SANDBOX_HOME/images`` unless ``root`` is given)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "images"
        self.root.parent.mkdir(parents=True, exist_ok=True)
        _private_dir(self.root, is_root=True)
        for sub in LAYOUT:
            _private_dir(self.root / sub, is_root=False)

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, name: str, exclusive: bool) -> Iterator[None]:
        fd = lock_file(self.root / name, exclusive)
        try:
            yield
        finally:
            os.close(fd)

    def using(self) -> contextlib.AbstractContextManager[None]:
        """Held by builds, pulls, loads and runs: prune waits until none is left."""
        return self._flock(STORE_LOCK, exclusive=False)

    # -- blobs -----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` is (or would be) kept."""
        return self.root / "blobs" / "sha256" / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        """True when the blob is in the store."""
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str, limit: int) -> bytes:
        """A small blob (manifest, config), checked against its digest again."""
        try:
            with os.fdopen(os.open(self.blob_path(digest), _NOFOLLOW_READ), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is not in the store") from None
        if len(data) > limit or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ImageError(f"blob {digest} in the store is damaged", hint="sandbox image prune")
        return data

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.put_stream(io.BytesIO(data), digest, len(data))
        return digest

    def write_blob(self, write: Callable[[BinaryIO], str]) -> str:
        """Store what ``write`` writes to the file it is given; ``write`` returns the digest
        (and raises if the bytes are not what they should be, which discards them)."""
        # mkstemp(3): an unpredictable name, made O_EXCL, mode 0600 (and blobs stay 0600).
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as f:
                digest = write(f)
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return digest

    def put_stream(self, source: BinaryIO, digest: str, size: int) -> None:
        """Store a blob read from ``source``, verifying size and digest while it streams."""
        check_digest(digest)
        if self.has_blob(digest):
            return

        def copy(out: BinaryIO) -> str:
            h = hashlib.sha256()
            written = 0
            while chunk := source.read(min(CHUNK, size - written + 1)):
                written += len(chunk)
                if written > size:
                    raise ImageError(f"blob {digest} is larger than its {size} bytes")
                h.update(chunk)
                out.write(chunk)
            if written != size:
                raise ImageError(f"blob {digest}: got {written} of its {size} bytes")
            if "sha256:" + h.hexdigest() != digest:
                raise ImageError(f"blob {digest}: digest mismatch (got sha256:{h.hexdigest()})")
            return digest

        self.write_blob(copy)

    # -- layers ----------------------------------------------------------------------------
    def layer_path(self, diff_id: str) -> Path:
        """Where the layer with ``diff_id`` is unpacked."""
        return self.root / "layers" / _hex(diff_id)

    def unpack(self, layer: Descriptor, diff_id: str, budget: Budget | None = None) -> int:
        """Unpack the stored blob of ``layer`` (once: the result is shared) and check it.

        Returns the tar bytes unpacked now (0 when the layer was already there).
        """
        target = self.layer_path(diff_id)
        if target.exists():
            return 0
        tmp = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="layer-"))
        owner = image_owner() if os.geteuid() == 0 else None
        try:
            fd = os.open(tmp, DIR_FLAGS)
            try:
                os.fchmod(fd, 0o755)  # the box's "/" (the store around it stays 0700)
                if owner is not None:
                    os.fchown(fd, *owner)
            finally:
                os.close(fd)
            try:
                blob = os.fdopen(os.open(self.blob_path(layer.digest), _NOFOLLOW_READ), "rb")
            except FileNotFoundError:
                raise ImageError(f"layer blob {layer.digest} is not in the store") from None
            with blob:
                got = extract_layer(blob, str(tmp), budget or Budget(), owner)
            if got.digest != layer.digest or got.size != layer.size:
                raise ImageError(f"layer {layer.digest}: digest or size mismatch")
            if got.diff_id != diff_id:
                raise ImageError(
                    f"layer {layer.digest}: diff id {got.diff_id} does not match the config's "
                    f"{diff_id}"
                )
            try:
                os.rename(tmp, target)
            except OSError:  # another writer unpacked it first
                if not target.exists():
                    raise
                remove_tree(tmp)
        except BaseException:
            remove_tree(tmp)
            raise
        return got.tar_size

    # -- references ------------------------------------------------------------------------
    def refs(self) -> dict[str, str]:
        """Every tag and the manifest digest it names."""
        try:
            with open(self.root / "refs.json", "rb") as f:
                value = json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError:
            raise ImageError(f"{self.root}/refs.json is damaged") from None
        if not isinstance(value, dict):
            raise ImageError(f"{self.root}/refs.json is damaged")
        return {str(k): str(v) for k, v in value.items()}

    def _update_refs(self, change: dict[str, str | None]) -> None:
        with self._flock("refs.json.lock", exclusive=True):
            refs = self.refs()
            for name, digest in change.items():
                if digest is None:
                    refs.pop(name, None)
                else:
                    refs[name] = digest
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="refs-")
            with os.fdopen(fd, "w") as f:
                json.dump(refs, f, indent=1, sort_keys=True)
            os.replace(tmp, self.root / "refs.json")

    def tag(self, reference: str, digest: str) -> str:
        """Name the manifest ``digest`` ``reference`` (``latest`` if no tag); returns the tag."""
        ref = parse_reference(reference).with_tag()
        if ref.digest:
            raise ImageError(f"cannot tag with a digest reference {reference!r}")
        self.read_manifest(digest)
        name = str(ref)
        self._update_refs({name: digest})
        return name

    def untag(self, reference: str) -> str:
        """Remove a tag; the blobs stay until ``prune``."""
        ref = parse_reference(reference).with_tag()
        name = str(ref)
        if name not in self.refs():
            raise ImageError(f"no image {name!r} in the store", hint="sandbox image ls")
        self._update_refs({name: None})
        return name

    # -- images ----------------------------------------------------------------------------
    def read_manifest(self, digest: str) -> Manifest:
        """The stored image manifest ``digest`` (an index is not an image)."""
        doc = parse_manifest(self.read_blob(digest, MAX_MANIFEST))
        if isinstance(doc, Index):
            raise ImageError(f"{digest} is an index, not an image manifest")
        return doc

    def image(self, reference: str) -> Image:
        """Look up a tag, ``NAME@sha256:...`` or a bare manifest digest."""
        if reference.startswith("sha256:"):
            digest = check_digest(reference)
        else:
            ref = parse_reference(reference)
            if ref.digest:
                digest = ref.digest
            else:
                found = self.refs().get(str(ref.with_tag()))
                if found is None:
                    raise ImageError(
                        f"no image {str(ref.with_tag())!r} in the store",
                        hint="sandbox image ls; sandbox image pull or build it",
                    )
                digest = found
        if not self.has_blob(digest):
            raise ImageError(f"no image {reference!r} in the store", hint="sandbox image ls")
        manifest = self.read_manifest(digest)
        config = parse_config(self.read_blob(manifest.config.digest, MAX_CONFIG))
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(f"image {reference}: config and manifest disagree on the layers")
        return Image(reference, digest, manifest, manifest.config.digest, config)

    def layer_dirs(self, image: Image) -> tuple[str, ...]:
        """The image's unpacked layers, top first (the order overlayfs wants)."""
        dirs = []
        for diff_id in reversed(image.config.diff_ids):
            path = self.layer_path(diff_id)
            if not path.is_dir():
                raise ImageError(
                    f"image {image.reference}: layer {diff_id} is not unpacked",
                    hint="pull or load the image again",
                )
            dirs.append(str(path))
        return tuple(dirs)

    def add_image(self, manifest: bytes, budget: Budget | None = None) -> Image:
        """Register a manifest whose config and layer blobs are stored; unpack its layers."""
        doc = parse_manifest(manifest)
        if isinstance(doc, Index):
            raise ImageError("expected an image manifest, got an index")
        if not self.has_blob(doc.config.digest):
            raise ImageError(f"config blob {doc.config.digest} is missing")
        config_bytes = self.read_blob(doc.config.digest, MAX_CONFIG)
        if len(config_bytes) != doc.config.size:
            raise ImageError(f"config blob {doc.config.digest}: size mismatch")
        config = parse_config(config_bytes)
        if len(config.diff_ids) != len(doc.layers):
            raise ImageError("image config and manifest disagree on the number of layers")
        budget = budget or Budget()
        remaining = MAX_IMAGE_BYTES  # a whole image, not only each layer, has a budget
        for layer, diff_id in zip(doc.layers, config.diff_ids, strict=True):
            if remaining <= 0:
                raise ImageError(f"image: more than {MAX_IMAGE_BYTES} bytes unpacked")
            layer_budget = replace(budget, max_bytes=min(budget.max_bytes, remaining))
            remaining -= self.unpack(layer, diff_id, layer_budget)
        digest = self.put_bytes(manifest)
        return Image(digest, digest, doc, doc.config.digest, config)

    # -- garbage collection ----------------------------------------------------------------
    def prune(self) -> tuple[int, int, int]:
        """Remove what no tag reaches: (blobs, layers, bytes freed). Waits for users to end."""
        with self._flock(STORE_LOCK, exclusive=True):
            keep_blobs: set[str] = set()
            keep_layers: set[str] = set()
            for digest in set(self.refs().values()):
                try:
                    image = self.image(digest)
                except ImageError:
                    continue
                keep_blobs |= {digest, image.config_digest}
                keep_blobs |= {d.digest for d in image.manifest.layers}
                keep_layers |= set(image.config.diff_ids)
            blobs = layers = freed = 0
            for entry in (self.root / "blobs" / "sha256").iterdir():
                if f"sha256:{entry.name}" not in keep_blobs:
                    freed += entry.stat().st_size
                    entry.unlink()
                    blobs += 1
            for entry in (self.root / "layers").iterdir():
                if f"sha256:{entry.name}" not in keep_layers:
                    freed += tree_size(entry)
                    remove_tree(entry)
                    layers += 1
            for entry in (self.root / "cache").iterdir():
                entry.unlink()
            for entry in (self.root / "tmp").iterdir():  # left by writers that died
                remove_tree(entry)
            return blobs, layers, freed


def _private_dir(path: Path, is_root: bool) -> None:
    """Make ``path`` 0700, or check it is ours and private: another user must not enter it."""
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as e:
        raise HostError(f"image store: cannot use {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise HostError(f"image store: {path} is owned by uid {st.st_uid}, not by us")
        if created or not is_root:
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)  # a umask narrowed it, or an earlier version left it open
        elif st.st_mode & 0o077:
            raise HostError(
                f"image store {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}):"
                " they may have changed what it holds",
                hint=f"remove it (rm -rf {path}) and pull or build again",
            )
    finally:
        os.close(fd)


def short(digest: str) -> str:
    """The first 12 hex digits, as docker shows image ids."""
    return digest.split(":", 1)[-1][:12]


__all__ = ["Image", "Reference", "Store", "short"]
