"""The default base layer: a synthesized minimal ``/etc`` plus mount points for the host's ``/usr``.

Until the image engine supplies real layers, a box's root is ``overlay(base layer)`` with the
host's ``/usr`` (and ``/bin``, ``/lib*``, ``/sbin`` where they are directories rather than the
usual merged-usr symlinks) bound read-only on top. ``/etc`` is never the host's: it holds users and
hosts written here and a short allowlist of non-secret files runtimes need (the dynamic linker's
cache, ``alternatives`` symlinks, the time zone, Java's config). Files a user could not read on the
host, and anything that is not a regular file, directory or symlink, are never copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import NamedTuple

from .state import ensure_dir, state_dir

HOST_TOP_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_ALLOWLIST = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "os-release",
    "debian_version",
    "mime.types",
    "java-17-openjdk",
    "java-21-openjdk",
    "ssl/openssl.cnf",
    "gcc",
    "perl",
)
FORMAT_VERSION = "1"


# A NamedTuple rather than a dataclass: made at import several times faster, and every run
# imports this module (docs/performance.md).
class BaseLayer(NamedTuple):
    """A ready base layer and the host directories to bind on top of it."""

    path: Path
    host_binds: tuple[str, ...]


def _fingerprint(hostname: str, uid: int, gid: int) -> str:
    h = hashlib.sha256(f"{FORMAT_VERSION}|{hostname}|{uid}|{gid}".encode())
    for top in HOST_TOP_DIRS:
        p = Path("/") / top
        h.update(f"{top}:{os.readlink(p) if p.is_symlink() else p.is_dir()}".encode())
    for name in ETC_ALLOWLIST:
        try:
            st = os.lstat(Path("/etc") / name)
            h.update(f"{name}:{st.st_mtime_ns}:{st.st_size}".encode())
        except OSError:
            h.update(f"{name}:-".encode())
    return h.hexdigest()[:24]


def world_readable(st: os.stat_result) -> bool:
    """Anyone may read it (and enter it, for a directory): not a secret."""
    return bool(st.st_mode & stat.S_IROTH) and (
        not stat.S_ISDIR(st.st_mode) or bool(st.st_mode & stat.S_IXOTH)
    )


def _copy_public(src: Path, dst: Path) -> None:
    """Copy a file, symlink or tree, skipping what the world cannot read (secrets)."""
    import shutil

    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.readlink(src), dst)
    elif not world_readable(st):
        return
    elif stat.S_ISREG(st.st_mode):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst, follow_symlinks=False)
        os.chmod(dst, 0o644)
    elif stat.S_ISDIR(st.st_mode):
        dst.mkdir(parents=True, exist_ok=True)
        for child in sorted(os.listdir(src)):
            _copy_public(src / child, dst / child)


def _write_etc(etc: Path, hostname: str, uid: int, gid: int) -> None:
    files = {
        "passwd": (
            f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{uid}:{gid}:sandbox:/box:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n",
        "hostname": f"{hostname}\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        "resolv.conf": "",
    }
    for name, text in files.items():
        (etc / name).write_text(text)
        os.chmod(etc / name, 0o644)


def _remove_abandoned_builds(layers: Path) -> None:
    """A build takes milliseconds: one older than ten minutes belongs to a killed process."""
    import shutil

    for stale in layers.glob(".build-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 600:
                shutil.rmtree(stale)


def ensure_base_layer(hostname: str, uid: int, gid: int) -> BaseLayer:
    """Build (once, atomically) and return the base layer for these box identities."""
    layers = ensure_dir(state_dir() / "layers")
    path = layers / f"base-{_fingerprint(hostname, uid, gid)}"
    host_binds = tuple(
        f"/{top}"
        for top in HOST_TOP_DIRS
        if (Path("/") / top).is_dir() and not (Path("/") / top).is_symlink()
    )
    if path.is_dir():
        return BaseLayer(path, host_binds)
    # Only a build needs these (a run whose layer exists never loads them).
    import shutil
    import tempfile

    _remove_abandoned_builds(layers)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=layers))
    try:
        os.chmod(tmp, 0o755)  # noqa: S103 - every box's host id must read the layer
        for top in HOST_TOP_DIRS:
            host = Path("/") / top
            if host.is_symlink():
                os.symlink(os.readlink(host), tmp / top)
            elif host.is_dir():
                (tmp / top).mkdir()
        for name in ("etc", "tmp", "proc", "dev", "box", "root"):
            (tmp / name).mkdir(mode=0o755, exist_ok=True)
        for name in ETC_ALLOWLIST:
            if os.path.lexists(Path("/etc") / name):
                _copy_public(Path("/etc") / name, tmp / "etc" / name)
        _write_etc(tmp / "etc", hostname, uid, gid)
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return BaseLayer(path, host_binds)
