"""isolate 2.x's command line (``sandbox isolate ...``), parsed as its getopt_long does.

Options may come in any order before ``--`` (GNU getopt permutes), long ones as ``--name=V``
or ``--name V``, short ones as ``-tV``, ``-t V`` or clustered (``-sv``); ``-p`` takes its
optional value only attached (``-p4``, ``--processes=4``). A bad command line raises
:class:`UsageError`, printed as isolate prints it (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class UsageError(Exception):
    """A command line isolate would refuse; the message is isolate's wording."""


#: Long option -> (short letter or "", takes a value: "yes", "no" or "optional").
_LONG = {
    "as-uid": ("", "yes"),
    "as-gid": ("", "yes"),
    "box-id": ("b", "yes"),
    "chdir": ("c", "yes"),
    "cg": ("", "no"),
    "cg-mem": ("", "yes"),
    "cleanup": ("", "no"),
    "dir": ("d", "yes"),
    "no-default-dirs": ("D", "no"),
    "fsize": ("f", "yes"),
    "env": ("E", "yes"),
    "extra-time": ("x", "yes"),
    "full-env": ("e", "no"),
    "init": ("", "no"),
    "mem": ("m", "yes"),
    "meta": ("M", "yes"),
    "processes": ("p", "optional"),
    "quota": ("q", "yes"),
    "run": ("", "no"),
    "share-net": ("", "no"),
    "silent": ("s", "no"),
    "stack": ("k", "yes"),
    "open-files": ("n", "yes"),
    "stderr": ("r", "yes"),
    "stderr-to-stdout": ("", "no"),
    "stdin": ("i", "yes"),
    "stdout": ("o", "yes"),
    "time": ("t", "yes"),
    "verbose": ("v", "no"),
    "version": ("", "no"),
    "wait": ("", "no"),
    "wall-time": ("w", "yes"),
    "print-box-dir": ("", "no"),
}
_SHORT = {short: (name, takes) for name, (short, takes) in _LONG.items() if short}
COMMANDS = ("init", "run", "cleanup", "version", "print-box-dir")


@dataclass
class Options:
    """The parsed command line: option name -> values (in order), the command, its argv."""

    command: str = ""
    values: dict[str, list[str | None]] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    def last(self, name: str) -> str | None:
        """The value given last for ``name`` (None if absent or given without one)."""
        given = self.values.get(name)
        return given[-1] if given else None

    def given(self, name: str) -> bool:
        return name in self.values

    def all(self, name: str) -> list[str]:
        return [v for v in self.values.get(name, []) if v is not None]

    def count(self, name: str) -> int:
        return len(self.values.get(name, []))


def _number(text: str) -> int:
    """isolate's opt_uint: a whole number that fits a signed int."""
    if not text.isdigit():
        raise UsageError(f"Invalid numeric parameter: {text}")
    if int(text) > 2**31 - 1:
        raise UsageError(f"Numeric parameter out of range: {text}")
    return int(text)


def number(options: Options, name: str) -> int | None:
    """``name``'s value as a whole number, or None when it is not given."""
    value = options.last(name)
    return None if value is None else _number(value)


def seconds(options: Options, name: str) -> float | None:
    """``name``'s value in seconds (isolate's atof: fractions allowed), or None."""
    value = options.last(name)
    if value is None:
        return None
    try:
        result = float(value)
    except ValueError:
        raise UsageError(f"Invalid time specified: {value}") from None
    if not 0 <= result < 365 * 86400:
        raise UsageError(f"Invalid time specified: {value}")
    return result


def parse(argv: list[str]) -> Options:
    """Parse isolate's command line; raises :class:`UsageError`."""
    options = Options()
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional += argv[i:]
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in _LONG:
                raise UsageError(f"isolate: unrecognized option '--{name}'")
            takes = _LONG[name][1]
            if takes == "no" and eq:
                raise UsageError(f"isolate: option '--{name}' doesn't allow an argument")
            if takes == "yes" and not eq:
                if i >= len(argv):
                    raise UsageError(f"isolate: option '--{name}' requires an argument")
                value, i = argv[i], i + 1
            _add(options, name, value if eq or takes == "yes" else None)
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                if letter not in _SHORT:
                    raise UsageError(f"isolate: invalid option -- '{letter}'")
                name, takes = _SHORT[letter]
                rest = arg[j + 1 :]
                if takes == "no":
                    _add(options, name, None)
                    j += 1
                    continue
                if takes == "yes" and not rest:
                    if i >= len(argv):
                        raise UsageError(f"isolate: option requires an argument -- '{letter}'")
                    rest, i = argv[i], i + 1
                _add(options, name, rest or None)
                break
        else:
            positional.append(arg)
    if not options.command:
        raise UsageError("Please specify an isolate command (e.g. --init, --run).")
    if options.given("cg-mem") and not options.given("cg"):
        raise UsageError("Options related to control groups require --cg to be set.")
    if options.command == "run" and not positional:
        raise UsageError("--run mode requires a command to run")
    if options.command != "run" and positional:
        raise UsageError(f"--{options.command} mode takes no parameters")
    options.argv = positional
    return options


def _add(options: Options, name: str, value: str | None) -> None:
    if name in COMMANDS:
        if options.command and options.command != name:
            raise UsageError("Only one command is allowed.")
        options.command = name
        return
    options.values.setdefault(name, []).append(value)
