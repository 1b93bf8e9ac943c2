"""Deterministic layer tars from a directory, so the same build gives the same digest.

Entries are sorted by path; owners are numeric 0:0 (a box's files belong to the image, not to
whoever built it); mtimes are clamped to ``SOURCE_DATE_EPOCH`` (0 when unset); gzip carries no
name and no time. Hard links within the tree are kept as links. For an overlay upper directory
(a ``RUN`` step's changes) whiteouts (0/0 character devices) become ``.wh.NAME`` entries and
opaque directories get a ``.wh..wh..opq`` entry, as the OCI layer spec says. Extended attributes
are not written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import ImageError
from .dirfd import DIR_FLAGS, Node, open_regular, walk
from .extract import OPAQUE_MARKER, WHITEOUT_PREFIX

_OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")


@dataclass(frozen=True)
class WrittenLayer:
    """The compressed blob's digest and size, and the tar's diff id."""

    digest: str
    size: int
    diff_id: str


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


def source_date_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` (reproducible-builds.org), else 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    return int(value) if value.isdigit() else 0


def _is_opaque(dir_fd: int, name: str) -> bool:
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        for key in _OPAQUE_XATTRS:
            try:
                if os.getxattr(fd, key) == b"y":
                    return True
            except OSError:
                continue
        return False
    finally:
        os.close(fd)


def write_layer(root: str, out: BinaryIO, *, upper: bool = False) -> WrittenLayer:
    """Write ``root``'s tree as a gzip layer to ``out``; ``upper``: it is an overlay upper.

    The tree is read with :func:`.dirfd.walk` (a box wrote a RUN step's upper: nothing in it is
    followed, and a FIFO is a FIFO entry, never opened).
    """
    epoch = source_date_epoch()
    blob = _HashingWriter(out)
    root_fd = os.open(root, DIR_FLAGS)
    try:
        with gzip.GzipFile(filename="", mode="wb", fileobj=blob, compresslevel=6, mtime=0) as gz:
            tar_out = _HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=tar_out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                links: dict[tuple[int, int], str] = {}
                for node in walk(root_fd):
                    _add(tar, node, epoch, upper, links)
    finally:
        os.close(root_fd)
    return WrittenLayer(
        "sha256:" + blob.hash.hexdigest(), blob.size, "sha256:" + tar_out.hash.hexdigest()
    )


def _info(name: str, st: os.stat_result, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = st.st_mode & 0o7777
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = min(int(st.st_mtime), epoch)
    return info


def _add(
    tar: tarfile.TarFile,
    node: Node,
    epoch: int,
    upper: bool,
    links: dict[tuple[int, int], str],
) -> None:
    rel, st = node.rel, node.st
    info = _info(rel, st, epoch)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        if upper and _is_opaque(node.dir_fd, node.name):
            marker = _info(f"{rel}/{OPAQUE_MARKER}", st, epoch)
            marker.mode = 0o644
            tar.addfile(marker)
    elif stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            info.type = tarfile.LNKTYPE
            info.linkname = links[key]
            tar.addfile(info)
            return
        opened = open_regular(node.dir_fd, node.name)
        if opened is None or (opened[1].st_dev, opened[1].st_ino) != key:
            if opened is not None:
                os.close(opened[0])
            raise ImageError(f"{rel}: changed while the layer was written")
        links[key] = rel
        info.size = opened[1].st_size
        with os.fdopen(opened[0], "rb") as f:
            tar.addfile(info, f)
    elif stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(node.name, dir_fd=node.dir_fd)
        tar.addfile(info)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    elif upper and stat.S_ISCHR(mode) and st.st_rdev == 0:
        head, _, name = rel.rpartition("/")
        whiteout = _info(
            f"{head}/{WHITEOUT_PREFIX}{name}" if head else WHITEOUT_PREFIX + name, st, epoch
        )
        whiteout.mode = 0o644
        tar.addfile(whiteout)
    else:
        raise ImageError(f"{rel}: cannot put a device node or socket in a layer")
