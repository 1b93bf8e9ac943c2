"""Soak: many mixed runs through the library with 2 workers, then prove nothing leaked.

    .venv/bin/python benchmarks/soak.py [RUNS]     (default 10000)

The mix: ok, runtime error, CPU limit, wall limit, memory limit, output flood, fork bomb,
forbidden syscall, runs on an image (read-only root, and a writable root filled past its size),
and a linked group (as root). Afterwards it checks, against a snapshot taken after warm-up: box
cgroups, mounts, sandbox network namespaces, box processes, this process's open descriptors
and its helper's (store locks included), entries in /tmp and in the state dir (the image
store's staging included), and this process's memory (RSS). Exits 1 if anything leaked or
a verdict was not the expected one.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402
from sandbox import Verdict, state  # noqa: E402
from sandbox.api import _helper  # noqa: E402
from sandbox.box import cgroups, network, userns  # noqa: E402

BUSY = "while True: pass"
MIX = [
    (["true"], {}, Verdict.OK),
    (["sh", "-c", "exit 3"], {}, Verdict.RUNTIME_ERROR),
    (["python3", "-c", BUSY], {"cpu_time": "0.1"}, Verdict.CPU_TIME_LIMIT),
    (["sleep", "5"], {"wall_time": "0.1"}, Verdict.WALL_TIME_LIMIT),
    (["python3", "-c", "x = bytearray(64 << 20); x[::4096] = b'1' * (16 << 10)"],
     {"memory": "32M"}, Verdict.MEMORY_LIMIT),
    (["yes"], {"output": "64K"}, Verdict.OUTPUT_LIMIT),
    (["sh", "-c", "b() { b | b & }; b; sleep 5"], {"pids": 8, "wall_time": "0.3"},
     Verdict.WALL_TIME_LIMIT),
    (["python3", "-c", "import ctypes; ctypes.CDLL(None).unshare(0x20000)"], {},
     Verdict.FORBIDDEN_SYSCALL),
    (["cat", "/data/f"], {"image": "soak/image"}, Verdict.OK),
    (["sh", "-c", "echo x > /new && cat /dev/zero > /fill"],
     {"image": "soak/image", "root_size": "1M"}, Verdict.RUNTIME_ERROR),
]


def build_image(directory: Path) -> None:
    """A small image from the host: a shell, cat, and one file."""
    from sandbox.image.build import Builder
    from sandbox.image.store import Store
    from sandbox.supervisor import run_box

    (directory / "f").write_text("image data\n")
    (directory / "Sandboxfile").write_text(
        "FROM scratch\nBUNDLE /bin/sh /usr/bin/cat\nCOPY f /data/f\nENV PATH=/usr/bin:/bin\n")
    Builder(Store(), lambda line: None, run_box).build(directory / "Sandboxfile", directory,
                                                        ["soak/image"])


LOCKS = ("ids", "subnets")  # one file per slot ever used at once: grows with concurrency only


def open_fds(pid: int | str) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def box_cgroups() -> int:
    backend = cgroups.backend()
    parents = getattr(backend, "parents", None) or {"": getattr(backend, "parent", Path("/x"))}
    return sum(len(list(Path(p).glob("box-*"))) for p in parents.values())


def box_processes() -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid = entry.stat().st_uid
            except OSError:
                continue
            count += userns.ID_BASE <= uid < userns.ID_BASE + userns.SLOTS
    return count


def snapshot() -> dict[str, int]:
    helper_pid = _helper.process.pid if _helper.process else "self"
    home = state.state_dir()
    return {
        "box cgroups": box_cgroups(),
        "mounts": len(Path("/proc/self/mountinfo").read_text().splitlines()),
        "network namespaces": len(network.objects()),
        "box processes": box_processes(),
        "open fds (library)": open_fds("self"),
        "open fds (helper)": open_fds(helper_pid),
        "/tmp entries": len(os.listdir("/tmp")),
        "state dir entries": sum(1 for p in home.rglob("*") if p.parent.name not in LOCKS),
        "slot lock files": sum(1 for p in home.rglob("*") if p.parent.name in LOCKS),
    }


def group_file(directory: Path) -> Path:
    path = directory / "group.toml"
    path.write_text('network = "linked"\n[[box]]\nname = "a"\nprofile = "linked"\n'
                    'command = ["true"]\n[[box]]\nname = "b"\nprofile = "linked"\n'
                    'command = ["true"]\n')
    return path


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    linked = os.geteuid() == 0
    with tempfile.TemporaryDirectory() as tmp:
        group = group_file(Path(tmp))
        build_image(Path(tmp))
        for argv, limits, _ in MIX:  # warm-up: helper, base layer, filters, subnet locks
            sandbox.run(argv, **limits)
        if linked:
            sandbox.run_group(group)
        before = snapshot()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        wrong: list[str] = []
        counter = iter(range(runs))
        lock = threading.Lock()
        done = [0]

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                kind = i % (len(MIX) + linked)
                if kind == len(MIX):
                    if not sandbox.run_group(group).ok:
                        wrong.append(f"run {i}: linked group not ok")
                else:
                    argv, limits, expected = MIX[kind]
                    verdict = sandbox.run(argv, **limits).verdict
                    # A fork bomb's shell may itself fail to fork under the pids limit and exit.
                    bomb = expected is Verdict.WALL_TIME_LIMIT and "b()" in " ".join(argv)
                    if verdict is not expected and not (bomb and verdict is Verdict.RUNTIME_ERROR):
                        wrong.append(f"run {i}: {argv[0]} gave {verdict}, expected {expected}")
                with lock:
                    done[0] += 1

        started = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        time.sleep(1)
        after = snapshot()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{done[0]} runs in {elapsed:.0f} s ({done[0] / elapsed:.1f} runs/s, 2 workers)")
    leaks = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    for key in before:
        print(f"  {key}: {before[key]} -> {after[key]}")
    print(f"  library max RSS: {rss_before // 1024} MiB -> {rss_after // 1024} MiB")
    for line in wrong[:20]:
        print("  unexpected:", line)
    # Lock files may grow up to one per concurrent run (2 workers x boxes of a group).
    leaked = {k: v for k, v in leaks.items()
              if not (k == "slot lock files" and v[1] <= v[0] + 4)}
    grew = rss_after > rss_before * 1.25 + 10240
    print("verdicts: all as expected" if not wrong else f"verdicts: {len(wrong)} unexpected")
    print("leaks: none" if not leaked and not grew else f"leaks: {leaked} rss grew: {grew}")
    return 1 if wrong or leaked or grew else 0


if __name__ == "__main__":
    sys.exit(main())
