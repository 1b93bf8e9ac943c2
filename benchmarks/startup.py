"""Per-run latency of `/bin/true` under `strict`, beside bubblewrap, from one run.

    .venv/bin/python benchmarks/startup.py [RUNS]

Measures, as medians over RUNS runs (default 100), one after another:
  cli      `sandbox exec --profile strict -- /bin/true` (the venv's console script)
  api      `sandbox.run(["/bin/true"])` in a loop (the library through its helper)
  bwrap    bubblewrap started with subprocess, with equivalent isolation: every namespace,
           read-only /usr, fresh /proc and /dev, tmpfs /tmp, all capabilities dropped, uid 1000,
           and the same seccomp filter (the strict profile's, compiled with a kill action)
and prints the ratios. bwrap does no cgroup setup, overlay or /proc masking: sandbox does all
three, so the comparison is conservative.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402
from sandbox.box.seccomp import compile_filter  # noqa: E402
from sandbox.profiles import load_profile  # noqa: E402


def median_ms(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up: helper started, base layer built, filter compiled
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def bwrap_command(bpf_fd: int) -> list[str]:
    links = [a for top in ("bin", "sbin", "lib", "lib64") if os.path.islink(f"/{top}")
             for a in ("--symlink", os.readlink(f"/{top}"), f"/{top}")]
    return ["bwrap", "--unshare-all", "--uid", "1000", "--gid", "1000", "--die-with-parent",
            "--new-session", "--ro-bind", "/usr", "/usr", *links, "--proc", "/proc",
            "--dev", "/dev", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--seccomp", str(bpf_fd), "/bin/true"]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    cli = str(Path(sys.executable).parent / "sandbox")
    results = {
        "cli": median_ms(lambda: subprocess.run([cli, "exec", "--profile", "strict", "--",
                                                 "/bin/true"], check=True), runs),
        "api": median_ms(lambda: sandbox.run(["/bin/true"], profile="strict"), runs),
    }
    if shutil.which("bwrap"):
        bpf = compile_filter(load_profile("strict").seccomp, notify=False)

        def bwrap() -> None:
            read_fd, write_fd = os.pipe()
            os.write(write_fd, bpf)
            os.close(write_fd)
            try:
                subprocess.run(bwrap_command(read_fd), check=True, pass_fds=[read_fd])
            finally:
                os.close(read_fd)

        results["bwrap"] = median_ms(bwrap, runs)
    print(f"median per-run latency of /bin/true, {runs} runs each "
          f"(kernel {os.uname().release}, {os.cpu_count()} CPUs)")
    for name, value in results.items():
        print(f"  {name:6s} {value:7.2f} ms")
    if "bwrap" in results:
        print(f"  api / bwrap = {results['api'] / results['bwrap']:.2f} (goal <= 1.0)")
        print(f"  cli / bwrap = {results['cli'] / results['bwrap']:.2f} (goal <= 3.0)")
    else:
        print("  bwrap not installed: apt-get install bubblewrap")


if __name__ == "__main__":
    main()
