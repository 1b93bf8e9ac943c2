"""The shared-library closure of host ELF programs, read from the files (never by running ldd).

``ldd`` runs the program's own dynamic loader, so it is unsafe on untrusted binaries and
pointless offline; reading ``PT_INTERP`` and the ``DT_NEEDED``/``DT_RUNPATH``/``DT_RPATH``
entries of the dynamic section and searching the loader's directories (ld.so(8), "Rpath token
expansion" for ``$ORIGIN``) gives the same answer for the programs an image bundles.
"""

from __future__ import annotations

import glob
import os
import stat
import struct
from dataclasses import dataclass

from ..errors import ImageError

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29
DEFAULT_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)


@dataclass(frozen=True)
class ElfInfo:
    """What the loader needs for one ELF file."""

    interpreter: str | None
    needed: tuple[str, ...]
    search: tuple[str, ...]  # RPATH/RUNPATH directories, $ORIGIN expanded


def read_elf(path: str) -> ElfInfo | None:
    """The loader facts of a 64-bit little-endian ELF file; None if ``path`` is not ELF."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return None
        if head[4] != 2 or head[5] != 1:
            raise ImageError(f"{path}: only 64-bit little-endian ELF files can be bundled")
        phoff, phentsize, phnum = (
            struct.unpack_from("<Q", head, 32)[0],
            *struct.unpack_from("<HH", head, 54),
        )
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        loads: list[tuple[int, int, int]] = []
        dynamic: tuple[int, int] | None = None
        interpreter = None
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", table, i * phentsize
            )
            if p_type == PT_LOAD:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == PT_DYNAMIC:
                dynamic = (p_offset, p_filesz)
            elif p_type == PT_INTERP:
                f.seek(p_offset)
                interpreter = f.read(p_filesz).split(b"\0", 1)[0].decode()
        if dynamic is None:
            return ElfInfo(interpreter, (), ())
        f.seek(dynamic[0])
        raw = f.read(dynamic[1])
        entries = [struct.unpack_from("<qQ", raw, o) for o in range(0, len(raw) - 15, 16)]
        strtab = next((v for t, v in entries if t == DT_STRTAB), None)
        if strtab is None:
            return ElfInfo(interpreter, (), ())
        offset = next(
            (off + strtab - va for va, off, size in loads if va <= strtab < va + size), None
        )
        if offset is None:
            raise ImageError(f"{path}: malformed dynamic section")

        def string(at: int) -> str:
            f.seek(offset + at)
            return f.read(4096).split(b"\0", 1)[0].decode()

        needed, search = [], []
        for tag, value in entries:
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed.append(string(value))
            elif tag in (DT_RPATH, DT_RUNPATH):
                origin = os.path.dirname(os.path.abspath(path))
                search += [
                    d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                    for d in string(value).split(":")
                    if d
                ]
        return ElfInfo(interpreter, tuple(needed), tuple(search))


def loader_dirs() -> tuple[str, ...]:
    """The dynamic loader's directories: ``/etc/ld.so.conf`` (with includes), then defaults."""
    dirs: list[str] = []

    def read(conf: str, depth: int) -> None:
        try:
            with open(conf) as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line.startswith("include ") and depth < 8:
                for inc in sorted(glob.glob(line.split(None, 1)[1])):
                    read(inc, depth + 1)
            elif line.startswith("/"):
                dirs.append(line)

    read("/etc/ld.so.conf", 0)
    return tuple(dict.fromkeys([*dirs, *DEFAULT_DIRS]))


def closure(paths: list[str]) -> list[str]:
    """Every interpreter and library the ELF files in ``paths`` need, transitively."""
    dirs = loader_dirs()
    found: dict[str, None] = {}
    todo = list(paths)
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        info = read_elf(real)
        if info is None:
            continue
        if info.interpreter:
            found.setdefault(info.interpreter)
            todo.append(info.interpreter)
        for name in info.needed:
            lib = _find(name, (*info.search, *dirs))
            if lib is None:
                raise ImageError(f"{path} needs {name}, which is not on this host")
            found.setdefault(lib)
            todo.append(lib)
    return list(found)


def _find(name: str, dirs: tuple[str, ...]) -> str | None:
    if "/" in name:
        return name if os.path.exists(name) else None
    for d in dirs:
        candidate = os.path.join(d, name)
        if os.path.exists(candidate):
            return candidate
    return None
