"""sandbox: a least-privilege sandbox for untrusted programs.

>>> import sandbox
>>> report = sandbox.run(["python3", "-c", "print(6*7)"], profile="strict")
>>> report.verdict, report.stdout
(<Verdict.OK: 'ok'>, b'42\\n')
"""

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, HostError, SandboxError
from .report import AppliedLimit, Report, SetupFailure, StopReason, Verdict
from .spec import Bind

if TYPE_CHECKING:
    from . import aio
    from .api import run, run_group
    from .group import GroupReport
    from .workspace import Workspace


def __getattr__(name: str) -> Any:
    # The library entry point loads on first use, so the CLI never pays for the helper's imports.
    if name in ("run", "run_group"):
        from . import api

        return getattr(api, name)
    if name == "aio":  # ``sandbox.aio.run``: the same, awaitable from asyncio
        import importlib

        return importlib.import_module(".aio", __name__)
    if name == "GroupReport":
        from .group import GroupReport

        return GroupReport
    if name == "Workspace":
        from .workspace import Workspace

        return Workspace
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")


__all__ = [
    "AppliedLimit",
    "Bind",
    "ConfigError",
    "GroupReport",
    "HostError",
    "Report",
    "SandboxError",
    "SetupFailure",
    "StopReason",
    "Verdict",
    "Workspace",
    "aio",
    "run",
    "run_group",
]
__version__ = "0.1.0"
