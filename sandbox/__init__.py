"""sandbox: a least-privilege sandbox for untrusted programs.

>>> import sandbox
>>> report = sandbox.run(["python3", "-c", "print(6*7)"], profile="strict")
>>> report.verdict, report.stdout
(<Verdict.OK: 'ok'>, b'42\\n')
"""

from .api import run
from .errors import ConfigError, HostError, SandboxError
from .report import AppliedLimit, Report, Verdict
from .spec import Bind

__all__ = [
    "AppliedLimit",
    "Bind",
    "ConfigError",
    "HostError",
    "Report",
    "SandboxError",
    "Verdict",
    "run",
]
__version__ = "0.1.0"
