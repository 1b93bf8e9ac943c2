"""A corpus of hostile layer tars, built in code so each one says what it attacks.

``OUTSIDE`` in a member name is replaced by an absolute path outside the extraction target that
the test watches; ``escapes`` says whether Python's own ``tarfile.extractall`` without a filter
writes outside its target for that tar (the control that proves the attack is real).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass, field

UP = "../" * 40  # climbs to / from any target


@dataclass
class Member:
    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    members: list[Member]
    refused: bool  # True: extraction must fail; False: it must succeed, contained
    escapes: bool = False  # tarfile.extractall(filter="fully_trusted") writes outside


def build_tar(members: list[Member], outside: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name.replace("OUTSIDE", outside))
            info.type = m.kind
            info.mode = m.mode
            info.linkname = m.linkname.replace("OUTSIDE", outside)
            info.devmajor, info.devminor = m.devmajor, m.devminor
            info.pax_headers = dict(m.pax)
            info.size = len(m.data)
            tar.addfile(info, io.BytesIO(m.data) if m.data else None)
    return buf.getvalue()


def cases() -> list[Case]:
    sym, lnk, chr_, blk, dir_ = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                 tarfile.BLKTYPE, tarfile.DIRTYPE)
    return [
        Case("dotdot", [Member(UP + "OUTSIDE/pwned", data=b"x")], True, True),
        Case("dotdot-inner", [Member("a/b/" + UP + "OUTSIDE/pwned", data=b"x")], True),
        Case("absolute", [Member("OUTSIDE/pwned", data=b"x")], True, True),
        Case("symlink-then-write", [Member("link", sym, linkname="OUTSIDE"),
                                    Member("link/pwned", data=b"x")], True, True),
        Case("relative-symlink-then-write",
             [Member("d", dir_, mode=0o755),
              Member("d/up", sym, linkname=UP + "OUTSIDE"),
              Member("d/up/pwned", data=b"x")], True, True),
        Case("hardlink-absolute", [Member("h", lnk, linkname="OUTSIDE/victim")], True),
        Case("hardlink-dotdot", [Member("h", lnk, linkname=UP + "OUTSIDE/victim")],
             True),
        Case("hardlink-missing", [Member("h", lnk, linkname="not-in-this-layer")], True),
        Case("hardlink-to-symlink-out",
             [Member("l", sym, linkname="OUTSIDE/victim"), Member("h", lnk, linkname="l")],
             True),
        Case("char-device", [Member("null", chr_, devmajor=1, devminor=3)], True),
        Case("block-device", [Member("disk", blk, devmajor=8, devminor=0)], True),
        Case("whiteout-device-in-tar", [Member("wh", chr_, devmajor=0, devminor=0)], True),
        Case("setuid-file", [Member("suid", data=b"#!/bin/sh\n", mode=0o4755),
                             Member("sgid", data=b"#!/bin/sh\n", mode=0o2755)], False),
        Case("dir-replaced-by-symlink-then-write",
             [Member("d", dir_, mode=0o755), Member("d", sym, linkname="OUTSIDE"),
              Member("d/pwned", data=b"x")], True),
        Case("file-replaced-by-dir", [Member("x", data=b"file"), Member("x", dir_, mode=0o755),
                                      Member("x/y", data=b"y")], False),
        Case("whiteout-through-symlink", [Member("link", sym, linkname="OUTSIDE"),
                                          Member("link/.wh.victim")], True),
        Case("whiteout-dotdot", [Member(".wh..."), Member("x")], True),
        Case("whiteout-dot", [Member("a/.wh..")], True),
        Case("whiteout-of-whiteout", [Member("a/.wh..wh.x")], True),
        Case("opaque-and-whiteout", [Member("a/.wh..wh..opq"), Member("a/.wh.gone"),
                                     Member("a/kept", data=b"k")], False),
        Case("xattr-overlay-redirect",
             [Member("d", dir_, mode=0o755, pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc"})],
             True),
        Case("xattr-user-overlay-opaque",
             [Member("d", dir_, mode=0o755, pax={"SCHILY.xattr.user.overlay.opaque": "y"})], True),
        Case("xattr-security-selinux",
             [Member("f", data=b"x", pax={"SCHILY.xattr.security.selinux": "system_u"})], True),
        Case("long-path", [Member("/".join(["d" * 200] * 25), data=b"x")], True),
        Case("sparse-file", [Member("s", data=b"x", pax={"GNU.sparse.major": "1"})], True),
        Case("fifo", [Member("pipe", tarfile.FIFOTYPE, mode=0o644)], False),
    ]


def gzip_bomb(uncompressed: int) -> bytes:
    """A layer whose one file is ``uncompressed`` zero bytes (about 1000:1 under gzip)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        header = tarfile.TarInfo("zeros")
        header.size = uncompressed
        gz.write(header.tobuf(format=tarfile.PAX_FORMAT))
        chunk = bytes(1 << 20)
        for _ in range(uncompressed >> 20):
            gz.write(chunk)
    return buf.getvalue()


def huge_pax_header() -> bytes:
    """A pax header that claims 100 MB: the reader must refuse before reading it."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 100 << 20
    return info.tobuf(format=tarfile.USTAR_FORMAT) + b"0" * 4096
