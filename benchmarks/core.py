"""The core's performance targets, each beside its peer, from one run.

    .venv/bin/python benchmarks/core.py [--isolate PATH] [--runs N] [--json FILE]

Peers: isolate (`benchmarks/build-isolate.sh DIR` builds it; without `--isolate` and not on
PATH its rows are left out) and bubblewrap started with subprocess, with the isolation of
`benchmarks/startup.py` (every namespace, read-only /usr, fresh /proc and /dev, tmpfs /tmp, no
capabilities, uid 1000, the strict profile's seccomp filter with a kill action). isolate runs
without `--cg`: isolate 2.x drives cgroup v2 only, so on a host whose v2 hierarchy has no
controllers it sets up no cgroup at all (sandbox does, here on v1): that favours isolate.

Sections (`--only NAME,...`), with their targets:
  latency     median `sandbox.run(["/bin/true"], profile="strict")` in a loop, against
              `isolate --run -- /bin/true` on an initialised box and bwrap, both spawned from
              Python; sandbox/isolate <= 0.7, sandbox/bwrap <= 0.5
  throughput  /bin/true runs per second with 2 threads calling sandbox.run, against 2 threads
              spawning bwrap; sandbox/bwrap >= 1.2
  cli         the venv's console script `sandbox exec --profile strict -- /bin/true`, against
              bwrap; <= 8x
  memory      20 concurrent `sleep 5` boxes through the library: Pss (and USS) of every
              descendant of this process except the `sleep` programs (the library's helper and
              whatever it runs for the boxes), per box; <= 2 MiB. The same for 20 isolate boxes
              and 20 bwrap sandboxes. Kernel objects (page tables, mounts, cgroups) are not in
              these figures.
  images      median sandbox.run of /bin/true on an image holding a 10 MB file and on one
              holding a 1 GB file (built once into the private SANDBOX_HOME, kept there);
              1GB/10MB <= 1.05
  empty       an empty static C program: the report's cpu_time, wall_time, max_rss and the
              `sandbox exec --meta` file's time, time-wall, max-rss, against isolate's `--meta`
              for the same binary; cpu and wall <= 1 ms, max-rss within 512 KiB of isolate's
  cpu         CPU time of a 1 s busy loop as reported against getrusage of the same program
              run bare (within 1%), and how far past a 0.5 s cpu_time limit a busy loop gets
              (reported cpu_time - 0.5 s; median <= 5 ms; isolate's `--time=0.5` beside it)

Within a section the contenders take turns sample by sample, so a neighbour's load falls on
all of them alike. sandbox is driven only through `sandbox.run` and the CLI: the figures stay
comparable while its internals change. The whole run uses its own SANDBOX_HOME (`--home`,
default /var/tmp/sandbox-core-bench), which keeps the two images (about 2 GB) for the next run;
remove it to free the space. The default run takes about a minute once the images exist.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402

SECTIONS = ("latency", "throughput", "cli", "memory", "images", "empty", "cpu")
BOXES = 20  # concurrent idle boxes for the memory figure
IMAGES = {"10MB": 10 << 20, "1GB": 1 << 30}
KIB = 1024

EMPTY_C = "int main(void) { return 0; }\n"
# Spins until the process has used SECONDS of CPU time (argv[1]), or forever when it is 0.
SPIN_C = r"""
#include <stdlib.h>
#include <time.h>
static double cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    double limit = argc > 1 ? atof(argv[1]) : 0;
    volatile unsigned long n = 0;
    while (limit == 0 || cpu() < limit)
        for (int i = 0; i < 10000; i++) n++;
    return 0;
}
"""


@dataclass
class Row:
    """One figure of the table: sandbox's value, its peer's, their ratio and the target."""

    section: str
    figure: str
    unit: str
    value: float | None
    peer: str | None = None
    peer_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


def ratio_row(
    section: str,
    figure: str,
    unit: str,
    value: float,
    peer: str,
    peer_value: float | None,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
) -> Row:
    """A row whose target bounds value/peer_value."""
    if peer_value is None or peer_value <= 0:
        return Row(section, figure, unit, value, peer, peer_value)
    ratio = value / peer_value
    row = Row(section, figure, unit, value, peer, peer_value, ratio)
    if at_most is not None:
        return replace(row, target=f"ratio <= {at_most:g}", met=ratio <= at_most)
    if at_least is not None:
        return replace(row, target=f"ratio >= {at_least:g}", met=ratio >= at_least)
    return row


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def interleaved(jobs: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Seconds per call of each job, ``runs`` samples each, the jobs taking turns; each job
    runs once first unmeasured (helper started, base layer built, page cache warm)."""
    for job in jobs.values():
        job()
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(runs):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            samples[name].append(time.perf_counter() - start)
    return samples


def checked(report: sandbox.Report, allowed: tuple[str, ...] = ("ok",)) -> sandbox.Report:
    """``report``, if its verdict is one of ``allowed`` (a failing run would be a fast one)."""
    if report.verdict.value not in allowed:
        raise RuntimeError(f"sandbox run ended {report.verdict.value}: {report.error or ''}")
    return report


def true_run() -> sandbox.Report:
    """The library's /bin/true under strict."""
    return checked(sandbox.run(["/bin/true"], profile="strict"))


class Bwrap:
    """bubblewrap with benchmarks/startup.py's isolation and the strict profile's filter."""

    def __init__(self) -> None:
        # The peer's filter is the one thing taken from inside the package: the same program
        # the box gets, so the comparison does not hinge on a hand-written equivalent.
        from startup import bwrap_command  # benchmarks/ is on the path

        from sandbox.box.seccomp import compile_filter
        from sandbox.profiles import load_profile

        self.command = bwrap_command
        self.bpf = compile_filter(load_profile("strict").seccomp, notify=False)

    @contextmanager
    def argv(self, program: Sequence[str]) -> Iterator[tuple[list[str], int]]:
        """The bwrap command running ``program``, and the descriptor carrying its filter."""
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, self.bpf)
            os.close(write_fd)
            yield [*self.command(read_fd)[:-1], *program], read_fd
        finally:
            os.close(read_fd)

    def run(self, program: Sequence[str] = ("/bin/true",)) -> None:
        """Run ``program`` to its end."""
        with self.argv(program) as (argv, fd):
            subprocess.run(argv, check=True, pass_fds=[fd], stdin=subprocess.DEVNULL)

    def start(self, program: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``program`` and return at once."""
        with self.argv(program) as (argv, fd):
            return subprocess.Popen(argv, pass_fds=[fd], stdin=subprocess.DEVNULL)


class Isolate:
    """An isolate binary and the boxes this benchmark initialised with it (no --cg)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.boxes: dict[int, Path] = {}
        version = subprocess.run([path, "--version"], capture_output=True, text=True)
        self.version = version.stdout.splitlines()[0] if version.stdout else "isolate"

    def box(self, box_id: int) -> Path:
        """The box directory (``/box`` inside) of box ``box_id``, initialised on first use."""
        if box_id not in self.boxes:
            subprocess.run(
                [self.path, f"--box-id={box_id}", "--cleanup"], capture_output=True, check=False
            )
            out = subprocess.run(
                [self.path, f"--box-id={box_id}", "--init"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            self.boxes[box_id] = Path(out.strip()) / "box"
        return self.boxes[box_id]

    def argv(self, box_id: int, program: Sequence[str], *options: str) -> list[str]:
        """The command running ``program`` in box ``box_id``."""
        self.box(box_id)
        return [self.path, f"--box-id={box_id}", *options, "--run", "--", *program]

    def run(self, program: Sequence[str] = ("/bin/true",), *options: str) -> None:
        """Run ``program`` in box 0 to its end."""
        subprocess.run(
            self.argv(0, program, *options),
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def meta(self, program: Sequence[str], *options: str) -> dict[str, str]:
        """Run ``program`` in box 0 with ``--meta`` and return the meta file."""
        with tempfile.NamedTemporaryFile("r", suffix=".meta") as f:
            subprocess.run(
                self.argv(0, program, f"--meta={f.name}", *options),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            return parse_meta(Path(f.name).read_text())

    def cleanup(self) -> None:
        """Remove every box this benchmark initialised."""
        for box_id in self.boxes:
            subprocess.run(
                [self.path, f"--box-id={box_id}", "--cleanup"], capture_output=True, check=False
            )
        self.boxes.clear()


def parse_meta(text: str) -> dict[str, str]:
    """An isolate-style ``key:value`` meta file."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class Bench:
    """The run's settings, peers and scratch files, and the rows gathered so far."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.runs: int = args.runs
        self.seconds: float = args.seconds
        self.work = work
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.bwrap: Bwrap | None = None
        if shutil.which("bwrap"):
            try:
                self.bwrap = Bwrap()
            except ImportError as e:
                self.notes.append(f"bwrap left out: cannot build its filter ({e})")
        else:
            self.notes.append("bwrap left out: not installed (apt-get install bubblewrap)")
        isolate = args.isolate or shutil.which("isolate")
        self.isolate = Isolate(isolate) if isolate else None
        if self.isolate is None:
            self.notes.append("isolate left out: pass --isolate (benchmarks/build-isolate.sh)")
        else:
            self.notes.append(f"{self.isolate.version}, run without --cg (no cgroup)")
        # The checkout's venv script itself, never a shim in front of it (a shim's own start-up
        # would be in the figure).
        self.cli = ROOT / ".venv" / "bin" / "sandbox"
        if not self.cli.exists():
            self.cli = Path(sys.prefix) / "bin" / "sandbox"
        self.programs = work / "programs"
        self.programs.mkdir()
        os.chmod(work, 0o755)
        os.chmod(self.programs, 0o755)
        for name, source in (("empty", EMPTY_C), ("spin", SPIN_C)):
            (work / f"{name}.c").write_text(source)
            subprocess.run(
                ["gcc", "-O2", "-static", "-o", str(self.programs / name), str(work / f"{name}.c")],
                check=True,
            )

    def add(self, row: Row) -> None:
        """Keep ``row`` and show it at once (the table comes again at the end)."""
        self.rows.append(row)
        print(format_row(row), flush=True)

    def boxed(
        self,
        program: str,
        *args: str,
        cpu_time: float | None = None,
        wall_time: float | None = None,
    ) -> sandbox.Report:
        """``programs/program`` run through the library under strict (bound at /box/bin)."""
        return sandbox.run(
            [f"/box/bin/{program}", *args],
            profile="strict",
            binds=[(str(self.programs), "/box/bin")],
            cpu_time=cpu_time,
            wall_time=wall_time,
        )

    def in_isolate(self, isolate: Isolate, program: str) -> list[str]:
        """``programs/program`` copied into isolate's box 0: the path to run it by."""
        shutil.copy2(self.programs / program, isolate.box(0) / program)
        return [f"/box/{program}"]


def latency(b: Bench) -> None:
    """/bin/true per run: the library against isolate and bwrap."""
    jobs: dict[str, Callable[[], object]] = {"sandbox": true_run}
    if b.isolate:
        jobs["isolate"] = b.isolate.run
    if b.bwrap:
        jobs["bwrap"] = b.bwrap.run
    ms = {name: 1000 * median(s) for name, s in interleaved(jobs, b.runs).items()}
    targets = {"isolate": 0.7, "bwrap": 0.5}
    for peer in ("isolate", "bwrap"):
        if peer in ms:
            b.add(
                ratio_row(
                    "latency",
                    "sandbox.run /bin/true",
                    "ms",
                    ms["sandbox"],
                    peer,
                    ms[peer],
                    at_most=targets[peer],
                )
            )
    if len(ms) == 1:
        b.add(Row("latency", "sandbox.run /bin/true", "ms", ms["sandbox"]))


def rate(job: Callable[[], object], seconds: float, workers: int = 2) -> tuple[int, float]:
    """Calls of ``job`` completed by ``workers`` threads in ``seconds``, and the time taken."""
    count = [0] * workers
    start = time.monotonic()
    stop = start + seconds

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            job()
            count[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count), time.monotonic() - start


def throughput(b: Bench) -> None:
    """Runs per second with 2 workers, in two alternating halves per contender."""
    jobs: dict[str, Callable[[], object]] = {"sandbox": true_run}
    if b.bwrap:
        jobs["bwrap"] = b.bwrap.run
    done = {name: [0, 0.0] for name in jobs}
    for _ in range(2):
        for name, job in jobs.items():
            n, took = rate(job, b.seconds / 2)
            done[name][0] += n
            done[name][1] += took
    per_s = {name: n / took for name, (n, took) in done.items()}
    if "bwrap" in per_s:
        b.add(
            ratio_row(
                "throughput",
                "2 workers, /bin/true",
                "runs/s",
                per_s["sandbox"],
                "bwrap",
                per_s["bwrap"],
                at_least=1.2,
            )
        )
    else:
        b.add(Row("throughput", "2 workers, /bin/true", "runs/s", per_s["sandbox"]))


def cli(b: Bench) -> None:
    """The console script against bwrap, both spawned from here."""
    argv = [str(b.cli), "exec", "--profile", "strict", "--", "/bin/true"]
    jobs: dict[str, Callable[[], object]] = {
        "sandbox": lambda: subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    }
    if b.bwrap:
        jobs["bwrap"] = b.bwrap.run
    ms = {name: 1000 * median(s) for name, s in interleaved(jobs, max(5, b.runs // 2)).items()}
    b.add(
        ratio_row(
            "cli",
            "sandbox exec /bin/true",
            "ms",
            ms["sandbox"],
            "bwrap",
            ms.get("bwrap"),
            at_most=8,
        )
    )


def proc_tree(root: int) -> list[tuple[int, str]]:
    """(pid, comm) of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append((int(entry), comm))
    found: list[tuple[int, str]] = []
    todo = [root]
    while todo:
        for pid, comm in children.get(todo.pop(), []):
            found.append((pid, comm))
            todo.append(pid)
    return found


def footprint(pids: Sequence[int]) -> tuple[int, int]:
    """Summed Pss and USS (private clean + dirty) of ``pids``, in bytes."""
    pss = uss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # gone meanwhile
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss += int(rest.split()[0]) * KIB
            elif key in ("Private_Clean", "Private_Dirty"):
                uss += int(rest.split()[0]) * KIB
    return pss, uss


def idle_footprint(program: str) -> tuple[int, int, int]:
    """Once ``program`` runs in every one of the BOXES boxes just started (or 4 s passed): Pss
    and USS of this process's descendants other than ``program``, and how many boxes ran it."""
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        if sum(comm == program for _, comm in proc_tree(os.getpid())) >= BOXES:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # the last box's supervision settles into its idle state
    tree = proc_tree(os.getpid())
    pss, uss = footprint([pid for pid, comm in tree if comm != program])
    return pss, uss, sum(comm == program for _, comm in tree)


def memory(b: Bench) -> None:
    """Host memory per concurrent idle box, beside isolate and bwrap."""
    true_run()  # the helper is up and idle, and it is all this process has running
    base_pss, base_uss = footprint([pid for pid, _ in proc_tree(os.getpid())])
    reports: list[sandbox.Report] = []
    threads = [
        threading.Thread(
            target=lambda: reports.append(sandbox.run(["sleep", "5"], profile="strict"))
        )
        for _ in range(BOXES)
    ]
    for t in threads:
        t.start()
    figures = {"sandbox": idle_footprint("sleep")}
    for t in threads:
        t.join()
    for report in reports:
        checked(report)
    if b.isolate:
        for i in range(BOXES):
            b.isolate.box(i + 1)
        procs = [
            subprocess.Popen(
                b.isolate.argv(i + 1, ["/bin/sleep", "5"]),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(BOXES)
        ]
        figures["isolate"] = idle_footprint("sleep")
        for p in procs:
            p.wait()
    if b.bwrap:
        procs = [b.bwrap.start(["/bin/sleep", "5"]) for _ in range(BOXES)]
        figures["bwrap"] = idle_footprint("sleep")
        for p in procs:
            p.wait()
    for name, (_, _, seen) in figures.items():
        if seen < BOXES:
            b.notes.append(f"memory: only {seen} of {BOXES} {name} boxes were up at once")
    mib = float(1 << 20)
    per_box = {
        name: (pss / max(n, 1) / mib, uss / max(n, 1) / mib)
        for name, (pss, uss, n) in figures.items()
    }
    for index, kind in enumerate(("Pss", "USS")):
        figure = f"{kind} per idle box, {BOXES} boxes"
        value = per_box["sandbox"][index]
        peers = [name for name in per_box if name != "sandbox"]
        rows = [
            ratio_row("memory", figure, "MiB", value, peer, per_box[peer][index]) for peer in peers
        ] or [Row("memory", figure, "MiB", value)]
        for row in rows:
            if kind == "Pss":
                row.target, row.met = "<= 2 MiB", value <= 2
            b.add(row)
    b.add(Row("memory", "Pss of the idle helper, no box", "MiB", base_pss / mib))
    b.add(Row("memory", "USS of the idle helper, no box", "MiB", base_uss / mib))


def ensure_image(b: Bench, name: str, size: int) -> None:
    """Build image ``name`` (/bin/true and a ``size``-byte file) unless the store has it."""
    inspect = [str(b.cli), "image", "inspect", name]
    if subprocess.run(inspect, capture_output=True, check=False).returncode == 0:
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp") as context:
        # Incompressible, so the layer is as large as the file.
        with open(Path(context) / "data", "wb") as f:
            for offset in range(0, size, 8 << 20):
                f.write(os.urandom(min(8 << 20, size - offset)))
        (Path(context) / "Sandboxfile").write_text(
            "FROM scratch\nBUNDLE /bin/true\nCOPY data /data\n"
        )
        started = time.monotonic()
        subprocess.run(
            [str(b.cli), "image", "build", "-t", name, context],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(f"  (built image {name} in {time.monotonic() - started:.0f} s)", flush=True)


def images(b: Bench) -> None:
    """/bin/true on a 1 GB image against the same on a 10 MB image."""
    names = {label: f"core-bench-{label.lower()}" for label in IMAGES}
    for label, size in IMAGES.items():
        ensure_image(b, names[label], size)

    def on(label: str) -> Callable[[], object]:
        return lambda: checked(sandbox.run(["/bin/true"], image=names[label], profile="strict"))

    ms = {
        label: 1000 * median(s)
        for label, s in interleaved({label: on(label) for label in IMAGES}, b.runs).items()
    }
    b.add(
        ratio_row(
            "images",
            "sandbox.run /bin/true, 1 GB image",
            "ms",
            ms["1GB"],
            "10 MB image",
            ms["10MB"],
            at_most=1.05,
        )
    )


def bounded(
    section: str,
    figure: str,
    unit: str,
    value: float,
    peer: str,
    peer_value: float | None,
    target: str,
    met: bool | None,
) -> Row:
    """A row with an absolute target, the peer's value (and the ratio) beside it."""
    return replace(
        ratio_row(section, figure, unit, value, peer, peer_value), target=target, met=met
    )


def empty(b: Bench) -> None:
    """The figures of an empty static program, from the report and the meta file, beside
    isolate's meta file for the same binary."""
    rounds = max(5, b.runs // 4)
    reports: list[sandbox.Report] = []
    metas: list[dict[str, str]] = []
    theirs: list[dict[str, str]] = []
    program = b.in_isolate(b.isolate, "empty") if b.isolate else []
    checked(b.boxed("empty"))  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "meta"
        argv = [
            str(b.cli),
            "exec",
            "--profile",
            "strict",
            "--ro-bind",
            f"{b.programs}:/box/bin",
            "--meta",
            str(meta),
            "--",
            "/box/bin/empty",
        ]
        for _ in range(rounds):
            reports += [checked(b.boxed("empty")) for _ in range(4)]
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
            metas.append(parse_meta(meta.read_text()))
            if b.isolate:
                theirs.append(b.isolate.meta(program))

    def of(values: list[dict[str, str]], key: str, scale: float) -> float | None:
        return median([float(m[key]) * scale for m in values]) if values else None

    peer = "isolate --meta"
    cpu = median([r.cpu_time for r in reports]) * 1000
    wall = median([r.wall_time for r in reports]) * 1000
    rss = median([(r.max_rss or 0) / KIB for r in reports])
    their_cpu, their_wall = of(theirs, "time", 1000), of(theirs, "time-wall", 1000)
    their_rss = of(theirs, "max-rss", 1)

    def rss_met(value: float) -> bool | None:
        return value - their_rss <= 512 if their_rss is not None else None

    for figure, value, theirs_value in (
        ("cpu_time (report)", cpu, their_cpu),
        ("wall_time (report)", wall, their_wall),
    ):
        b.add(bounded("empty", figure, "ms", value, peer, theirs_value, "<= 1 ms", value <= 1))
    b.add(
        bounded(
            "empty",
            "max_rss (report)",
            "KiB",
            rss,
            peer,
            their_rss,
            "<= peer + 512 KiB",
            rss_met(rss),
        )
    )
    meta_cpu, meta_wall = of(metas, "time", 1000), of(metas, "time-wall", 1000)
    meta_rss = of(metas, "max-rss", 1)
    for figure, meta_value, theirs_value in (
        ("time (--meta)", meta_cpu, their_cpu),
        ("time-wall (--meta)", meta_wall, their_wall),
    ):
        if meta_value is not None:
            b.add(
                bounded(
                    "empty",
                    figure,
                    "ms",
                    meta_value,
                    peer,
                    theirs_value,
                    "<= 1 ms",
                    meta_value <= 1,
                )
            )
    if meta_rss is not None:
        b.add(
            bounded(
                "empty",
                "max-rss (--meta)",
                "KiB",
                meta_rss,
                peer,
                their_rss,
                "<= peer + 512 KiB",
                rss_met(meta_rss),
            )
        )


def cpu(b: Bench) -> None:
    """CPU time accuracy of a 1 s loop and the overshoot of a 0.5 s cpu_time limit."""
    spin = str(b.programs / "spin")
    bare: list[float] = []
    boxed: list[float] = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([spin, "1"], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        bare.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        boxed.append(checked(b.boxed("spin", "1", cpu_time=5)).cpu_time)
    ours, theirs = median(boxed), median(bare)
    off = ours / theirs - 1
    b.add(
        Row(
            "cpu",
            "CPU time of a 1 s loop",
            "ms",
            ours * 1000,
            "getrusage, bare",
            theirs * 1000,
            ours / theirs,
            "within 1%",
            abs(off) <= 0.01,
        )
    )
    over: list[float] = []
    their_over: list[float] = []
    program = [*b.in_isolate(b.isolate, "spin"), "0"] if b.isolate else []
    for _ in range(5):
        report = checked(b.boxed("spin", "0", cpu_time=0.5, wall_time=5), ("cpu_time_limit",))
        over.append((report.cpu_time - 0.5) * 1000)
        if b.isolate:
            meta = b.isolate.meta(program, "--time=0.5", "--wall-time=5")
            their_over.append((float(meta["time"]) - 0.5) * 1000)
    peer = "isolate --time=0.5"
    b.add(
        bounded(
            "cpu",
            "cpu_time 0.5 s limit overshoot, median",
            "ms",
            median(over),
            peer,
            median(their_over) if their_over else None,
            "<= 5 ms",
            median(over) <= 5,
        )
    )
    b.add(
        bounded(
            "cpu",
            "cpu_time 0.5 s limit overshoot, max",
            "ms",
            max(over),
            peer,
            max(their_over) if their_over else None,
            "",
            None,
        )
    )


def number(value: float | None) -> str:
    """``value`` with about three significant digits."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.4f}"


HEADER = (
    f"{'section':10s} {'figure':40s} {'sandbox':>9s} {'unit':6s} {'peer':20s} "
    f"{'peer val':>9s} {'ratio':>6s}  {'target':18s} met"
)


def format_row(row: Row) -> str:
    """One line of the table."""
    met = {True: "yes", False: "NO", None: ""}[row.met]
    ratio = (
        "-" if row.ratio is None else f"{row.ratio:.3f}" if row.ratio < 10 else f"{row.ratio:.1f}"
    )
    return (
        f"{row.section:10s} {row.figure:40s} {number(row.value):>9s} {row.unit:6s} "
        f"{row.peer or '-':20s} {number(row.peer_value):>9s} {ratio:>6s}  "
        f"{row.target:18s} {met}"
    )


def host() -> dict[str, object]:
    """What the figures were taken on."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
        "commit": commit or None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    """Parse the arguments, run the sections, print the table (and save it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isolate", help="the isolate binary (default: isolate on PATH)")
    parser.add_argument("--runs", type=int, default=40, help="samples per latency figure")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="throughput: seconds per contender"
    )
    parser.add_argument(
        "--home",
        default="/var/tmp/sandbox-core-bench",
        help="SANDBOX_HOME of the run (its images are kept for the next run)",
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    # Before the first run: the helper and the CLI inherit it.
    os.environ["SANDBOX_HOME"] = args.home
    Path(args.home).mkdir(mode=0o700, parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(args, Path(tmp))
        info = host()
        print(
            f"kernel {info['kernel']}, {info['cpus']} CPUs, load {info['load']:.2f}, "
            f"commit {info['commit']}, {args.runs} runs"
        )
        print(HEADER, flush=True)
        try:
            for name in SECTIONS:
                if name in chosen:
                    globals()[name](b)
        finally:
            if b.isolate:
                b.isolate.cleanup()
    print(f"\n{HEADER}")
    for row in b.rows:
        print(format_row(row))
    for note in b.notes:
        print(f"note: {note}")
    print(f"took {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "host": info,
                    "runs": args.runs,
                    "notes": b.notes,
                    "rows": [asdict(row) for row in b.rows],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
