"""Unpack one hostile layer tar into a fresh directory, never touching anything outside it.

Every operation is relative to a directory descriptor reached from the target's own descriptor
one component at a time with ``O_NOFOLLOW`` (openat(2); the primitives of :mod:`.dirfd`), so no
symlink, whether in the layer or planted by an earlier entry, is ever followed; ``..`` and
absolute names are refused before any lookup. What a layer may hold:

- directories, regular files (setuid/setgid bits dropped: boxes mount ``nosuid`` anyway),
  symlinks (stored, never followed), FIFOs, hard links to regular files of the same layer;
- OCI whiteouts: ``.wh.NAME`` becomes an overlay whiteout (a 0/0 character device), and
  ``.wh..wh..opq`` makes its directory opaque (``user.overlay.opaque``: boxes mount overlays
  with ``userxattr`` inside their user namespace);
- ``user.*`` extended attributes. ``trusted.*``, ``security.*`` and ``user.overlay.*`` ones
  would forge overlay metadata or labels and refuse the layer; ``security.capability`` (file
  capabilities, common in distribution images) is dropped, since boxes run with
  ``no_new_privs`` on ``nosuid`` mounts where it means nothing.

Device nodes, escaping names and budget overruns refuse the layer (:class:`ImageError`); the
caller then removes the partial directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import ImageError
from . import tarstream
from .dirfd import CREATE_FLAGS, DIR_FLAGS, Unwalkable, open_dir, remove_entry
from .layerstream import LayerStream
from .tarstream import Budget, Entry, TarReader

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "user.overlay.opaque"
_FORBIDDEN_XATTRS = ("trusted.", "security.", "user.overlay.")


@dataclass(frozen=True)
class Extracted:
    """What an extraction read: the blob's digest and size, the tar's diff id and size."""

    digest: str
    size: int
    diff_id: str
    entries: int
    tar_size: int


def split_path(path: str) -> tuple[str, ...]:
    """The components of an entry name; absolute names and ``..`` are refused."""
    if path.startswith("/"):
        raise ImageError(f"layer: absolute path {path[:200]!r}")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ImageError(f"layer: path {path[:200]!r} climbs out with '..'")
    for part in parts:
        if len(part.encode()) > 255:
            raise ImageError(f"layer: a name in {path[:200]!r} is longer than 255 bytes")
    return parts


class _Extractor:
    def __init__(self, root_fd: int, owner: tuple[int, int] | None) -> None:
        self.root_fd = root_fd
        self.owner = owner
        self.dirs: dict[tuple[str, ...], int] = {}  # directories' modes, applied at the end
        self._parent: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def walk(self, parts: tuple[str, ...], create: bool) -> int:
        """A new descriptor of the directory ``parts``, made as needed, never via a symlink."""

        def made(parent_fd: int, name: str, so_far: tuple[str, ...]) -> None:
            self._own(parent_fd, name)
            self.dirs.setdefault(so_far, 0o755)

        try:
            return open_dir(self.root_fd, parts, create=create, made=made)
        except Unwalkable as e:
            if e.missing:
                raise ImageError(f"layer: {'/'.join(parts)} does not exist") from None
            raise ImageError(
                f"layer: {'/'.join(e.parts)} is a symlink or a file, and an entry goes through it"
            ) from None

    def parent(self, parts: tuple[str, ...]) -> int:
        """The descriptor of ``parts``' parent directory (the last one is kept open)."""
        key = parts[:-1]
        if self._parent is not None and self._parent[0] == key:
            return self._parent[1]
        self.close()
        fd = self.walk(key, create=True)
        self._parent = (key, fd)
        return fd

    def _own(self, dir_fd: int, name: str) -> None:
        if self.owner is not None:
            os.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)

    def add(self, entry: Entry, reader: TarReader) -> None:
        parts = split_path(entry.path)
        if not parts:  # the layer's root itself
            if entry.kind != tarstream.DIRECTORY:
                raise ImageError("layer: the root entry is not a directory")
            return
        name = parts[-1]
        self.forget_below(parts)
        dir_fd = self.parent(parts)
        if name.startswith(WHITEOUT_PREFIX):
            self.whiteout(dir_fd, parts, entry)
            return
        xattrs = self.check_xattrs(entry)
        remove_entry(dir_fd, name, keep_dir=entry.kind == tarstream.DIRECTORY)
        if entry.kind == tarstream.DIRECTORY:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=dir_fd)
            self.dirs[parts] = entry.mode & 0o1777
            self._own(dir_fd, name)
            if xattrs:
                fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
                try:
                    _set_xattrs(fd, xattrs)
                finally:
                    os.close(fd)
        elif entry.kind == tarstream.REGULAR:
            fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=dir_fd)
            try:
                while chunk := reader.read(1 << 20):
                    os.write(fd, chunk)
                os.fchmod(fd, entry.mode & 0o777)  # setuid/setgid/sticky dropped
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                _set_xattrs(fd, xattrs)
                os.utime(fd, ns=(entry.mtime * 10**9, entry.mtime * 10**9))
            finally:
                os.close(fd)
        elif entry.kind == tarstream.SYMLINK:
            os.symlink(entry.linkname, name, dir_fd=dir_fd)
            self._own(dir_fd, name)
        elif entry.kind == tarstream.HARDLINK:
            self.hardlink(dir_fd, name, entry)
        elif entry.kind == tarstream.FIFO:
            os.mkfifo(name, entry.mode & 0o777, dir_fd=dir_fd)
            self._own(dir_fd, name)
        else:
            raise ImageError(f"layer: {entry.path}: device nodes are not allowed in a layer")

    def forget_below(self, parts: tuple[str, ...]) -> None:
        """An entry may replace the cached parent or one of its ancestors: drop the cache."""
        if self._parent is not None and self._parent[0][: len(parts)] == parts:
            self.close()

    def whiteout(self, dir_fd: int, parts: tuple[str, ...], entry: Entry) -> None:
        name = parts[-1]
        if entry.kind not in (tarstream.REGULAR, tarstream.HARDLINK) or entry.size:
            raise ImageError(f"layer: whiteout {entry.path!r} is not an empty file")
        if name == OPAQUE_MARKER:
            os.setxattr(dir_fd, OPAQUE_XATTR, b"y")
            return
        hidden = name[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise ImageError(f"layer: whiteout {entry.path!r} names nothing it may hide")
        remove_entry(dir_fd, hidden)
        os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dir_fd)
        self._own(dir_fd, hidden)

    def hardlink(self, dir_fd: int, name: str, entry: Entry) -> None:
        source = split_path(entry.linkname)
        if not source:
            raise ImageError(f"layer: hard link {entry.path!r} to the layer's root")
        source_dir = self.walk(source[:-1], create=False)
        try:
            try:
                st = os.lstat(source[-1], dir_fd=source_dir)
            except FileNotFoundError:
                raise ImageError(
                    f"layer: hard link {entry.path!r} to {entry.linkname!r}, "
                    "which is not in this layer"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"layer: hard link {entry.path!r} to a non-regular file")
            os.link(
                source[-1], name, src_dir_fd=source_dir, dst_dir_fd=dir_fd, follow_symlinks=False
            )
        finally:
            os.close(source_dir)

    @staticmethod
    def check_xattrs(entry: Entry) -> dict[str, bytes]:
        kept = {}
        for key, value in entry.xattrs.items():
            if key == "security.capability":
                continue
            if key.startswith(_FORBIDDEN_XATTRS):
                raise ImageError(f"layer: {entry.path}: extended attribute {key!r} is not allowed")
            if key.startswith("user."):
                if len(value) > 65536:
                    raise ImageError(f"layer: {entry.path}: extended attribute too large")
                kept[key] = value
        return kept

    def finish_dirs(self) -> None:
        """Directory modes last, deepest first, so a read-only directory can still be filled."""
        self.close()
        for parts in sorted(self.dirs, key=len, reverse=True):
            try:
                fd = self.walk(parts, create=False)
            except ImageError:
                continue  # removed or replaced by a later entry
            try:
                os.fchmod(fd, self.dirs[parts])
            finally:
                os.close(fd)


def _set_xattrs(fd: int, xattrs: dict[str, bytes]) -> None:
    for key, value in xattrs.items():
        os.setxattr(fd, key, value)


def extract_layer(
    blob: BinaryIO, target: str, budget: Budget, owner: tuple[int, int] | None = None
) -> Extracted:
    """Unpack ``blob`` (gzip or plain tar) into the empty directory ``target``.

    ``owner`` (uid, gid) owns every file made (as root, the store's image owner); the layer's
    own ids are not kept. Raises :class:`ImageError` for anything refused; the caller removes
    ``target`` then.
    """
    stream = LayerStream(blob, budget)
    root_fd = os.open(target, DIR_FLAGS)
    extractor = _Extractor(root_fd, owner)
    try:
        reader = TarReader(stream, budget)
        for entry in reader:
            try:
                extractor.add(entry, reader)
            except OSError as e:
                raise ImageError(f"layer: {entry.path[:200]}: {e.strerror}") from None
        extractor.finish_dirs()
        digest, size, diff_id = stream.finish()
        return Extracted(digest, size, diff_id, reader.entries, stream.tar_size)
    finally:
        extractor.close()
        os.close(root_fd)
