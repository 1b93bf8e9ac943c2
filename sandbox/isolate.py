"""``sandbox isolate ...`` (and the optional ``isolate`` script): isolate 2.x's command line,
behaving as isolate does for a judge, on this sandbox's boxes. docs/isolate.md maps each
option and lists what stays stricter than isolate.

A box id ``N`` has a directory ``$SANDBOX_HOME/isolate/N`` whose ``box/`` the caller fills
between ``--init`` and ``--run``; the program sees it as ``/box`` (writable, its cwd). Each
run goes through :func:`sandbox.request.resolve` and :func:`sandbox.supervisor.run_box`.
Between runs the program's files are the caller's (``--as-uid``), for a run the box's host
uid's; both hand-overs, the redirections and ``--cleanup`` go through :mod:`sandbox.boxdir`,
so nothing a program left there (symlinks, links, FIFOs) is ever followed. A box id is held
by an ``flock`` on ``$SANDBOX_HOME/isolate/N.lock`` (outside the box) for each command.

Exit codes are isolate's: 0 when the program ended OK, 1 when it failed (the message on
stderr: ``Time limit exceeded``, ``Exited with error status N``, ...), 2 on an internal error
or a bad command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import stat
import sys
from collections.abc import Callable, Sequence

from .boxdir import TreeError, hand_over, open_beneath, remove_tree
from .errors import SandboxError
from .isolate_args import Options, UsageError, number, parse, seconds
from .report import Report, Verdict

#: Box ids run from 0 to BOX_IDS - 1 (isolate's default num_boxes).
BOX_IDS = 1000
EXIT_FAILED, EXIT_INTERNAL = 1, 2
#: Tasks ``-p`` without a number (isolate: unlimited) allows: a compiler's, with room.
PROCESSES_UNBOUNDED = 64
_SYSTEM_DIRS = ("/", "/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_OWN_DIRS = ("/dev", "/proc", "/tmp")  # the box's own; the host's are never bound there
_DIR_OPTIONS = {"rw", "noexec", "maybe", "fs", "tmp", "dev", "norec"}


class Fatal(Exception):
    """An internal error: isolate's ``die`` (status XX, exit 2)."""


class _Command:
    """One invocation: its options, what it prints, and the meta file once it is open."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.verbose = options.count("verbose")
        self.silent = options.given("silent")
        self.meta: object | None = None  # an OutputFile, once --run opened it

    def say(self, text: str) -> None:
        """isolate's ``msg``: only with ``-v``."""
        if self.verbose:
            print(text, file=sys.stderr)

    def box_id(self) -> int:
        box = number(self.options, "box-id") or 0
        if box >= BOX_IDS:
            raise Fatal(f"Sandbox ID out of range (allowed: 0-{BOX_IDS - 1})")
        return box

    def owner(self) -> tuple[int, int]:
        """Who owns ``box/`` between runs: ``--as-uid``/``--as-gid``, else the caller."""
        uid, gid = number(self.options, "as-uid"), number(self.options, "as-gid")
        if uid is None and gid is None:
            return os.getuid(), os.getgid()
        if os.getuid() != 0:
            raise Fatal("You must be root to use --as-uid or --as-gid")
        if uid is None or gid is None:
            raise Fatal("--as-uid and --as-gid must be used either both or none")
        return uid, gid


def _home() -> int:
    """A descriptor of ``$SANDBOX_HOME/isolate`` (made, owned by us, closed to writers)."""
    from .state import ensure_dir, state_dir

    path = ensure_dir(state_dir() / "isolate")
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _lock(home: int, box: int, wait: bool) -> int:
    """Hold box ``box`` (an flock outside its directory) until the descriptor is closed."""
    fd = os.open(
        f"{box}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=home
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise Fatal("This box is currently in use by another process") from None
    return fd


def _box_dir(box: int) -> str:
    from .state import state_dir

    return str(state_dir() / "isolate" / str(box))


def _open_box(home: int, box: int) -> int | None:
    """The box's ``box/`` directory, or None when the box was not initialized."""
    try:
        outer = os.open(str(box), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home)
    except FileNotFoundError:
        return None
    try:
        return os.open("box", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=outer)
    except FileNotFoundError:
        return None
    finally:
        os.close(outer)


def _init(cmd: _Command) -> int:
    box, (uid, gid) = cmd.box_id(), cmd.owner()
    home = _home()
    try:
        lock = _lock(home, box, cmd.options.given("wait"))
        try:
            remove_tree(home, str(box))
            cmd.say("Preparing sandbox")
            os.mkdir(str(box), 0o755, dir_fd=home)
            outer = os.open(str(box), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home)
            try:
                os.mkdir("box", 0o700, dir_fd=outer)
                os.chown("box", uid, gid, dir_fd=outer, follow_symlinks=False)
            finally:
                os.close(outer)
        finally:
            os.close(lock)
    finally:
        os.close(home)
    print(_box_dir(box))
    return 0


def _cleanup(cmd: _Command) -> int:
    box = cmd.box_id()
    home = _home()
    try:
        lock = _lock(home, box, cmd.options.given("wait"))
        try:
            if _open_box_exists(home, box):
                cmd.say("Deleting sandbox")
                remove_tree(home, str(box))
            else:
                cmd.say("Nothing to do -- box did not exist")
        finally:
            os.close(lock)
    finally:
        os.close(home)
    return 0


def _open_box_exists(home: int, box: int) -> bool:
    with contextlib.suppress(FileNotFoundError):
        os.stat(str(box), dir_fd=home, follow_symlinks=False)
        return True
    return False


# -- directory rules ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DirRule:
    """One ``-d IN=OUT:opts``: a host directory bound at ``inside``."""

    inside: str
    outside: str
    writable: bool


def parse_dir_rules(texts: Sequence[str], say: Callable[[str], None]) -> list[DirRule]:
    """The ``-d`` rules that become binds; a rule for one of the box's own directories is
    kept as the box has it (said with ``-v``); what would weaken the box is refused."""
    rules: list[DirRule] = []
    for text in texts:
        spec, _, opts = text.partition(":")
        inside, eq, outside = spec.partition("=")
        inside = "/" + os.path.normpath("/" + inside).lstrip("/")
        options = {o for o in opts.split(",") if o}
        unknown = options - _DIR_OPTIONS
        if unknown or not spec:
            raise UsageError(f"Invalid directory rule '{text}': Unknown option")
        if eq and not outside:  # "IN=": isolate removes a (default) rule
            say(f"-d {text}: the box's own {inside} stays")
            continue
        if inside == "/box" or inside.startswith("/box/"):
            raise Fatal(f"-d {text}: /box is the box directory's box/; put files there")
        system = inside in _SYSTEM_DIRS or any(inside.startswith(d + "/") for d in _SYSTEM_DIRS)
        own = inside in _OWN_DIRS and not outside
        if system or own or inside in ("/dev", "/proc") or inside.startswith(("/dev/", "/proc/")):
            if options & {"rw", "dev", "fs"} or (outside and inside not in ("/tmp",)):
                raise Fatal(
                    f"-d {text}: {inside} is the box's own (read-only system directories, a "
                    "minimal /dev, its own /proc and /tmp); a host one is never bound there"
                )
            say(f"-d {text}: kept as the box has it: {inside}")
            continue
        if "dev" in options:
            raise Fatal(f"-d {text}: device nodes are never usable in a box")
        if "fs" in options or "tmp" in options:
            raise Fatal(f"-d {text}: only the box's own /tmp is a fresh filesystem")
        if "norec" in options:
            raise Fatal(f"-d {text}: binds are always recursive here (norec is not supported)")
        if "noexec" in options:
            raise Fatal(f"-d {text}: noexec binds are not supported")
        source = os.path.abspath(outside or inside)
        if "maybe" in options and not os.path.lexists(source):
            say(f"-d {text}: {source} does not exist, skipped")
            continue
        rules.append(DirRule(inside, source, "rw" in options))
    return rules


# -- redirections --------------------------------------------------------------------------


class _Target:
    """Where a redirected path lands: a directory descriptor and a path under it, or the
    host's ``/dev/null``."""

    def __init__(self, dir_fd: int | None, relative: str) -> None:
        self.dir_fd, self.relative = dir_fd, relative


def _locate(path: str, cwd: str, mounts: dict[str, int], option: str) -> _Target:
    inside = os.path.normpath(path if os.path.isabs(path) else os.path.join(cwd, path))
    if inside == "/dev/null":
        return _Target(None, "/dev/null")
    for target in sorted(mounts, key=len, reverse=True):
        if inside == target or inside.startswith(target + "/"):
            relative = inside[len(target) :].lstrip("/") or "."
            return _Target(mounts[target], relative)
    raise Fatal(f"{option} {path}: only files under /box or a -d directory can be redirected")


def _open_input(target: _Target, path: str) -> int:
    if target.dir_fd is None:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = open_beneath(target.dir_fd, target.relative, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise Fatal(f'open("{path}"): {_why(e)}') from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "has several hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise Fatal(f'open("{path}"): {what} (refused: a program could have planted it)')
    os.set_blocking(fd, True)
    return fd


def _why(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.EXDEV):
        return "a symlink or a path out of the directory (refused)"
    return e.strerror or str(e)


class _Output:
    """A redirected output: an unnamed file (``O_TMPFILE``) in the target's directory, linked
    over the target once the box is gone, so a symlink or link planted there is replaced,
    never written through."""

    def __init__(self, target: _Target, path: str) -> None:
        self.path, self.name = path, os.path.basename(target.relative)
        self.dir_fd: int | None = None
        if target.dir_fd is None:
            self.fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            return
        parent = os.path.dirname(target.relative) or "."
        try:
            self.dir_fd = open_beneath(target.dir_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
            if self.name in ("", ".", ".."):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(
                    os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_mode
                ):
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
            self.fd = os.open(
                ".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=self.dir_fd
            )
        except OSError as e:
            if self.dir_fd is not None:
                os.close(self.dir_fd)
            raise Fatal(f'open("{path}"): {_why(e)}') from None

    def commit(self) -> None:
        """Put the file in place (the box is gone: nothing races the rename)."""
        try:
            if self.dir_fd is not None:
                temporary = f".{self.name[:200]}.{os.urandom(8).hex()}.tmp"
                os.link(f"/proc/self/fd/{self.fd}", temporary, dst_dir_fd=self.dir_fd)
                try:
                    os.rename(temporary, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                except OSError:
                    os.unlink(temporary, dir_fd=self.dir_fd)
                    raise
        except OSError as e:
            raise Fatal(f"Cannot write {self.path}: {e.strerror}") from None
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


# -- run ---------------------------------------------------------------------------------


def _limits(options: Options) -> dict[str, object]:
    """isolate's limits in this sandbox's terms (docs/isolate.md, "Limits")."""
    limits: dict[str, object] = {}
    cpu, wall = seconds(options, "time"), seconds(options, "wall-time")
    extra = seconds(options, "extra-time")
    if cpu:
        limits["cpu_time"] = cpu
    if wall:
        limits["wall_time"] = wall
    elif cpu:  # never unbounded: twice the CPU time and grace, at least the profile's 10 s
        limits["wall_time"] = max(10.0, 2 * (cpu + (extra or 0)))
    if extra:
        limits["extra_time"] = extra
    for name, key in (
        ("mem", "address_space"),
        ("cg-mem", "memory"),
        ("fsize", "fsize"),
        ("stack", "stack"),
        ("open-files", "open_files"),
    ):
        kib = number(options, name)
        if kib:  # 0 is isolate's "unlimited": the profile's limit stays
            limits[key] = kib if key == "open_files" else kib * 1024
    if options.given("processes"):
        limits["pids"] = number(options, "processes") or PROCESSES_UNBOUNDED
    else:
        limits["pids"] = 1
    return limits


def _environment(options: Options) -> tuple[dict[str, str], set[str]]:
    """(variables to set, variables to remove) from ``-e`` and ``-E``, in order."""
    env: dict[str, str] = {}
    removed: set[str] = set()
    if options.given("full-env"):
        env.update(os.environ)
    for item in options.all("env"):
        name, eq, value = item.partition("=")
        if not name:
            raise UsageError(f"Invalid environment specified: {item}")
        if eq and not value:
            env.pop(name, None)
            removed.add(name)
        elif eq:
            env[name] = value
            removed.discard(name)
        elif name in os.environ:
            env[name] = os.environ[name]
            removed.discard(name)
    return env, removed


def _meta_text(report: Report) -> tuple[str, str | None]:
    """The meta file (sandbox/meta.py's) and its message."""
    from .meta import render_meta

    text = render_meta(report)
    message = next((line[8:] for line in text.splitlines() if line.startswith("message:")), None)
    return text, message


def _run(cmd: _Command) -> int:
    from .request import Request, resolve
    from .spec import Bind
    from .streams import FdSink
    from .supervisor import run_box

    options = cmd.options
    box, (uid, gid) = cmd.box_id(), cmd.owner()
    if options.given("quota"):
        raise Fatal(
            "Disk quotas (-q) cannot be enforced here: box/ is a host directory; "
            "put it on a filesystem of the size you need"
        )
    rules = parse_dir_rules(options.all("dir"), cmd.say)
    env, removed = _environment(options)
    chdir = options.last("chdir") or "/box"
    chdir = "/" + os.path.normpath("/" + chdir).lstrip("/")
    meta_path = options.last("meta")
    if meta_path is not None:  # first, as isolate opens it: every later error is written
        from .hostpath import OutputFile

        cmd.meta = OutputFile("/dev/stdout" if meta_path == "-" else meta_path, "-M")
    home = _home()
    opened: list[int] = [home]
    outputs: list[_Output] = []
    try:
        lock = _lock(home, box, options.given("wait"))
        opened.append(lock)
        box_fd = _open_box(home, box)
        if box_fd is None:
            raise Fatal("Box not found, did you run `isolate --init'?")
        opened.append(box_fd)
        request = Request(
            argv=options.argv,
            profile="standard" if options.given("share-net") else "strict",
            binds=[Bind(f"{_box_dir(box)}/box", "/box", True)]
            + [Bind(r.outside, r.inside, r.writable) for r in rules],
            limits=_limits(options),
            env={k: v for k, v in env.items() if k.isidentifier() and "\0" not in v},
        )
        spec = resolve(request)
        profile_env = tuple((k, v) for k, v in spec.profile.env if k not in removed)
        spec = dataclasses.replace(
            spec, profile=dataclasses.replace(spec.profile, env=profile_env), cwd=chdir
        )
        mounts = {"/box": box_fd}
        for rule in rules:
            from .hostpath import PathRefused, open_nofollow

            with contextlib.suppress(PathRefused):
                fd = open_nofollow(rule.outside, os.O_RDONLY | os.O_DIRECTORY)
                opened.append(fd)
                mounts[rule.inside] = fd
        stdin = 0
        if options.last("stdin") is not None:
            path = options.last("stdin") or ""
            stdin = _open_input(_locate(path, chdir, mounts, "-i"), path)
            opened.append(stdin)
        sinks: dict[str, int] = {"stdout": 1, "stderr": 2}
        for name, option in (("stdout", "-o"), ("stderr", "-r")):
            target = options.last(name)
            if target is not None:
                output = _Output(_locate(target, chdir, mounts, option), target)
                outputs.append(output)
                sinks[name] = output.fd
        if options.given("stderr-to-stdout"):
            sinks["stderr"] = sinks["stdout"]
        # The box's init (its host uid) attaches box/ before it owns it: let it through.
        mode = stat.S_IMODE(os.fstat(box_fd).st_mode)
        os.fchmod(box_fd, mode | 0o111)
        cmd.say("Running the program")
        report = run_box(
            spec,
            stdin,
            FdSink(sinks["stdout"]),
            FdSink(sinks["stderr"]),
            before_start=lambda box_uid, box_gid: hand_over(box_fd, box_uid, box_gid),
        )
        for output in outputs:
            output.commit()
        hand_over(box_fd, uid, gid)
        os.fchmod(box_fd, mode)
    except TreeError as e:
        raise Fatal(str(e)) from None
    except OSError as e:
        raise Fatal(f"{e.filename or 'box'}: {e.strerror}") from None
    finally:
        for output in outputs:
            output.close()
        for fd in reversed(opened):
            os.close(fd)
    return _finish(cmd, report)


def _finish(cmd: _Command, report: Report) -> int:
    """Write the meta file, say how the program ended as isolate does; the exit code."""
    text, message = _meta_text(report)
    _write_meta(cmd, text)
    if report.verdict is Verdict.OK:
        if not cmd.silent:
            cpu, wall = int(report.cpu_time * 1000), int(report.wall_time * 1000)
            print(
                f"OK ({cpu // 1000}.{cpu % 1000:03d} sec real, "
                f"{wall // 1000}.{wall % 1000:03d} sec wall)",
                file=sys.stderr,
            )
        return 0
    internal = report.verdict is Verdict.SANDBOX_ERROR
    if message and (internal or not cmd.silent):
        print(message, file=sys.stderr)
    if report.verdict is Verdict.RUNTIME_ERROR and report.error and not cmd.silent:
        # A command that cannot be executed: isolate's exec message, then its status 127.
        print(f"Exited with error status {report.exit_code}", file=sys.stderr)
    return EXIT_INTERNAL if internal else EXIT_FAILED


def _write_meta(cmd: _Command, text: str) -> None:
    from .hostpath import OutputFile

    meta = cmd.meta
    if isinstance(meta, OutputFile):
        cmd.meta = None
        try:
            meta.write(text.encode())
            meta.commit()
        except OSError as e:
            meta.discard()
            print(f"Cannot write meta file: {e.strerror}", file=sys.stderr)


def _version() -> int:
    from . import __version__

    print(f"The process isolator 2.x, as sandbox {__version__} (see docs/isolate.md)")
    print(f"Box root: {_box_dir(0).rsplit('/', 1)[0]}")
    return 0


_COMMANDS: dict[str, Callable[[_Command], int]] = {
    "init": _init,
    "run": _run,
    "cleanup": _cleanup,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run isolate's command line ``argv`` (without the program name); the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse(args)
    except UsageError as e:
        print(f"{e}\nTry 'isolate --help' for more information.", file=sys.stderr)
        return EXIT_INTERNAL
    cmd = _Command(options)
    try:
        if options.command == "version":
            return _version()
        if options.command == "print-box-dir":
            print(_box_dir(cmd.box_id()))
            return 0
        return _COMMANDS[options.command](cmd)
    except UsageError as e:
        print(f"{e}\nTry 'isolate --help' for more information.", file=sys.stderr)
        return EXIT_INTERNAL
    except (Fatal, SandboxError, TreeError) as e:
        return _die(cmd, e.message if isinstance(e, SandboxError) else str(e))
    except OSError as e:
        return _die(cmd, f"{e.filename or 'isolate'}: {e.strerror}")


def _die(cmd: _Command, message: str) -> int:
    """isolate's ``die``: the meta file says XX, stderr says why; exit 2."""
    _write_meta(cmd, "status:XX\nmessage:" + " ".join(message.split()) + "\n")
    print(message, file=sys.stderr)
    return EXIT_INTERNAL


def console_main() -> None:
    """The ``isolate`` console script."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
