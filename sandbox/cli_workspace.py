"""``sandbox workspace ...``: named workspaces from the command line (exit 0, or 125 on error).

A named workspace stays (its tmpfs stays mounted) until ``sandbox workspace rm``; ``sandbox exec
--workspace NAME`` runs in it. See :mod:`sandbox.workspace`.
"""

from __future__ import annotations

import argparse
import os


def add_workspace_arguments(ws: argparse.ArgumentParser) -> None:
    """Add the subcommands of ``sandbox workspace`` to its parser."""
    wsub = ws.add_subparsers(dest="workspace_command", required=True)
    create = wsub.add_parser("create", help="make a named workspace (a size-capped tmpfs)")
    create.add_argument("name")
    create.add_argument("--size", default="64M", help="its size (default 64M)")
    wsub.add_parser("ls", help="list the named workspaces")
    put = wsub.add_parser("put", help="copy a host file into a workspace")
    put.add_argument("name")
    put.add_argument("source", help="the host file")
    put.add_argument("target", help="its path in the workspace (the box's /box/TARGET)")
    put.add_argument("--mode", default="644", help="octal mode (default 644; 755 to run it)")
    get = wsub.add_parser("get", help="print a workspace file (or write it with -o)")
    get.add_argument("name")
    get.add_argument("path")
    get.add_argument("-o", "--output", help="write it to this host file instead")
    rm = wsub.add_parser("rm", help="remove a named workspace and everything in it")
    rm.add_argument("name", nargs="+")


def run_workspace(args: argparse.Namespace) -> int:
    """Carry out one ``sandbox workspace`` subcommand."""
    from .errors import ConfigError
    from .workspace import Workspace, names, remove_named

    command = args.workspace_command
    if command == "ls":
        for name in names():
            print(name)
        return 0
    if command == "create":
        Workspace.create(args.name, args.size).close()
        print(args.name)
        return 0
    if command == "rm":
        for name in args.name:
            remove_named(name)
        return 0
    ws = Workspace.open(args.name)
    try:
        if command == "put":
            from .hostpath import open_input

            try:
                mode = int(args.mode, 8)
            except ValueError:
                raise ConfigError(
                    "command line", "--mode", f"expected octal, got {args.mode!r}"
                ) from None
            fd = open_input(args.source, "source")
            with os.fdopen(fd, "rb") as f:
                ws.put(args.target, f.read(), mode)
            return 0
        data = ws.get(args.path)
        if args.output is None:
            view = memoryview(data)
            while view:  # a pipe may take less than all of it at once
                view = view[os.write(1, view) :]
            return 0
        from .hostpath import OutputFile

        output = OutputFile(args.output, "--output")
        try:
            output.write(data)
            output.commit()
        except BaseException:
            output.discard()
            raise
        return 0
    finally:
        ws.close()
