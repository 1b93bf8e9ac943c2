"""The one reader of the sandbox's TOML files (profiles, policies, groups).

:func:`read_toml` turns a file into a dict or a :class:`~sandbox.errors.ConfigError` naming it;
a :class:`Table` walks the result. A table knows its file and its dotted key path
(``seccomp.rule[2].args[0]``), refuses keys it was not given, and every typed getter names the
file and the whole key when the value is wrong, so no reader of a file checks keys or types by
hand.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Collection, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

_E = TypeVar("_E", bound=Enum)


class _Required:
    """The default of a key that must be present."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: Pass as ``default`` when a key must be present.
REQUIRED: Any = _Required()


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file, turning every failure into a ConfigError that names it."""
    try:
        # O_NONBLOCK: a FIFO put where a file was named must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(str(path), None, "not a regular file")
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), None, f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 (found by fuzzing)
        raise ConfigError(str(path), None, f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(str(path), None, f"cannot read: {e.strerror}") from None


class Table:
    """One table of a TOML document: ``keys`` are the only keys it may have (None: its keys
    are data, as in ``[env]``)."""

    __slots__ = ("data", "path", "source")

    def __init__(
        self, source: str, data: object, keys: Collection[str] | None, path: str = ""
    ) -> None:
        self.source, self.path = source, path
        if not isinstance(data, dict):
            raise ConfigError(source, path or None, "expected a table")
        unknown = [] if keys is None else [key for key in data if key not in keys]
        if unknown:
            raise ConfigError(
                source,
                self.key(unknown[0]),
                "unknown key (expected one of " + ", ".join(sorted(keys or ())) + ")",
            )
        self.data: dict[str, Any] = data

    @classmethod
    def read(cls, path: Path, keys: Collection[str]) -> Table:
        """The top-level table of the file at ``path``."""
        return cls(str(path), read_toml(path), keys)

    def key(self, name: str) -> str:
        """The dotted path of ``name`` in this table."""
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str | None, problem: str, hint: str | None = None) -> ConfigError:
        """The error for key ``name`` of this table (the table itself if None)."""
        where = self.key(name) if name else self.path or None
        return ConfigError(self.source, where, problem, hint=hint)

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """(key, raw value) pairs, for tables whose keys are data (``[env]``)."""
        return iter(self.data.items())

    def raw(self, name: str, default: Any = None) -> Any:
        """The value as the file has it, for a getter of the caller's own."""
        value = self.data.get(name, default)
        if value is REQUIRED:
            raise self.fail(name, "missing")
        return value

    def _typed(self, name: str, kind: type, default: Any, expected: str | None) -> Any:
        value = self.raw(name, default)
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise self.fail(name, f"expected {expected or kind.__name__}, got {value!r}")
        return value

    def string(self, name: str, default: str = REQUIRED, expected: str | None = None) -> str:
        """A string value (``expected`` says what kind, in the error)."""
        value: str = self._typed(name, str, default, expected)
        return value

    def optional_string(self, name: str, expected: str | None = None) -> str | None:
        """A string value, or None when the key is absent."""
        return None if name not in self.data else self.string(name, expected=expected)

    def integer(self, name: str, default: int = REQUIRED) -> int:
        """An integer value (``true`` is not one)."""
        value: int = self._typed(name, int, default, None)
        return value

    def boolean(self, name: str, default: bool = REQUIRED) -> bool:
        """``true`` or ``false``."""
        value: bool = self._typed(name, bool, default, None)
        return value

    def array(self, name: str) -> list[Any]:
        """An array (empty when the key is absent)."""
        value = self.data.get(name, [])
        if not isinstance(value, list):
            raise self.fail(name, "expected an array")
        return value

    def strings(self, name: str, expected: str = "an array of strings") -> list[str]:
        """An array of strings (empty when the key is absent)."""
        value = self.array(name)
        if not all(isinstance(v, str) for v in value):
            raise self.fail(name, f"expected {expected}")
        return value

    def enum(self, name: str, kind: type[_E], default: _E | None = None) -> _E:
        """One of ``kind``'s values (given as its string)."""
        value = self.data.get(name, default.value if default is not None else REQUIRED)
        choices = ", ".join(repr(m.value) for m in kind)
        if value is REQUIRED:
            raise self.fail(name, f"missing: expected one of {choices}")
        if isinstance(value, str):
            for member in kind:
                if member.value == value:
                    return member
        raise self.fail(name, f"expected one of {choices}, got {value!r}")

    def table(self, name: str, keys: Collection[str] | None) -> Table:
        """A sub-table (empty when the key is absent)."""
        return Table(self.source, self.data.get(name, {}), keys, self.key(name))

    def tables(self, name: str, keys: Collection[str] | None) -> list[Table]:
        """An array of tables (``[[name]]``), each with its index in its path."""
        return [
            Table(self.source, item, keys, f"{self.key(name)}[{i}]")
            for i, item in enumerate(self.array(name))
        ]
