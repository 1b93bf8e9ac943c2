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


def _is_opaque(path: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _walk(root: str) -> list[str]:
    """Every path below ``root``, relative, sorted so parents come before children."""
    found: list[str] = []

    def visit(rel: str) -> None:
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            names = sorted(e.name for e in it)
        for name in names:
            path = f"{rel}/{name}" if rel else name
            found.append(path)
            if stat.S_ISDIR(os.lstat(os.path.join(root, path)).st_mode):
                visit(path)

    visit("")
    return found


def write_layer(root: str, out: BinaryIO, *, upper: bool = False) -> WrittenLayer:
    """Write ``root``'s tree as a gzip layer to ``out``; ``upper``: it is an overlay upper."""
    epoch = source_date_epoch()
    blob = _HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=blob, compresslevel=6, mtime=0) as gz:
        tar_out = _HashingWriter(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=tar_out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            links: dict[tuple[int, int], str] = {}
            for rel in _walk(root):
                _add(tar, root, rel, epoch, upper, links)
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
    root: str,
    rel: str,
    epoch: int,
    upper: bool,
    links: dict[tuple[int, int], str],
) -> None:
    path = os.path.join(root, rel)
    st = os.lstat(path)
    info = _info(rel, st, epoch)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        if upper and _is_opaque(path):
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
        links[key] = rel
        info.size = st.st_size
        with open(path, "rb") as f:
            tar.addfile(info, f)
    elif stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
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
