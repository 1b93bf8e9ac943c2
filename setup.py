"""Builds the native box init (sandbox/native/boxinit.c) with the system C compiler as part of
every install: a wheel, a plain ``pip install`` and an editable one. Everything else about the
package is declared in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _native_build():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("boxinit_build", HERE / "sandbox/native/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithBoxInit(build_py):
    """build_py, plus the static boxinit binary next to the package's Python files."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # An editable install runs the checkout's files: put the binary there.
            _native_build().build(HERE / "sandbox/native/boxinit")
        else:
            _native_build().build(Path(self.build_lib) / "sandbox/native/boxinit")


class BinaryDistribution(Distribution):
    """The wheel holds a compiled program, so it is tagged for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithBoxInit}, distclass=BinaryDistribution)
