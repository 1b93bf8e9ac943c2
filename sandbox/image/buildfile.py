"""The build file (``Sandboxfile``): a Dockerfile-like list of instructions, parsed strictly.

Grammar (docs/images.md has examples)::

    file        = { line } ;  blank lines and lines starting with "#" are ignored
    line        = KEYWORD args ;  a trailing "\\" joins the next line
    FROM        scratch | REFERENCE                       (first instruction, once)
    RUN         shell command | ["exec", "form"]
    CMD         shell command | ["exec", "form"]
    ENTRYPOINT  shell command | ["exec", "form"]
    COPY        [--chmod=OCTAL] SRC... DEST | ["SRC", ..., "DEST"]
    BUNDLE      [--exclude=GLOB]... HOST_PATH...
    ENV         NAME=value...    (shell-style quoting)
    LABEL       key=value...
    WORKDIR     PATH
    USER        NAME | UID | UID:GID    (recorded only: a box runs as its profile's uid)

``BUNDLE`` copies host files and directories to the same paths in the image, with the exact
shared-library closure of every ELF file among them (see :mod:`sandbox.image.elf`). Keywords are
case-insensitive. Every error names the file and the line.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass

from ..errors import BuildFileError, ImageError
from ..imageref import parse_reference
from .oci import parse_user

KEYWORDS = (
    "FROM",
    "RUN",
    "CMD",
    "ENTRYPOINT",
    "COPY",
    "BUNDLE",
    "ENV",
    "LABEL",
    "WORKDIR",
    "USER",
)
MAX_FILE = 1 << 20
MAX_INSTRUCTIONS = 1000


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword, arguments (already split), options and source line."""

    line: int
    keyword: str
    args: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def option(self, name: str) -> list[str]:
        """Every value of ``--name=value``."""
        return [v for k, v in self.options if k == name]


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, line: int, problem: str) -> BuildFileError:
        return BuildFileError(self.source, line, problem)

    def logical_lines(self, text: str) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        pending: list[str] = []
        start = 0
        for number, raw in enumerate(text.split("\n"), 1):
            stripped = raw.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if pending and stripped.startswith("#"):
                continue  # comments inside a continued instruction, as docker allows
            if not pending:
                start = number
            if stripped.endswith("\\"):
                pending.append(stripped[:-1])
                continue
            pending.append(stripped)
            out.append((start, " ".join(p for p in pending if p)))
            pending = []
        if pending:
            raise self.fail(start, "the last instruction ends with a line continuation")
        return out

    def command(self, line: int, rest: str, keyword: str) -> tuple[str, ...]:
        if rest.startswith("["):
            try:
                value = json.loads(rest)
            except ValueError:
                raise self.fail(line, f"{keyword}: invalid JSON array") from None
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise self.fail(line, f"{keyword}: expected a non-empty JSON array of strings")
            return tuple(value)
        if not rest:
            raise self.fail(line, f"{keyword}: expected a command")
        return ("/bin/sh", "-c", rest)

    def words(self, line: int, rest: str, keyword: str) -> list[str]:
        try:
            return shlex.split(rest, comments=False, posix=True)
        except ValueError as e:
            raise self.fail(line, f"{keyword}: {e}") from None

    def pairs(self, line: int, rest: str, keyword: str) -> tuple[str, ...]:
        words = self.words(line, rest, keyword)
        if keyword == "ENV" and len(words) >= 2 and "=" not in words[0]:
            words = [f"{words[0]}={rest.split(None, 1)[1].strip()}"]  # legacy "ENV NAME value"
        if not words:
            raise self.fail(line, f"{keyword}: expected NAME=value")
        for word in words:
            name, eq, _ = word.partition("=")
            if not eq or not name or "\0" in word:
                raise self.fail(line, f"{keyword}: expected NAME=value, got {word!r}")
            if (keyword == "ENV" and not (name[0].isalpha() or name[0] == "_")) or not all(
                c.isalnum() or c in "_.-" for c in name
            ):
                raise self.fail(line, f"{keyword}: bad name {name!r}")
        return tuple(words)

    def options(
        self, line: int, words: list[str], keyword: str, allowed: set[str]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        options = []
        while words and words[0].startswith("--"):
            name, eq, value = words.pop(0)[2:].partition("=")
            if name not in allowed or not eq:
                raise self.fail(line, f"{keyword}: unknown option --{name}")
            options.append((name, value))
        return words, options

    def instruction(self, line: int, text: str) -> Instruction:
        keyword, _, rest = text.replace("\t", " ").partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword not in KEYWORDS:
            raise self.fail(line, f"unknown instruction {keyword[:40]!r}")
        options: list[tuple[str, str]] = []
        if keyword in ("RUN", "CMD", "ENTRYPOINT"):
            args = self.command(line, rest, keyword)
        elif keyword in ("ENV", "LABEL"):
            args = self.pairs(line, rest, keyword)
        elif keyword == "COPY":
            words = self.words(line, rest, keyword)
            words, options = self.options(line, words, keyword, {"chmod"})
            if len(words) == 1 and words[0].startswith("["):
                words = list(self.command(line, words[0], keyword))
            for name, value in options:
                if name == "chmod" and not (
                    value and all(c in "01234567" for c in value) and len(value) <= 4
                ):
                    raise self.fail(line, "COPY: --chmod expects an octal mode")
            if len(words) < 2:
                raise self.fail(line, "COPY: expected at least one source and a destination")
            args = tuple(words)
        elif keyword == "BUNDLE":
            words = self.words(line, rest, keyword)
            words, options = self.options(line, words, keyword, {"exclude"})
            if not words or not all(w.startswith("/") for w in words):
                raise self.fail(line, "BUNDLE: expected absolute host paths")
            args = tuple(os.path.normpath(w) for w in words)
        else:
            words = self.words(line, rest, keyword)
            if len(words) != 1:
                raise self.fail(line, f"{keyword}: expected exactly one argument")
            args = (words[0],)
            if keyword == "FROM" and words[0] != "scratch":
                try:
                    parse_reference(words[0])
                except ImageError as e:
                    raise self.fail(line, f"FROM: {e.message}") from None
            elif keyword == "USER":
                try:
                    parse_user(words[0])
                except ImageError as e:
                    raise self.fail(line, f"USER: {e.message}") from None
            elif keyword == "WORKDIR" and "\0" in words[0]:
                raise self.fail(line, "WORKDIR: NUL in path")
        return Instruction(line, keyword, args, tuple(options), text)


def parse_buildfile(text: str | bytes, source: str) -> list[Instruction]:
    """Parse a build file; raises :class:`BuildFileError` naming ``source`` and the line."""
    parser = _Parser(source)
    if isinstance(text, bytes):
        if len(text) > MAX_FILE:
            raise BuildFileError(source, None, f"larger than {MAX_FILE} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise BuildFileError(source, None, "not UTF-8 text") from None
    if "\0" in text:
        raise BuildFileError(source, None, "contains a NUL byte")
    lines = parser.logical_lines(text)
    if len(lines) > MAX_INSTRUCTIONS:
        raise BuildFileError(source, None, f"more than {MAX_INSTRUCTIONS} instructions")
    instructions = [parser.instruction(n, t) for n, t in lines]
    if not instructions or instructions[0].keyword != "FROM":
        raise parser.fail(
            instructions[0].line if instructions else 1, "the first instruction must be FROM"
        )
    for ins in instructions[1:]:
        if ins.keyword == "FROM":
            raise parser.fail(ins.line, "only one FROM (multi-stage builds are not supported)")
    return instructions
