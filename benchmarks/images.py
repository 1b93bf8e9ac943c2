"""Start latency on a 10 MB image and on a 1 GB image, beside bubblewrap on the same layers.

    .venv/bin/python benchmarks/images.py [RUNS]

Builds (once; the store keeps them) two images from the host: `/bin/true` and its libraries
plus 10 MB, or 1 GB, of incompressible data in many files. Then, as medians over RUNS runs
(default 50): `sandbox.run(["/bin/true"], image=...)` through the library, and bubblewrap started
with subprocess on the same unpacked layers (each layer's top-level entries bound read-only on a
tmpfs root: Debian 12's bwrap 0.8 has no overlay support), with
every namespace, fresh /proc and /dev, tmpfs /tmp, capabilities dropped. A run mounts the
layers the store already unpacked, so neither time should grow with the image's size.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from startup import median_ms  # noqa: E402  (benchmarks/ is on the path)

import sandbox  # noqa: E402
from sandbox.image.build import Builder  # noqa: E402
from sandbox.image.store import Store  # noqa: E402
from sandbox.supervisor import run_box  # noqa: E402

SIZES = {"10MB": 10 << 20, "1GB": 1 << 30}
FILE_SIZE = 8 << 20


def ensure_image(store: Store, name: str, size: int) -> None:
    try:
        store.image(name)
        return
    except sandbox.SandboxError:
        pass
    with tempfile.TemporaryDirectory(dir="/var/tmp") as context:
        data = Path(context) / "data"
        data.mkdir()
        for i in range(max(1, size // FILE_SIZE)):
            (data / f"blob{i:04d}").write_bytes(os.urandom(min(size, FILE_SIZE)))
        (Path(context) / "Sandboxfile").write_text(
            "FROM scratch\nBUNDLE /bin/true\nCOPY data /data/\n")
        started = time.monotonic()
        Builder(store, lambda line: None, run_box).build(
            Path(context) / "Sandboxfile", Path(context), [name])
        print(f"built {name} in {time.monotonic() - started:.1f} s", flush=True)


def bwrap_root(layers: tuple[str, ...]) -> list[str]:
    """bwrap (0.8 has no overlay) gets each layer's top-level entries bound read-only."""
    args: list[str] = []
    for layer in reversed(layers):  # bottom first: later binds cover earlier ones
        for entry in sorted(os.listdir(layer)):
            path = os.path.join(layer, entry)
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), f"/{entry}"]
            else:
                args += ["--ro-bind", path, f"/{entry}"]
    return args


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    store = Store()
    print(f"{'image':<8} {'size':>9} {'sandbox.run':>12} {'bwrap':>9}")
    for label, size in SIZES.items():
        name = f"bench/true-{label.lower()}"
        ensure_image(store, name, size)
        image = store.image(name)
        layers = store.layer_dirs(image)
        api = median_ms(lambda n=name: sandbox.run(["/bin/true"], image=n), runs)
        bwrap = float("nan")
        if shutil.which("bwrap"):
            command = ["bwrap", "--unshare-all", "--uid", "1000", "--gid", "1000",
                       "--die-with-parent", "--new-session", "--tmpfs", "/",
                       *bwrap_root(layers), "--proc", "/proc", "--dev", "/dev",
                       "--tmpfs", "/tmp", "--remount-ro", "/", "--cap-drop", "ALL",
                       "/bin/true"]
            bwrap = median_ms(lambda c=command: subprocess.run(c, check=True), runs)
        total = sum(d.size for d in image.manifest.layers)
        print(f"{label:<8} {total / 1e6:>7.1f}MB {api:>10.1f}ms {bwrap:>7.1f}ms", flush=True)


if __name__ == "__main__":
    main()
