"""A strict, streaming reader of layer tar archives (ustar, pax and GNU long names).

Layers come from strangers, so this reader is written for hostile input rather than using
:mod:`tarfile`, which reads a whole pax header into memory whatever its size and accepts formats
a layer never needs. Each header is checked against :class:`Budget` *before* anything it
describes is read: extended headers are capped, names and link targets are capped, sparse and
multi-volume entries are refused. Every violation raises :class:`ImageError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ImageError

BLOCK = 512
REGULAR, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO = "0", "1", "2", "3", "4", "5", "6"
_CONTIGUOUS = "7"
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = "x", "g", "L", "K"
KINDS = {REGULAR, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO}


class Readable(Protocol):
    """Anything with ``read(n)``: a file, or a decompressing :class:`LayerStream`."""

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Budget:
    """What one layer may hold; a decompression bomb hits one of these quickly."""

    max_bytes: int = 8 << 30  # uncompressed tar stream
    max_entries: int = 500_000
    max_path: int = 4096
    max_metadata: int = 1 << 20  # one pax header or GNU long name
    max_ratio: int = 100  # uncompressed / compressed, checked past ``ratio_after`` bytes
    ratio_after: int = 64 << 20


@dataclass
class Entry:
    """One archive member; ``size`` data bytes follow it in the stream (regular files)."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _number(field_bytes: bytes, what: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256
        if field_bytes[0] != 0x80:
            raise ImageError(f"layer: negative or oversized base-256 {what}")
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ImageError(f"layer: bad octal {what} {text[:20]!r}") from None


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"layer: {what} is not UTF-8") from None


def _pax_records(data: bytes) -> dict[str, bytes]:
    """``LEN KEY=VALUE\\n`` records (POSIX pax); any malformed record refuses the layer."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise ImageError("layer: malformed pax header (no length)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ImageError("layer: malformed pax header (bad length)") from None
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ImageError("layer: malformed pax header (bad record)")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ImageError("layer: malformed pax header (no '=')")
        try:
            records[key.decode("utf-8")] = value
        except UnicodeDecodeError:
            raise ImageError("layer: pax key is not UTF-8") from None
        pos = end
    return records


class TarReader:
    """Iterate the entries of a tar stream; read each regular file's data with :meth:`read`."""

    def __init__(self, stream: Readable, budget: Budget) -> None:
        self._stream = stream
        self._budget = budget
        self._pending = 0  # data bytes of the current entry not read yet
        self._padding = 0
        self.entries = 0

    def _exact(self, n: int) -> bytes:
        data = self._stream.read(n)
        if len(data) != n:
            raise ImageError("layer: archive ends in the middle of an entry")
        return data

    def _skip_rest(self) -> None:
        while self._pending:
            self.read(min(self._pending, 1 << 20))
        if self._padding:
            self._exact(self._padding)
            self._padding = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` data bytes of the current entry (empty at its end)."""
        n = min(n, self._pending)
        if n <= 0:
            return b""
        data = self._exact(n)
        self._pending -= n
        return data

    def _metadata(self, size: int, what: str) -> bytes:
        if size > self._budget.max_metadata:
            raise ImageError(f"layer: {what} of {size} bytes exceeds the metadata budget")
        data = self._exact(size)
        pad = -size % BLOCK
        if pad:
            self._exact(pad)
        return data

    def __iter__(self) -> Iterator[Entry]:
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        zero_blocks = 0
        while True:
            self._skip_rest()
            header = self._stream.read(BLOCK)
            if not header:
                return  # some writers omit the end-of-archive blocks
            if len(header) != BLOCK:
                raise ImageError("layer: truncated header")
            if header == bytes(BLOCK):
                zero_blocks += 1
                if zero_blocks == 2:
                    return
                continue
            if zero_blocks:
                raise ImageError("layer: data after an end-of-archive block")
            stored = _number(header[148:156], "checksum")
            computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
            if stored != computed:
                raise ImageError("layer: header checksum mismatch (not a tar archive?)")
            kind = chr(header[156]) if header[156] else REGULAR
            size = _number(header[124:136], "size")
            if kind == _PAX:
                pax.update(_pax_records(self._metadata(size, "pax header")))
                continue
            if kind == _PAX_GLOBAL:
                self._metadata(size, "global pax header")  # holds nothing a layer needs
                continue
            if kind in (_GNU_LONGNAME, _GNU_LONGLINK):
                value = _text(self._metadata(size, "GNU long name"), "long name")
                if kind == _GNU_LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            if kind == _CONTIGUOUS:
                kind = REGULAR
            if kind not in KINDS:
                raise ImageError(f"layer: unsupported entry type {kind!r} (sparse or volume?)")
            self.entries += 1
            if self.entries > self._budget.max_entries:
                raise ImageError(f"layer: more than {self._budget.max_entries} entries")
            entry = self._entry(header, kind, size, pax, long_name, long_link)
            pax, long_name, long_link = {}, None, None
            if kind != REGULAR and entry.size:
                raise ImageError(f"layer: {entry.path}: only regular files may carry data")
            self._pending = entry.size
            self._padding = -entry.size % BLOCK
            yield entry

    def _entry(
        self,
        header: bytes,
        kind: str,
        size: int,
        pax: dict[str, bytes],
        long_name: str | None,
        long_link: str | None,
    ) -> Entry:
        name = _text(header[0:100], "name")
        if header[257:263] in (b"ustar\x0000", b"ustar\x00\x30\x30"):
            prefix = _text(header[345:500], "prefix")
            if prefix:
                name = f"{prefix}/{name}"
        linkname = _text(header[157:257], "link name")
        if long_name is not None:
            name = long_name
        if long_link is not None:
            linkname = long_link
        xattrs: dict[str, bytes] = {}
        for key, value in pax.items():
            if key == "path":
                name = _pax_text(value, key)
            elif key == "linkpath":
                linkname = _pax_text(value, key)
            elif key == "size":
                size = _pax_int(value, key)
            elif key.startswith("SCHILY.xattr."):
                xattrs[key[len("SCHILY.xattr.") :]] = value
            elif key.startswith("GNU.sparse."):
                raise ImageError("layer: sparse files are not supported")
        for what, text in (("path", name), ("link target", linkname)):
            if len(text.encode()) > self._budget.max_path or "\0" in text:
                raise ImageError(f"layer: {what} longer than {self._budget.max_path} or with NUL")
        mtime = _number(header[136:148], "mtime")
        if "mtime" in pax:
            mtime = int(float(_pax_text(pax["mtime"], "mtime").split(".")[0] or 0))
        return Entry(
            path=name,
            kind=kind,
            mode=_number(header[100:108], "mode") & 0o7777,
            uid=_pax_int(pax["uid"], "uid") if "uid" in pax else _number(header[108:116], "uid"),
            gid=_pax_int(pax["gid"], "gid") if "gid" in pax else _number(header[116:124], "gid"),
            mtime=max(0, min(mtime, 2**33)),
            size=size,
            linkname=linkname,
            devmajor=_number(header[329:337], "devmajor"),
            devminor=_number(header[337:345], "devminor"),
            xattrs=xattrs,
        )


def _pax_text(value: bytes, key: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"layer: pax {key} is not UTF-8") from None


def _pax_int(value: bytes, key: str) -> int:
    text = _pax_text(value, key)
    if not text.isdigit() or len(text) > 20:
        raise ImageError(f"layer: pax {key} is not a number")
    return int(text)
