"""The one exception hierarchy of the sandbox.

Program outcomes (a crash, a time limit, a forbidden syscall) are never exceptions: they are the
verdict of a :class:`sandbox.report.Report`, and so is a box that failed during its own setup
(verdict ``sandbox_error``, with the phase and errno in ``Report.setup_error``). Only failures of
the sandbox itself raise (before the box starts), and every one of them derives from
:class:`SandboxError` so a caller can catch them in one place.

=================  =============================================================  ========
class              raised when                                                    CLI exit
=================  =============================================================  ========
``ConfigError``    a profile, policy or request is invalid (names file and key)   125
``HostError``      this host cannot give a guarantee the profile demands          125
``ImageError``     an image, layer, build file or registry answer is missing or   125
                   refused (bad reference, digest mismatch, hostile layer, ...);
                   ``BuildFileError`` for a build file (names file and line)
=================  =============================================================  ========
"""

from __future__ import annotations

EXIT_SANDBOX_ERROR = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class SandboxError(Exception):
    """Base class of every error the sandbox raises; ``hint`` tells the user what to do."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message,), {"hint": self.hint})


class ConfigError(SandboxError):
    """A profile, policy or request is invalid: the message names the file and the key."""

    def __init__(self, source: str, key: str | None, problem: str, *, hint: str | None = None):
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}", hint=hint)
        self.source = source
        self.key = key
        self.problem = problem

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.source, self.key, self.problem), {"hint": self.hint})


class HostError(SandboxError):
    """This host cannot enforce something the profile demands (the run is refused)."""


class ImageError(SandboxError):
    """An image cannot be used: missing, malformed, refused as hostile, or unreachable."""


class BuildFileError(ImageError):
    """A build file is invalid: as a ConfigError names file and key, this names the file and
    the line (None: the file as a whole)."""

    def __init__(self, source: str, line: int | None, problem: str, *, hint: str | None = None):
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {problem}", hint=hint)
        self.source = source
        self.line = line
        self.problem = problem

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.source, self.line, self.problem), {"hint": self.hint})
