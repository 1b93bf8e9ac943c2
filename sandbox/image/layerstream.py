"""A layer blob as a stream of tar bytes: decompressed, hashed both ways, and kept in budget.

The compressed bytes are hashed into the blob digest and the tar bytes into the diff id, while
they pass, so nothing is read twice. Output is produced in bounded steps (``max_length``), so a
gzip bomb costs at most one step of memory and stops at the byte or ratio budget.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import BinaryIO

from ..errors import ImageError
from .tarstream import Budget

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class LayerStream:
    """``read(n)`` gives tar bytes; :meth:`finish` drains the blob and returns its digests."""

    def __init__(self, raw: BinaryIO, budget: Budget) -> None:
        self._raw = raw
        self._budget = budget
        self._blob_hash = hashlib.sha256()
        self._diff_hash = hashlib.sha256()
        self.blob_size = 0
        self.tar_size = 0
        self._buffer = bytearray()
        first = self._raw_read(CHUNK)
        if first.startswith(ZSTD_MAGIC):
            raise ImageError("layer: zstd-compressed layers are not supported (use gzip)")
        self._gzip = first.startswith(GZIP_MAGIC)
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzip else None
        self._input = first
        self._eof = False

    def _raw_read(self, n: int) -> bytes:
        data = self._raw.read(n)
        self._blob_hash.update(data)
        self.blob_size += len(data)
        return data

    def _produce(self) -> None:
        """Move at most one CHUNK of output into the buffer."""
        if self._inflate is None:
            data = self._input or self._raw_read(CHUNK)
            self._input = b""
            if not data:
                self._eof = True
            self._account(data)
            return
        while True:
            if self._inflate.eof:  # end of a gzip member: another may follow (concatenated)
                rest = self._inflate.unused_data + self._input or self._raw_read(CHUNK)
                if not rest:
                    self._eof = True
                    return
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._input = rest
            if not self._input:
                self._input = self._raw_read(CHUNK)
                if not self._input:
                    raise ImageError("layer: gzip stream ends early")
            try:
                out = self._inflate.decompress(self._input, CHUNK)
            except zlib.error as e:
                raise ImageError(f"layer: bad gzip data ({e})") from None
            self._input = self._inflate.unconsumed_tail
            if out:
                self._account(out)
                return

    def _account(self, data: bytes) -> None:
        self._diff_hash.update(data)
        self.tar_size += len(data)
        self._buffer += data
        budget = self._budget
        if self.tar_size > budget.max_bytes:
            raise ImageError(f"layer: more than {budget.max_bytes} bytes uncompressed")
        if (
            self._gzip
            and self.tar_size > budget.ratio_after
            and self.tar_size > budget.max_ratio * max(self.blob_size, 1)
        ):
            raise ImageError(
                f"layer: compression ratio above {budget.max_ratio}:1 (a decompression bomb?)"
            )

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` tar bytes (fewer only at the end)."""
        if n < 0:
            raise ImageError("layer: unbounded read")
        while len(self._buffer) < n and not self._eof:
            self._produce()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def finish(self) -> tuple[str, int, str]:
        """Read to the end (padding after the archive counts too): (digest, size, diff id)."""
        while not self._eof:
            self._buffer.clear()
            self._produce()
        self._buffer.clear()
        return (
            "sha256:" + self._blob_hash.hexdigest(),
            self.blob_size,
            "sha256:" + self._diff_hash.hexdigest(),
        )
