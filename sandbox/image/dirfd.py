"""File operations relative to directory descriptors that never follow a symlink.

Everything the image engine makes, reads or removes in a build context, a staging tree, a RUN
step's upper directory or the store goes through here. A path is walked from a directory
descriptor one component at a time with ``O_NOFOLLOW`` (openat(2)), so no symlink, whether a
layer, a box, an earlier ``COPY`` source or another local user planted it, is ever followed;
files are made with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and their modes and owners set with
fchmod(2)/fchown(2) on the descriptor, never through a path; regular files are opened
``O_NONBLOCK`` and checked with fstat(2), so a FIFO in their place cannot block a read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Deeper trees are refused by :func:`walk` (each level holds one descriptor and one frame).
MAX_DEPTH = 256


class Unwalkable(ImageError):
    """A component of a path is missing (``missing``), or a symlink or not a directory."""

    def __init__(self, parts: Sequence[str], missing: bool) -> None:
        self.parts = tuple(parts)
        self.missing = missing
        what = "does not exist" if missing else "is a symlink or a file, and a path goes through it"
        super().__init__(f"{'/'.join(parts)} {what}")


def open_dir(
    dir_fd: int,
    parts: Sequence[str],
    *,
    create: bool = False,
    made: Callable[[int, str, tuple[str, ...]], None] | None = None,
) -> int:
    """A new descriptor of the directory ``parts`` below ``dir_fd``, never reached via a symlink.

    With ``create``, missing directories are made (0755) and ``made(parent_fd, name, parts so
    far)`` is told of each. Raises :class:`Unwalkable`.
    """
    fd = os.dup(dir_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise Unwalkable(parts[: i + 1], missing=True) from None
                os.mkdir(part, 0o755, dir_fd=fd)
                if made is not None:
                    made(fd, part, tuple(parts[: i + 1]))
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Unwalkable(parts[: i + 1], missing=False) from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_path_dir(path: str | Path) -> int:
    """A descriptor of a directory the caller named (the store, a context): its own symlinks
    are the caller's to choose, but what is below it is walked with :func:`open_dir`."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
    """``name`` opened for reading and its fstat, or None unless it is a regular file.

    ``O_NONBLOCK``: a FIFO put there since it was looked at must not block the open.
    """
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a socket
            return None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def create_file(dir_fd: int, name: str, mode: int = 0o600) -> int:
    """A new file ``name`` (never an existing one, never through a symlink), open for writing."""
    fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    os.fchmod(fd, mode)  # the umask never widens or narrows what was asked
    return fd


def copy_data(source: int, target: int) -> None:
    """Copy a regular file's bytes between two descriptors."""
    while chunk := os.read(source, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view) :]


def remove_entry(dir_fd: int, name: str, keep_dir: bool = False) -> None:
    """Remove whatever is at ``name`` (a directory with all it holds, unless ``keep_dir``)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
    elif not keep_dir:
        _remove_dir(dir_fd, name)


def _remove_dir(parent_fd: int, name: str) -> None:
    """Empty and remove a directory holding one descriptor at a time, however deep it is.

    Directories are made writable with fchmod(2) first (a layer may hold read-only ones). Going
    up uses ``..`` of a directory reached with ``O_NOFOLLOW``: its real parent.
    """
    names = [name]
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        while True:
            if os.fstat(fd).st_mode & 0o700 != 0o700:
                os.fchmod(fd, 0o700)
            sub = None
            for entry in os.listdir(fd):
                if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                    sub = entry
                    break
                os.unlink(entry, dir_fd=fd)
            if sub is not None:
                nfd = os.open(sub, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
                names.append(sub)
                continue
            if len(names) == 1:
                break
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a tree even where directories are read-only, or a file), following no
    symlink below its parent; nothing there is fine."""
    parent = open_path_dir(path.parent)
    try:
        remove_entry(parent, path.name)
    finally:
        os.close(parent)


@dataclass(frozen=True)
class Node:
    """One entry of a :func:`walk`: ``dir_fd`` is its parent's, open while the walk is here."""

    rel: str
    name: str
    st: os.stat_result
    dir_fd: int


def walk(fd: int, rel: str = "", depth: int = 0) -> Iterator[Node]:
    """Every entry below the directory ``fd``, parents first, names sorted at each level;
    symlinks are entries, never followed. Raises :class:`ImageError` below :data:`MAX_DEPTH`."""
    if depth > MAX_DEPTH:
        raise ImageError(f"{rel}: more than {MAX_DEPTH} nested directories")
    for name in sorted(os.listdir(fd)):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        path = f"{rel}/{name}" if rel else name
        yield Node(path, name, st, fd)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                yield from walk(sub, path, depth + 1)
            finally:
                os.close(sub)


def tree_size(path: Path) -> int:
    """The bytes of the regular files below ``path`` (0 if it is gone)."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError:
        return 0
    total = 0
    try:
        with contextlib.suppress(OSError, ImageError):
            for node in walk(fd):
                if stat.S_ISREG(node.st.st_mode):
                    total += node.st.st_size
    finally:
        os.close(fd)
    return total
