"""``sandbox``: the command line. Single-threaded, so it forks boxes directly (no helper).

Why only a single-threaded process may fork: docs/architecture.md, "Processes and threads".

Exit codes (Docker's conventions): the program's own exit code; 128+N when it was killed by
signal N (limits included); 125 for a sandbox or configuration error (usage errors too); 126 when
the command cannot be executed; 127 when it is not found. ``profile``/``policy``/``doctor`` exit
0 or 1, or 125 on error. Any command exits 141 (SIGPIPE's) without a word when its own stdout or
stderr is a pipe whose reader went away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, cast

from .errors import EXIT_SANDBOX_ERROR, SandboxError
from .limits import LIMITS

if TYPE_CHECKING:
    from .report import Report
    from .spec import Spec
    from .workspace import Workspace

EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a configuration error like any other (exit 125, one line
    and a hint) instead of argparse's exit 2 with the whole usage."""

    deepest: ClassVar[str] = "sandbox"  # the last (sub)command parsed, named in the hint

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        _Parser.deepest = self.prog
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        from .errors import ConfigError

        raise ConfigError("command line", None, message, hint=f"see '{_Parser.deepest} --help'")


class _Subcommands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose arguments are added only when one is chosen (or all, for a complete
    parser): ``sandbox exec`` builds one parser's arguments, not those of every command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.builders: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def add_lazy(
        self, name: str, build: Callable[[argparse.ArgumentParser], None], **kwargs: Any
    ) -> None:
        """Add subcommand ``name``; ``build`` adds its arguments when it is first needed."""
        self.add_parser(name, **kwargs)
        self.builders[name] = build

    def complete(self, name: str) -> argparse.ArgumentParser:
        """The parser of ``name``, with its arguments and the log options."""
        child: argparse.ArgumentParser = self.choices[name]
        build = self.builders.pop(name, None)
        if build is not None:
            build(child)
            _add_log_options(child, False)
        return child

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values and values[0] in self.choices:
            self.complete(values[0])
        super().__call__(parser, namespace, values, option_string)


def _add_log_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--log-format/--log-level on ``parser`` and, so they also work after a subcommand, on
    every subcommand (without a default there: the top level's value stays unless given).
    A lazy subcommand gets them when its arguments are added (:class:`_Subcommands`)."""
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console" if top else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning" if top else argparse.SUPPRESS,
        help="'info' shows one box_finished event per run",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and not isinstance(action, _Subcommands):
            for child in dict.fromkeys(action.choices.values()):
                _add_log_options(child, False)


def _parser(*, complete: bool = False) -> argparse.ArgumentParser:
    """The command line's parser; ``complete`` adds every subcommand's arguments up front."""
    from . import __version__

    p = _Parser(prog="sandbox", description="Run untrusted programs safely.")
    p.add_argument("--version", action="version", version=f"sandbox {__version__}")
    sub = cast(_Subcommands, p.add_subparsers(dest="command", required=True, action=_Subcommands))
    sub.add_lazy(
        "exec",
        _exec_arguments,
        help="run a command in a box",
        usage="sandbox exec [options] -- CMD [ARG...]",
    )
    sub.add_lazy("profile", _profile_arguments, help="show, check or list profiles")
    sub.add_lazy("policy", _policy_arguments, help="explain or check a policy")
    sub.add_lazy("group", _group_arguments, help="run a group of boxes (pipes, linked network)")
    sub.add_lazy("image", _image_arguments, help="build, list, move and remove images")
    sub.add_lazy("workspace", _workspace_arguments, help="named work dirs kept across runs")
    sub.add_lazy("doctor", lambda _: None, help="which guarantees hold on this host")
    sub.add_parser("isolate", help="isolate 2.x's command line, for judges (docs/isolate.md)")
    _add_log_options(p, True)
    if complete:
        for name in list(sub.builders):
            sub.complete(name)
    return p


def _exec_arguments(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("--profile", help="profile name or path (default: strict)")
    ex.add_argument("--image", metavar="REF", help="run on this image of the store")
    ex.add_argument(
        "--workspace", metavar="NAME", help="run in this named workspace (sandbox workspace)"
    )
    ex.add_argument(
        "--policy", help="policy file or name (default) that selects the profile, sets ceilings"
    )
    for attribute in ("purpose", "language", "tenant"):
        ex.add_argument(f"--{attribute}", help="request attribute for the policy's rules")
    ex.add_argument(
        "--bind", action="append", default=[], metavar="SRC:DST", help="bind a host path read-write"
    )
    ex.add_argument(
        "--ro-bind",
        action="append",
        default=[],
        metavar="SRC:DST",
        help="bind a host path read-only",
    )
    ex.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    for name, entry in LIMITS.items():
        ex.add_argument(entry.flag, dest=name, metavar="N", help=entry.help)
    ex.add_argument(
        "--repeat",
        metavar="N",
        help="run N times in fresh boxes; report median figures and the first failure",
    )
    ex.add_argument("--report", metavar="FILE", help="write the JSON report here")
    ex.add_argument("--meta", metavar="FILE", help="write an isolate-style key:value meta file")
    ex.add_argument("--stdin", metavar="FILE", help="read the program's stdin from FILE")
    ex.add_argument("--stdout", metavar="FILE", help="write the program's stdout to FILE")
    ex.add_argument("--stderr", metavar="FILE", help="write the program's stderr to FILE")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")


def _profile_arguments(prof: argparse.ArgumentParser) -> None:
    psub = prof.add_subparsers(dest="action", required=True)
    psub.add_parser("show", help="print the resolved profile").add_argument("name")
    psub.add_parser("check", help="validate a profile file").add_argument("file")
    psub.add_parser("list", help="list the profiles on the search path")


def _policy_arguments(pol: argparse.ArgumentParser) -> None:
    polsub = pol.add_subparsers(dest="action", required=True)
    explain = polsub.add_parser("explain", help="which rule matches and the effective limits")
    explain.add_argument("file")
    for attribute in ("purpose", "language", "tenant"):
        explain.add_argument(f"--{attribute}")
    polsub.add_parser("check", help="validate a policy file").add_argument("file")


def _group_arguments(grp: argparse.ArgumentParser) -> None:
    gsub = grp.add_subparsers(dest="action", required=True)
    grun = gsub.add_parser("run", help="run every box of a group file")
    grun.add_argument("file")
    grun.add_argument("--report", metavar="FILE", help="write the group's JSON report here")
    gsub.add_parser("check", help="validate a group file").add_argument("file")


def _image_arguments(img: argparse.ArgumentParser) -> None:
    from .cli_image import add_image_arguments

    add_image_arguments(img)


def _workspace_arguments(ws: argparse.ArgumentParser) -> None:
    from .cli_workspace import add_workspace_arguments

    add_workspace_arguments(ws)


def _attributes(args: argparse.Namespace) -> dict[str, str]:
    return {a: getattr(args, a) for a in ("purpose", "language", "tenant") if getattr(args, a)}


class _RunFiles:
    """The files of one ``exec``: ``--stdin`` opened and every output file created (checked,
    never through a symlink) before the program runs, so a bad path costs no run; outputs are
    renamed into place at the end (see :mod:`sandbox.hostpath`)."""

    def __init__(self, args: argparse.Namespace, names: tuple[str, ...]) -> None:
        from .hostpath import OutputFile, open_input

        self.outputs: dict[str, OutputFile] = {}
        self.stdin = 0
        try:
            if getattr(args, "stdin", None) is not None:
                self.stdin = open_input(args.stdin, "--stdin")
            for name in names:
                path = getattr(args, name, None)
                if path is not None:
                    self.outputs[name] = OutputFile(path, f"--{name}")
        except BaseException:
            self.close()
            raise

    def fd(self, name: str, default: int) -> int:
        output = self.outputs.get(name)
        return output.fd if output is not None else default

    def finish(self, texts: dict[str, str]) -> bool:
        """Write ``texts`` to their files and rename every output into place; a file that
        cannot be written is reported on stderr, with a report's text so it is not lost.
        Returns False if any failed."""
        ok = True
        for name, output in self.outputs.items():
            try:
                if name in texts:
                    output.write(texts[name].encode())
                output.commit()
            except OSError as e:
                ok = False
                print(f"sandbox: error: cannot write {output.path}: {e.strerror}", file=sys.stderr)
                if name in texts:
                    print(f"sandbox: the {name} follows\n{texts[name]}", file=sys.stderr, end="")
        self.outputs = {}
        return ok

    def close(self) -> None:
        """Remove what was not finished (the run failed before it had a result)."""
        for output in self.outputs.values():
            output.discard()
        self.outputs = {}
        if self.stdin != 0:
            os.close(self.stdin)
            self.stdin = 0


def _exec(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd and args.image is None:
        raise ConfigError(
            "command line",
            None,
            "no command given",
            hint="usage: sandbox exec [options] -- CMD [ARG...]",
        )
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("command line", "--env", f"expected NAME=VALUE, got {item!r}")
        env[name] = value
    workspace = None
    if args.workspace is not None:
        from .workspace import Workspace

        workspace = Workspace.open(args.workspace)
    try:
        return _exec_in(args, cmd, env, workspace)
    finally:
        if workspace is not None:
            workspace.close()


def _exec_in(
    args: argparse.Namespace, cmd: list[str], env: dict[str, str], workspace: Workspace | None
) -> int:
    from .repeat import check_repeat
    from .request import Request, parse_bind, resolve

    request = Request(
        argv=cmd,
        profile=args.profile,
        policy=args.policy,
        attributes=_attributes(args),
        binds=[parse_bind(b, True) for b in args.bind]
        + [parse_bind(b, False) for b in args.ro_bind],
        limits={n: getattr(args, n) for n in LIMITS if getattr(args, n) is not None},
        env=env,
        image=args.image,
        workspace=None if workspace is None else workspace.root,
    )
    count = 1 if args.repeat is None else check_repeat(args.repeat, "--repeat")
    spec = resolve(request)
    for note in spec.clamped:
        print(f"sandbox: clamped by policy: {note}", file=sys.stderr)
    files = _RunFiles(args, ("stdout", "stderr", "report", "meta"))
    try:
        with contextlib.nullcontext() if workspace is None else workspace.held():
            report = _runs(spec, files, count)
        if args.log_level in ("debug", "info"):  # below that the event would be filtered
            from . import logs  # here: logging and structlog cost a run that logs nothing

            logs.log_run(report)
        texts = {}  # rendered only for the files asked for
        if "report" in files.outputs:
            texts["report"] = report.to_json()
        if "meta" in files.outputs:
            from .meta import render_meta

            texts["meta"] = render_meta(report)
        written = files.finish(texts)
    finally:
        files.close()
    if report.error:
        print(f"sandbox: {report.error}", file=sys.stderr)
    return report.cli_exit_code() if written else EXIT_SANDBOX_ERROR


def _runs(spec: Spec, files: _RunFiles, count: int) -> Report:
    """Run ``spec`` ``count`` times (``--repeat``): each run reads the same input, the first
    one's output passes through, and the report summarizes them."""
    from .repeat import summarize
    from .streams import DiscardSink, FdSink, Sink, read_all, sealed_input
    from .supervisor import run_box

    if count == 1:
        out, err = FdSink(files.fd("stdout", 1)), FdSink(files.fd("stderr", 2))
        return run_box(spec, files.stdin, out, err)
    data, runs = read_all(files.stdin), []
    for i in range(count):
        stdin = sealed_input(data)
        try:
            sinks: tuple[Sink, Sink] = (
                (FdSink(files.fd("stdout", 1)), FdSink(files.fd("stderr", 2)))
                if i == 0
                else (DiscardSink(), DiscardSink())
            )
            runs.append(run_box(spec, stdin, *sinks))
        finally:
            os.close(stdin)
    return summarize(runs)


def _profile(args: argparse.Namespace) -> int:
    from .profiles import list_profiles, load_profile

    if args.action == "list":
        for name in list_profiles():
            print(name)
        return 0
    target = args.name if args.action == "show" else args.file
    if args.action == "check" and "/" not in target:
        target = f"./{target}"
    profile = load_profile(target)
    if args.action == "check":
        print(f"{profile.source}: ok ({profile.content_hash})")
        return 0
    data = asdict(profile)
    data["seccomp"]["rules"] = [
        {**r, "syscalls": list(r["syscalls"])} for r in data["seccomp"]["rules"]
    ]
    print(json.dumps(data, indent=2, default=str))
    return 0


def _policy(args: argparse.Namespace) -> int:
    from .policy import load_policy
    from .profiles import load_profile
    from .request import clamp

    policy = load_policy(args.file)
    if args.action == "check":
        print(f"{policy.source}: ok ({len(policy.rules)} rules)")
        return 0
    attributes = _attributes(args)
    name, why = policy.select(attributes)
    profile = load_profile(name)
    limits, _ = clamp(profile.limits, policy)
    ceilings = dict(policy.ceilings)
    shown = ", ".join(f"{k}={v}" for k, v in attributes.items()) or "no attributes"
    print(f"policy {policy.source}, request: {shown}")
    if why == "default_profile":
        print(f"no rule matches: the policy's default_profile, {name}")
    else:
        print(f"{why} matches: profile {name}")
    print(f"profile file: {profile.source}")
    print("effective limits (the profile's, capped by the policy's ceilings):")
    width = max(len(n) for n in LIMITS)
    for limit, entry in LIMITS.items():
        value, asked = getattr(limits, limit), getattr(profile.limits, limit)
        line = f"  {limit:<{width}}  {entry.format(value)}"
        if value != asked:
            line += f"  (the profile asks {entry.format(asked)}; ceilings.{limit})"
        elif limit in ceilings:
            line += f"  (ceiling {entry.format(ceilings[limit])})"
        print(line)
    networks = ", ".join(n.value for n in policy.networks)
    binds = "none" if not policy.binds else "read-write" if policy.writable_binds else "read-only"
    print(f"networks allowed: {networks}; binds allowed: {binds}")
    return 0


def console_main() -> None:
    """The console script: exit without tearing the interpreter down (15 ms per run saved)."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = _quiet_broken_pipe()
    os._exit(code)


def _group(args: argparse.Namespace) -> int:
    from .group import load_group, run_group

    group = load_group(args.file)
    if args.action == "check":
        print(f"{group.source}: ok ({len(group.boxes)} boxes, network {group.network.value})")
        return 0
    files = _RunFiles(args, ("report",))
    try:
        report = run_group(group)
        written = files.finish({"report": report.to_json()})
    finally:
        files.close()
    for name in report.order:
        box = report.reports[name]
        code = box.exit_code if box.exit_code is not None else box.signal_name
        print(
            f"{name}: {box.verdict.value} (exit {code}, cpu {box.cpu_time:.3f}s, "
            f"wall {box.wall_time:.3f}s)",
            file=sys.stderr,
        )
    if not written:
        return EXIT_SANDBOX_ERROR
    return 0 if report.ok else 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "exec":
        return _exec(args)
    if args.command == "profile":
        return _profile(args)
    if args.command == "policy":
        return _policy(args)
    if args.command == "group":
        return _group(args)
    if args.command == "image":
        from .cli_image import run_image

        return run_image(args)
    if args.command == "workspace":
        from .cli_workspace import run_workspace

        return run_workspace(args)
    from .doctor import run_doctor

    return run_doctor()


def _ensure_standard_fds() -> None:
    """Started with 0, 1 or 2 closed, the next descriptor opened (a pipe, the box's sync
    socket) would take that number and be handed to the program as its stdio: fill them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)  # takes this number


def _broken_standard_stream() -> bool:
    """Whether our stdout or stderr is a pipe nobody reads any more (``sandbox ... | head``):
    poll(2) reports POLLERR for a pipe whose read end is closed."""
    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _quiet_broken_pipe() -> int:
    """The reader of our output went away: stop quietly, as a Unix filter killed by SIGPIPE
    would (its exit status, 141), and let nothing more be written to the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sandbox`` console script; returns the exit code."""
    _ensure_standard_fds()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["isolate"]:  # isolate's own command line, parsed as isolate parses it
        from .isolate import main as isolate_main

        return isolate_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
        if args.log_level in ("debug", "info"):
            from . import logs

            logs.configure(args.log_format, args.log_level)
        code = _dispatch(args)
        sys.stdout.flush()  # here, so a closed pipe is seen as one (below)
        return code
    except SandboxError as e:
        return _fail(f"error: {e.message}", e.hint)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # never a traceback for a user; SANDBOX_DEBUG=1 shows it
        if isinstance(e, BrokenPipeError) and _broken_standard_stream():
            return _quiet_broken_pipe()
        if os.environ.get("SANDBOX_DEBUG"):
            raise
        return _fail(
            f"internal error: {type(e).__name__}: {e}",
            "rerun with SANDBOX_DEBUG=1 and report the traceback",
        )


def _fail(message: str, hint: str | None) -> int:
    """One line on stderr, plus a hint; exit 125."""
    try:
        print(f"sandbox: {message}", file=sys.stderr)
        if hint:
            print(f"sandbox: hint: {hint}", file=sys.stderr)
    except BrokenPipeError:
        _quiet_broken_pipe()
    return EXIT_SANDBOX_ERROR
