"""A box directory's tree, handled by the host without trusting anything a box left in it.

``sandbox isolate`` binds a host directory (``box/``) into the box writable, and the host
(root) then opens, chowns and removes files there between runs. A program controls that tree:
it can leave symlinks (``out -> /etc/shadow``), hard links to host files, FIFOs, and deep
nests of directories. So everything here works from directory descriptors, never by path:

* :func:`open_beneath` resolves a relative path with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS)`` (else one component at a time with ``O_NOFOLLOW``, without ``..``);
* :func:`hand_over` gives the tree to an owner (the box's host uid before a run, the caller
  after it), removing, as isolate does, every file that is not a directory or a regular file,
  and also every regular file with more than one hard link (one name could be a host file's):
  a symlink, FIFO or link is never followed, waited on, or chowned;
* :func:`remove_tree` removes a tree, symlinks as themselves, at any depth with a bounded
  number of descriptors (too deep a nest is moved up to the top and removed from there).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from . import kernel

_RESOLVE = kernel.RESOLVE_BENEATH | kernel.RESOLVE_NO_SYMLINKS | kernel.RESOLVE_NO_MAGICLINKS
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How deep :func:`hand_over` descends (one descriptor per level); a box nesting deeper
#: makes the run fail until ``--cleanup``, which flattens the nest to remove it.
MAX_DEPTH = 256


class TreeError(Exception):
    """The tree cannot be handled; the message says which file and why."""


def open_beneath(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open relative ``path`` under ``dir_fd``, never through a symlink or out of it."""
    if os.path.isabs(path) or "\0" in path:
        raise OSError(errno.EINVAL, "expected a relative path", path)
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return kernel.openat2(dir_fd, path, flags, _RESOLVE, mode)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, "'..' is not allowed", path)
    fd = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.open(parts[-1] if parts else ".", flags, mode, dir_fd=fd)
    finally:
        os.close(fd)


def _open_child(dir_fd: int, name: str, st: os.stat_result) -> int:
    """The directory ``name`` in ``dir_fd``, checked to be the one just stat'ed."""
    fd = os.open(name, _DIRECTORY, dir_fd=dir_fd)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise TreeError(f"{name} changed while it was handled")
    return fd


def hand_over(dir_fd: int, uid: int, gid: int, where: str = "box") -> None:
    """Make the tree at ``dir_fd`` (the directory itself included) owned by ``uid:gid``,
    first removing what is not a directory or a regular file with one link."""
    _hand_over(dir_fd, uid, gid, where, 0)
    os.fchown(dir_fd, uid, gid)


def _hand_over(dir_fd: int, uid: int, gid: int, where: str, depth: int) -> None:
    for name in os.listdir(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if depth >= MAX_DEPTH:
                raise TreeError(
                    f"{where}/{name} is nested over {MAX_DEPTH} directories deep: "
                    "clean the box up (--cleanup)"
                )
            child = _open_child(dir_fd, name, st)
            try:
                _hand_over(child, uid, gid, f"{where}/{name}", depth + 1)
                os.fchown(child, uid, gid)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        else:  # a symlink, FIFO, socket, device or linked file: never followed nor kept
            os.unlink(name, dir_fd=dir_fd)


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove ``name`` in ``parent_fd`` and everything under it; symlinks are removed, never
    followed. Nothing to remove is not an error."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    top = _open_child(parent_fd, name, st)
    try:
        moved = 0
        while True:  # each pass empties the top; nests too deep are moved up to it first
            moved = _empty(top, top, 0, moved)
            if not os.listdir(top):
                break
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=parent_fd)


def _empty(top: int, dir_fd: int, depth: int, moved: int) -> int:
    """Remove what ``dir_fd`` holds; a directory at :data:`MAX_DEPTH` is renamed into
    ``top`` for a later pass instead. Returns the count of renames so far (for new names)."""
    for name in os.listdir(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            continue
        if depth >= MAX_DEPTH:
            moved += 1
            os.rename(
                name, f".deep.{moved}.{os.urandom(4).hex()}", src_dir_fd=dir_fd, dst_dir_fd=top
            )
            continue
        child = _open_child(dir_fd, name, st)
        try:
            moved = _empty(top, child, depth + 1, moved)
        finally:
            os.close(child)
        with contextlib.suppress(OSError):  # not empty: a nest moved up, removed next pass
            os.rmdir(name, dir_fd=dir_fd)
    return moved
