"""The package's layers (docs/architecture.md, "The package at a glance") hold in its imports.

Every import of every module is read with ``ast``: at the top, inside functions (the package
imports late to keep the CLI fast) and under ``TYPE_CHECKING`` alike, since a late import is
as much a dependency as an early one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sandbox"

#: Bottom to top: the modules of each layer (paths under sandbox/; ``box/`` is the package).
LAYERS: dict[str, tuple[str, ...]] = {
    "types": ("errors.py", "units.py", "spec.py", "limits.py", "report.py", "protocol.py",
              "imageref.py", "syscall_groups.py"),
    "host": ("kernel.py", "hostpath.py", "state.py", "storelock.py", "baseimage.py",
             "boxinit.py", "native/", "boxdir.py"),
    "box": ("box/",),
    "config": ("profiles.py", "policy.py", "tomlreader.py"),
    "image": ("image/",),
    "run": ("supervisor.py", "child.py", "streams.py", "verdict.py", "sched.py", "hostinfo.py",
            "repeat.py"),
    "request": ("request.py",),
    "orchestration": ("helper.py", "group.py"),
    "front": ("__init__.py", "__main__.py", "aio.py", "api.py", "cli.py", "cli_image.py",
              "doctor.py", "logs.py", "meta.py", "workspace.py", "cli_workspace.py",
              "isolate.py", "isolate_args.py"),
}
#: What each layer's modules may import besides their own layer: layers, or single modules.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "types": (),
    "host": ("types",),
    "box": ("types", "host"),
    # box/seccomp.py knows which syscall names this host's libseccomp resolves.
    "config": ("types", "box/seccomp.py"),
    "image": ("types", "host", "box", "config"),
    "run": ("types", "host", "box"),
    "request": ("types", "config", "image"),
    "orchestration": ("types", "host", "box", "config", "request", "run"),
    "front": ("types", "host", "box", "config", "image", "run", "request", "orchestration"),
}
#: Names any module may take from the package itself: set in its __init__.py, which Python has
#: run before any submodule, so taking them adds no dependency.
PACKAGE_NAMES = frozenset({"__version__"})


def key_of(module: str) -> str:
    """The LAYERS entry naming ``module`` (``sandbox.box.caps`` -> ``box/``)."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    if (PACKAGE / parts[0]).is_dir():
        return parts[0] + "/"
    return parts[0] + ".py"


def file_of(module: str) -> str:
    """``module``'s file under sandbox/ (``sandbox.box.seccomp`` -> ``box/seccomp.py``)."""
    parts = module.split(".")[1:]
    if (PACKAGE.joinpath(*parts)).is_dir():
        parts.append("__init__")
    return "/".join(parts) + ".py"


def layer_of(key: str) -> str | None:
    return next((layer for layer, keys in LAYERS.items() if key in keys), None)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["sandbox", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of the package in ``source``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name.split(".")[0] == "sandbox"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "sandbox":
                continue
            names = {a.name for a in node.names}
            if target == "sandbox":
                names -= PACKAGE_NAMES
            subs = {f"{target}.{name}" for name in names}
            found += [(node.lineno, sub) for sub in sorted(subs & known)]
            if subs - known:
                found.append((node.lineno, target))
    return found


def violations(module: str, where: str, source: str, is_package: bool, known: set[str]
               ) -> list[str]:
    """One line per import of ``module`` (the file ``where``) that its layer may not make."""
    layer = layer_of(key_of(module))
    allowed = MAY_IMPORT[layer] if layer else ()
    lines = []
    for line, target in imports(module, source, is_package, known):
        key = key_of(target)
        target_layer = layer_of(key)
        if target_layer in (layer, *allowed) or file_of(target) in allowed:
            continue
        lines.append(
            f"{where}:{line}: {module} ({layer}) imports "
            f"{target} ({target_layer}); {layer} may import only {', '.join(allowed) or 'itself'}"
        )
    return lines


def test_every_module_has_one_layer():
    keys = {key_of(m) for m in modules()}
    missing = sorted(k for k in keys if layer_of(k) is None)
    assert not missing, f"sandbox/{missing}: give them a layer in LAYERS and the doc's map"
    declared = [k for ks in LAYERS.values() for k in ks]
    assert len(declared) == len(set(declared)), "a module is in two layers"
    assert set(declared) == keys, f"no such module: {sorted(set(declared) - keys)}"


def test_every_import_keeps_to_the_layers():
    found = modules()
    known = set(found)
    bad = []
    for module, path in found.items():
        where = str(path.relative_to(ROOT))
        bad += violations(module, where, path.read_text(), path.name == "__init__.py", known)
    assert not bad, "imports across the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_a_late_import_of_the_supervisor_from_the_image_engine_is_caught():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .. import group\n"
        "def run():\n"
        "    from ..supervisor import run_box\n"
        "    from ..box import userns\n"
        "    from .. import __version__\n"
    )
    known = set(modules())
    assert violations("sandbox.image.build", "sandbox/image/build.py", source, False, known) == [
        "sandbox/image/build.py:3: sandbox.image.build (image) imports sandbox.group "
        "(orchestration); image may import only types, host, box, config",
        "sandbox/image/build.py:5: sandbox.image.build (image) imports sandbox.supervisor "
        "(run); image may import only types, host, box, config",
    ]
    source = "from .box import mounts, seccomp\n"
    assert violations("sandbox.profiles", "sandbox/profiles.py", source, False, known) == [
        "sandbox/profiles.py:1: sandbox.profiles (config) imports sandbox.box.mounts (box); "
        "config may import only types, box/seccomp.py",
    ]


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_architecture_map_says_the_same():
    text = (ROOT / "docs/architecture.md").read_text()
    mapped: dict[str, list[str]] = {}
    for row in _table(text, "| layer | modules |"):
        mapped.setdefault(row[0], []).extend(re.findall(r"`([^`]+)`", row[1]))
    assert {layer: sorted(keys) for layer, keys in mapped.items()} == {
        layer: sorted(keys) for layer, keys in LAYERS.items()
    }
    may = {row[0]: row[1] for row in _table(text, "| layer | may import |")}
    assert may == {
        layer: ", ".join(f"`{a}`" if a.endswith(".py") else a for a in allowed) or "-"
        for layer, allowed in MAY_IMPORT.items()
    }
    assert list(may) == list(reversed(MAY_IMPORT))  # the doc's tables go top to bottom
