"""Image references: ``[REGISTRY/]REPOSITORY[:TAG][@sha256:HEX]``, parsed strictly.

The grammar is the distribution project's (``reference`` package): a first component that holds
a ``.`` or a ``:`` or is ``localhost`` names a registry; repository components are lower-case
alphanumerics joined by ``.``, ``_``, ``__`` or dashes; a tag is at most 128 word characters,
dots and dashes. Without a registry a name is local to this machine's store (``python:3``);
there is no implicit default registry, so nothing is ever fetched from a host nobody named.

It sits below both the image package and the profiles, which check a profile's ``image`` key
with it, so neither imports the other for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ImageError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_LENGTH = 255 + 128 + 72 + 256


@dataclass(frozen=True)
class Reference:
    """A parsed reference; ``registry`` is None for a name local to the store."""

    registry: str | None
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``[registry/]repository``: the name the store files tags under."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def with_tag(self) -> Reference:
        """This reference with ``latest`` as its tag when it names neither tag nor digest."""
        if self.tag is None and self.digest is None:
            return Reference(self.registry, self.repository, "latest", None)
        return self


def check_digest(text: str, what: str = "digest") -> str:
    """``text`` if it is a ``sha256:`` digest of 64 lower-case hex digits."""
    if not DIGEST.match(text):
        raise ImageError(f"bad {what} {text[:100]!r}: expected sha256: and 64 hex digits")
    return text


def parse_reference(text: str) -> Reference:
    """Parse ``text`` or raise :class:`ImageError` saying what is wrong with it."""
    if not isinstance(text, str) or not text or len(text) > MAX_LENGTH:
        raise ImageError(f"bad image reference {str(text)[:80]!r}: empty or too long")
    rest, at, digest = text.partition("@")
    if at:
        check_digest(digest, f"digest in image reference {text!r}")
    registry: str | None = None
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise ImageError(f"bad registry {first!r} in image reference {text!r}")
        registry, rest = first, remainder
    repository, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if colon and not _TAG.match(tag):
        raise ImageError(f"bad tag {tag!r} in image reference {text!r}")
    if not _REPOSITORY.match(repository) or len(repository) > 255:
        raise ImageError(
            f"bad repository {repository!r} in image reference {text!r}",
            hint="names are lower-case letters, digits and . _ - separated by /",
        )
    return Reference(registry, repository, tag or None, digest or None)
