"""Host paths the sandbox opens on a box's behalf, resolved once and never through a symlink.

A box (this run's or an earlier one's) can create symlinks, hard links, directories and FIFOs
anywhere it can write, including host directories bound writable. Root (or the caller) must
never follow one of those: a planted ``out -> /`` turned a later ``--bind dir/out:...`` into
the host's root, read-write. So every host path is opened here:

* resolved with ``openat2(RESOLVE_NO_SYMLINKS)`` (Linux 5.6+), else one component at a time
  with ``O_NOFOLLOW``; the descriptor is what the sandbox then uses (mounts, reads, writes),
  never the path again;
* inputs must be regular files (or character devices, which a box cannot create), opened with
  ``O_NONBLOCK`` so a planted FIFO cannot stall the supervisor;
* outputs (:class:`OutputFile`) are checked before the program runs, written to a new file with
  an unpredictable name created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` in the target's directory,
  and renamed over the target at the end: a planted symlink or hard link at the target is
  replaced, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from typing import NamedTuple

from . import kernel
from .errors import ConfigError

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class PathRefused(Exception):
    """A host path cannot be used; ``problem`` says why in words a user can act on."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _symlink_on(path: str) -> str | None:
    """The first component of ``path`` that is a symlink (for the error message)."""
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return current
        except OSError:
            return None
    return None


def _open_by_components(path: str, flags: int) -> int:
    """The fallback for kernels without openat2: ``O_NOFOLLOW`` on every component."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", _DIR)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        if not parts:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=fd)
        result = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    # O_PATH|O_NOFOLLOW opens a final symlink itself instead of failing: refuse it here.
    if stat.S_ISLNK(os.fstat(result).st_mode):
        os.close(result)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    return result


def open_nofollow(path: str, flags: int) -> int:
    """Open absolute ``path`` without following any symlink; raises :class:`PathRefused`."""
    if not os.path.isabs(path) or "\0" in path:
        raise PathRefused("expected an absolute path")
    path = os.path.normpath(path)  # lexical '..' is the real one when no symlink is followed
    try:
        try:
            return kernel.openat2(kernel.AT_FDCWD, path, flags, kernel.RESOLVE_NO_SYMLINKS)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            return _open_by_components(path, flags)
    except OSError as e:
        # ELOOP from RESOLVE_NO_SYMLINKS; EACCES when fs.protected_symlinks refused it first.
        link = _symlink_on(path) if e.errno in (errno.ELOOP, errno.EACCES) else None
        if link is not None or e.errno == errno.ELOOP:
            link = link or path
            raise PathRefused(
                f"{link} is a symlink: host paths are never followed through symlinks "
                "(a box could have planted it); give the real path"
            ) from None
        raise PathRefused(e.strerror or str(e)) from None


# A NamedTuple rather than a dataclass: made at import several times faster, and every run
# imports this module (docs/performance.md).
class CheckedPath(NamedTuple):
    """What a host path was when the supervisor checked it (its identity, for re-checks)."""

    path: str
    device: int
    inode: int
    is_dir: bool

    def same_as(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.device, self.inode)


def check_source(path: str) -> tuple[int, CheckedPath]:
    """Open a bind source or layer (``O_PATH``): a directory or a regular file with one link.

    A file with several hard links could be a box's link to a file it may not read (with
    ``fs.protected_hardlinks=0``): it is refused, as are FIFOs, sockets and devices.
    """
    fd = open_nofollow(path, os.O_PATH)
    st = os.fstat(fd)
    try:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise PathRefused(
                f"{path} has {st.st_nlink} hard links (one could be a box's): copy the file"
            )
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise PathRefused(f"{path} is not a directory or a regular file")
    except PathRefused:
        os.close(fd)
        raise
    return fd, CheckedPath(os.path.normpath(path), st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode))


def open_input(path: str, option: str) -> int:
    """Open a file the program reads (``--stdin``): a regular file or a character device."""
    absolute = os.path.abspath(path)
    try:
        fd = open_nofollow(absolute, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except PathRefused as e:
        raise ConfigError("command line", option, f"cannot use {path}: {e.problem}") from None
    st = os.fstat(fd)
    problem = None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        problem = f"{path} is not a regular file (a FIFO or socket is refused)"
    elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        # A box may have linked a file it cannot read (fs.protected_hardlinks=0) for root
        # to read it back to the box.
        problem = f"{path} has {st.st_nlink} hard links (one could be a box's): copy the file"
    if problem is not None:
        os.close(fd)
        raise ConfigError("command line", option, problem)
    os.set_blocking(fd, True)  # our own open file description: nobody else sees the flag
    return fd


#: Names of the CLI's own descriptors (``--report /dev/stdout``): used as the descriptor.
_OWN_DESCRIPTOR = re.compile(r"^/(?:dev/fd|proc/self/fd)/([0-9]+)$")
_STANDARD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


class OutputFile:
    """A file the sandbox writes (report, meta, the program's stdout): made safely, then
    renamed into place. Construct it before the program runs, so a bad target is refused
    while nothing is lost yet.

    Two targets are written as they are, since no box can have made them: one of the caller's
    own descriptors by name (``/dev/stdout``, ``/dev/fd/N``) and a character device
    (``/dev/null``; a box cannot create device nodes)."""

    def __init__(self, path: str, option: str) -> None:
        self.path, self.option = path, option
        self._dir: int | None = None
        self._tmp: str | None = None
        match = _OWN_DESCRIPTOR.match(path)
        own = _STANDARD.get(path, int(match.group(1)) if match else None)
        if own is not None:
            try:
                self.fd = os.dup(own)
            except OSError as e:
                raise ConfigError(
                    "command line", option, f"cannot write {path}: {e.strerror}"
                ) from None
            self._open = True
            return
        absolute = os.path.abspath(path)
        directory, self.name = os.path.split(absolute)
        if not self.name:
            raise ConfigError("command line", option, f"{path} names a directory")
        try:
            self._dir = open_nofollow(directory, _DIR)
        except PathRefused as e:
            raise ConfigError(
                "command line", option, f"cannot write {path}: {directory}: {e.problem}"
            ) from None
        try:
            if self._is_device():
                self.fd = os.open(
                    self.name,
                    os.O_WRONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
                    dir_fd=self._dir,
                )
            else:
                # os.urandom is what secrets.token_hex draws from, without its imports.
                self._tmp = f".{self.name[:200]}.{os.urandom(8).hex()}.tmp"
                self.fd = os.open(
                    self._tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=self._dir,
                )
        except OSError as e:
            os.close(self._dir)
            raise ConfigError(
                "command line", option, f"cannot write {path}: {e.strerror}"
            ) from None
        except ConfigError:
            os.close(self._dir)
            raise
        self._open = True

    def _is_device(self) -> bool:
        """True for a character device at the target; refuses a planted one (symlink, FIFO,
        directory, socket); False when there is none or a regular file (to be replaced)."""
        try:
            st = os.stat(self.name, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISCHR(st.st_mode):
            return True
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise ConfigError(
                "command line",
                self.option,
                f"{self.path} is {kind}: refusing to replace it (a box could have planted it)",
            )
        return False

    def write(self, data: bytes) -> None:
        """Write all of ``data`` (a regular file: never blocks for long)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def commit(self) -> None:
        """Rename the finished file over the target; raises OSError if that fails."""
        if not self._open:
            return
        try:
            if self._tmp is not None and self._dir is not None:
                ours = os.fstat(self.fd)
                there = os.stat(self._tmp, dir_fd=self._dir, follow_symlinks=False)
                if (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino):
                    raise OSError(errno.EEXIST, f"{self._tmp} was replaced while it was written")
                os.rename(self._tmp, self.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        finally:
            self._close()

    def discard(self) -> None:
        """Remove the unfinished file (after a failure)."""
        if self._open:
            if self._tmp is not None and self._dir is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp, dir_fd=self._dir)
            self._close()

    def _close(self) -> None:
        os.close(self.fd)
        if self._dir is not None:
            os.close(self._dir)
        self._open = False
