"""Resource control with cgroups: one interface, a v2 and a v1 backend, chosen at start-up.

Boxes live in a subtree of the supervisor's own cgroup (``<own>/sandbox/box-...``) so the sandbox
never touches cgroups it did not create. Box names carry the supervisor's pid and start time; a
supervisor that starts removes the boxes of supervisors that no longer exist (killed with -9).
Kernel docs: Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/{memory,pids,freezer}.rst.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple, Protocol

from ..errors import HostError
from ..kernel import CLONE_NEWCGROUP, KernelOps
from ..limits import Limits
from ..report import AppliedLimit, CgroupHierarchy
from ..units import format_cpu_list, parse_cpu_list
from .plan import ChildPlan

_SEQ = itertools.count()
SUBTREE = "sandbox"
CPU_PERIOD_US = 100_000


# A NamedTuple rather than a dataclass: made at import several times faster, and every run
# imports this module (docs/performance.md).
class CpuUsage(NamedTuple):
    """CPU time of every task that was ever in the box, in seconds."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system


class BoxCgroup(Protocol):
    """The cgroup(s) of one box: ``applied`` holds each limit its backend set, recorded by the
    same call that wrote it (:func:`_set`); ``cpu_source`` names where its CPU figure comes
    from."""

    backend: CgroupHierarchy
    cpu_source: str
    applied: dict[str, AppliedLimit]

    def open_entry(self) -> tuple[int, ...]: ...
    def cpu_usage(self) -> CpuUsage: ...
    def memory_peak(self) -> int | None: ...
    def pids_peak(self) -> int | None: ...
    def oom_killed(self) -> bool: ...
    def kill(self) -> None: ...
    def destroy(self) -> None: ...


class CgroupBackend(Protocol):
    """Creates box cgroups with limits applied."""

    name: CgroupHierarchy

    def create(self, limits: Limits) -> BoxCgroup: ...


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _set(
    applied: dict[str, AppliedLimit], name: str, value: object, path: Path, text: str, how: str
) -> None:
    """Write ``text`` to the control file ``path`` and record limit ``name`` as applied by
    ``how``: the report names only what a write enforced."""
    _write(path, text)
    applied[name] = AppliedLimit(value, how)  # type: ignore[arg-type]


def _read(path: Path) -> str:
    return path.read_text()


def _keyed(path: Path) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _self_start_time() -> str:
    return _read(Path("/proc/self/stat")).rsplit(")", 1)[1].split()[19]


def _box_name() -> str:
    return f"box-{os.getpid()}-{_self_start_time()}-{next(_SEQ)}"


def _owner_alive(name: str) -> bool:
    parts = name.split("-")
    if len(parts) != 4 or parts[0] != "box":
        return True  # not ours: never touch it
    try:
        stat = _read(Path(f"/proc/{parts[1]}/stat"))
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[19] == parts[2]


def _wait_empty(procs: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _read(procs).strip():
        if time.monotonic() > deadline:
            raise HostError(f"processes in {procs.parent} did not exit after SIGKILL")
        time.sleep(0.0005)


def _rmdir(path: Path) -> None:
    for attempt in range(200):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == 199:
                raise
            time.sleep(0.001)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 entry is under key ``""``."""
    out = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for ctl in controllers.split(","):
            out[ctl.removeprefix("name=")] = path
    return out


def parse_mountinfo(text: str) -> tuple[dict[str, Path], Path | None]:
    """Cgroup mount points from ``/proc/self/mountinfo``: ({v1 controller: path}, v2 path)."""
    v1: dict[str, Path] = {}
    v2 = None
    for line in text.splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3]
        mount_point = Path(fields[4].replace("\\040", " "))
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup":
            for opt in options.split(","):
                v1.setdefault(opt, mount_point)
    return v1, v2


class V2Box:
    """A box cgroup on the unified hierarchy."""

    backend = CgroupHierarchy.V2
    cpu_source = "cgroup2 cpu.stat"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.applied: dict[str, AppliedLimit] = {}

    def open_entry(self) -> tuple[int, ...]:
        return (os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC),)

    def cpu_usage(self) -> CpuUsage:
        stat = _keyed(self.path / "cpu.stat")
        return CpuUsage(stat.get("user_usec", 0) / 1e6, stat.get("system_usec", 0) / 1e6)

    def memory_peak(self) -> int | None:
        try:
            return int(_read(self.path / "memory.peak"))
        except FileNotFoundError:
            return None

    def pids_peak(self) -> int | None:
        try:
            return int(_read(self.path / "pids.peak"))
        except FileNotFoundError:
            return None

    def oom_killed(self) -> bool:
        try:
            return _keyed(self.path / "memory.events").get("oom_kill", 0) > 0
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        # cgroup.kill (5.14+) kills every task atomically, including ones forking right now.
        if not _read(self.path / "cgroup.procs").strip():
            return
        _write(self.path / "cgroup.kill", "1")
        _wait_empty(self.path / "cgroup.procs")

    def destroy(self) -> None:
        if self.path.exists():
            self.kill()
            _rmdir(self.path)


class CgroupV2:
    """Backend for the unified hierarchy; ``parent`` must have memory and pids delegated."""

    name = CgroupHierarchy.V2
    CONTROLLERS = ("memory", "pids", "cpu", "cpuset")

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        if not os.access(parent, os.W_OK):
            raise HostError(f"cannot create cgroups in {parent}: not writable")
        available = _read(parent / "cgroup.controllers").split()
        missing = [c for c in ("memory", "pids") if c not in available]
        if missing:
            raise HostError(f"cgroup v2 at {parent} lacks controllers: {', '.join(missing)}")
        wanted = " ".join(f"+{c}" for c in self.CONTROLLERS if c in available)
        try:
            _write(parent / "cgroup.subtree_control", wanted)
        except OSError as e:
            raise HostError(f"cannot enable controllers in {parent}: {e.strerror}") from None
        self._remove_stale()

    @classmethod
    def under_own_cgroup(cls, mount: Path, own: str) -> CgroupV2:
        """Use (and create) ``<own cgroup>/sandbox``, or ``$SANDBOX_CGROUP_ROOT`` if set."""
        override = os.environ.get("SANDBOX_CGROUP_ROOT")
        if override:
            return cls(Path(override))
        own_dir = mount / own.lstrip("/")
        parent = own_dir / SUBTREE
        available = _read(own_dir / "cgroup.controllers").split()
        if not {"memory", "pids"} <= set(available):
            raise HostError(f"cgroup v2 at {own_dir} has no memory and pids controllers")
        try:
            parent.mkdir(exist_ok=True)
            _write(own_dir / "cgroup.subtree_control", "+memory +pids")
        except OSError as e:
            raise HostError(
                f"cannot delegate controllers below {own_dir}: {e.strerror}",
                hint="run inside a delegated cgroup (systemd-run --user --scope -p Delegate=yes) "
                "or set SANDBOX_CGROUP_ROOT to one",
            ) from None
        return cls(parent)

    def _remove_stale(self) -> None:
        for child in self.parent.glob("box-*"):
            if not _owner_alive(child.name):
                with contextlib.suppress(OSError, HostError):
                    V2Box(child).destroy()

    def create(self, limits: Limits) -> V2Box:
        path = self.parent / _box_name()
        path.mkdir()
        box = V2Box(path)
        applied = box.applied
        try:
            if limits.memory is not None:
                how = "cgroup2 memory.max"
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")
                    how += " (swap 0)"
                _write(path / "memory.oom.group", "1")
                _set(applied, "memory", limits.memory, path / "memory.max", str(limits.memory), how)
            if limits.pids is not None:
                pids = limits.pids
                _set(applied, "pids", pids, path / "pids.max", str(pids), "cgroup2 pids.max")
            if limits.cpu_quota is not None:
                text = f"{_quota_us(limits.cpu_quota)} {CPU_PERIOD_US}"
                _set(
                    applied,
                    "cpu_quota",
                    limits.cpu_quota,
                    path / "cpu.max",
                    text,
                    "cgroup2 cpu.max",
                )
            if limits.cpus is not None:
                if not (path / "cpuset.cpus").exists():
                    raise HostError("the cgroup v2 cpuset controller is not delegated here")
                _check_cpus(limits.cpus, self.parent / "cpuset.cpus.effective")
                text = format_cpu_list(limits.cpus)
                _set(
                    applied, "cpus", limits.cpus, path / "cpuset.cpus", text, "cgroup2 cpuset.cpus"
                )
        except BaseException:
            box.destroy()
            raise
        return box


class V1Box:
    """A box's cgroups on the v1 hierarchies (one directory per controller)."""

    backend = CgroupHierarchy.V1
    cpu_source = "cgroup1 cpuacct.usage"

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.applied: dict[str, AppliedLimit] = {}

    def open_entry(self) -> tuple[int, ...]:
        # A single thread writing "0" to ``tasks`` moves itself without the global threadgroup
        # lock that a write to cgroup.procs takes, whose first use costs an RCU grace period
        # (5-15 ms); the kernel checks the credentials of whoever opened the file, not of the
        # writer (cgroup-v1.c, __cgroup1_procs_write).
        return tuple(os.open(p / "tasks", os.O_WRONLY | os.O_CLOEXEC) for p in self.paths.values())

    def cpu_usage(self) -> CpuUsage:
        # cpuacct.usage is in ns; cpuacct.stat splits it only in USER_HZ ticks, so the split is
        # proportional and the total exact.
        total = int(_read(self.paths["cpuacct"] / "cpuacct.usage")) / 1e9
        ticks = _keyed(self.paths["cpuacct"] / "cpuacct.stat")
        user, system = ticks.get("user", 0), ticks.get("system", 0)
        share = user / (user + system) if user + system else 1.0
        return CpuUsage(total * share, total * (1 - share))

    def memory_peak(self) -> int | None:
        memory = self.paths["memory"]
        name = "memory.memsw.max_usage_in_bytes"
        if not (memory / name).exists():
            name = "memory.max_usage_in_bytes"
        return int(_read(memory / name))

    def pids_peak(self) -> int | None:
        try:  # pids.peak exists on v1 hierarchies since Linux 6.12
            return int(_read(self.paths["pids"] / "pids.peak"))
        except FileNotFoundError:
            return None

    def oom_killed(self) -> bool:
        return _keyed(self.paths["memory"] / "memory.oom_control").get("oom_kill", 0) > 0

    def kill(self) -> None:
        # Freeze first so nothing can fork between reading the task list and killing it
        # (cgroup-v1/freezer-subsystem.rst), then kill, thaw so the kills are delivered.
        freezer = self.paths.get("freezer")
        if freezer is None:  # a stale box half removed by its owner: no freezer left to use
            for path in self.paths.values():
                for line in _read(path / "cgroup.procs").split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line), signal.SIGKILL)
            return
        tasks = _read(freezer / "cgroup.procs").split()
        if not tasks:
            return  # already empty: freezing costs a millisecond for nothing
        for line in tasks:  # first stop what runs now, so no more CPU is burned while freezing
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)
        _write(freezer / "freezer.state", "FROZEN")
        deadline = time.monotonic() + 2.0
        while _read(freezer / "freezer.state").strip() != "FROZEN" and time.monotonic() < deadline:
            time.sleep(0.0002)
        for line in _read(freezer / "cgroup.procs").split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)
        _write(freezer / "freezer.state", "THAWED")
        _wait_empty(freezer / "cgroup.procs")

    def destroy(self) -> None:
        if all(p.exists() for p in self.paths.values()):
            self.kill()
        for path in self.paths.values():
            _rmdir(path)


class CgroupV1:
    """Backend for v1 hierarchies: memory (+memsw), pids, cpuacct, freezer; cpu and cpuset
    too for boxes whose limits need them (a box's cgroups cost ~0.1 ms per hierarchy)."""

    name = CgroupHierarchy.V1
    CONTROLLERS = ("memory", "pids", "cpuacct", "freezer")
    OPTIONAL = ("cpu", "cpuset")

    def __init__(self, parents: dict[str, Path], optional: dict[str, Path] | None = None) -> None:
        self.parents = parents
        self.optional = optional or {}
        self._ready: set[str] = set()
        for ctl, parent in parents.items():
            try:
                parent.mkdir(exist_ok=True)
                if not os.access(parent, os.W_OK):
                    raise PermissionError(errno.EACCES, "not writable")
            except OSError as e:
                raise HostError(
                    f"cannot create cgroups in {parent} ({ctl}): {e.strerror}",
                    hint="run as root, or use a host with cgroup v2 delegation",
                ) from None
        self._remove_stale()

    @classmethod
    def under_own_cgroups(cls, mounts: dict[str, Path], own: dict[str, str]) -> CgroupV1:
        """Use ``<own cgroup>/sandbox`` in each controller's hierarchy."""
        missing = [c for c in cls.CONTROLLERS if c not in mounts or c not in own]
        if missing:
            raise HostError("cgroup v1 controllers not mounted: " + ", ".join(missing))
        optional = {
            c: mounts[c] / own[c].lstrip("/") / SUBTREE
            for c in cls.OPTIONAL
            if c in mounts and c in own
        }
        return cls({c: mounts[c] / own[c].lstrip("/") / SUBTREE for c in cls.CONTROLLERS}, optional)

    def _remove_stale(self) -> None:
        every = {**self.parents, **self.optional}
        for child in self.parents["freezer"].glob("box-*"):
            if not _owner_alive(child.name):
                paths = {c: p / child.name for c, p in every.items() if (p / child.name).exists()}
                with contextlib.suppress(OSError, HostError):
                    V1Box(paths).destroy()

    def _optional_parent(self, ctl: str) -> Path:
        """The ``sandbox`` cgroup of an optional controller, made usable on first need."""
        if ctl not in self.optional:
            raise HostError(f"the cgroup v1 {ctl} controller is not mounted: cannot enforce it")
        parent = self.optional[ctl]
        if ctl not in self._ready:
            parent.mkdir(exist_ok=True)
            if ctl == "cpuset":
                # A new cpuset has no CPUs or memory nodes: take the enclosing cgroup's.
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if not _read(parent / name).strip():
                        _write(parent / name, _read(parent.parent / name).strip())
            self._ready.add(ctl)
        return parent

    def create(self, limits: Limits) -> V1Box:
        name = _box_name()
        parents = dict(self.parents)
        if limits.cpu_quota is not None:
            parents["cpu"] = self._optional_parent("cpu")
        if limits.cpus is not None:
            parents["cpuset"] = self._optional_parent("cpuset")
            _check_cpus(limits.cpus, parents["cpuset"] / "cpuset.effective_cpus")
        paths = {c: p / name for c, p in parents.items()}
        created: dict[str, Path] = {}
        box = V1Box(paths)
        applied = box.applied
        try:
            for ctl, path in paths.items():
                path.mkdir()
                created[ctl] = path
            memory = paths["memory"]
            if limits.memory is not None:
                text, how = str(limits.memory), "cgroup1 memory.limit_in_bytes"
                _set(applied, "memory", limits.memory, memory / "memory.limit_in_bytes", text, how)
                # memsw bounds memory+swap, so swapping cannot hide usage (cgroup-v1/memory.rst).
                memsw = memory / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    _set(applied, "memory", limits.memory, memsw, text, how + "+memsw")
            if limits.pids is not None:
                pids = paths["pids"] / "pids.max"
                _set(applied, "pids", limits.pids, pids, str(limits.pids), "cgroup1 pids.max")
            if limits.cpu_quota is not None:
                cpu = paths["cpu"]
                _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                quota = str(_quota_us(limits.cpu_quota))
                how = "cgroup1 cpu.cfs_quota_us"
                _set(applied, "cpu_quota", limits.cpu_quota, cpu / "cpu.cfs_quota_us", quota, how)
            if limits.cpus is not None:
                cpuset = paths["cpuset"]
                _write(cpuset / "cpuset.mems", _read(cpuset.parent / "cpuset.mems").strip())
                text, how = format_cpu_list(limits.cpus), "cgroup1 cpuset.cpus"
                _set(applied, "cpus", limits.cpus, cpuset / "cpuset.cpus", text, how)
        except BaseException:
            for path in created.values():
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return box


def _quota_us(cpus: float) -> int:
    return max(int(cpus * CPU_PERIOD_US), 1000)


def _check_cpus(cpus: tuple[int, ...], effective: Path) -> None:
    available = set(parse_cpu_list(_read(effective).strip() or "0"))
    missing = sorted(set(cpus) - available)
    if missing:
        raise HostError(
            f"cpus {format_cpu_list(tuple(missing))} are not available here "
            f"(available: {format_cpu_list(tuple(sorted(available)))})"
        )


def detect() -> CgroupBackend:
    """The best backend on this host: v2 with memory and pids, else v1; HostError if neither."""
    v1_mounts, v2_mount = parse_mountinfo(_read(Path("/proc/self/mountinfo")))
    own = parse_proc_cgroup(_read(Path("/proc/self/cgroup")))
    reasons = []
    if v2_mount is not None and "" in own:
        try:
            return CgroupV2.under_own_cgroup(v2_mount, own[""])
        except (HostError, OSError) as e:
            reasons.append(f"v2: {e}")
    if v1_mounts:
        try:
            return CgroupV1.under_own_cgroups(v1_mounts, own)
        except (HostError, OSError) as e:
            reasons.append(f"v1: {e}")
    raise HostError(
        "no usable cgroup hierarchy (" + "; ".join(reasons or ["none mounted"]) + ")",
        hint="run as root, set SANDBOX_CGROUP_ROOT to a delegated cgroup v2 subtree, "
        'or allow `fallback = "rlimit"` in the profile',
    )


_backend_cache: CgroupBackend | HostError | None = None


def backend() -> CgroupBackend | HostError:
    """The host's cgroup backend (detected once per process), or why there is none."""
    global _backend_cache
    if _backend_cache is None:
        try:
            _backend_cache = detect()
        except HostError as e:
            _backend_cache = e
    return _backend_cache


# --- child side (the native runner joins the box cgroup itself, boxinit.c) -----------------


def child_unshare_cgroup(k: KernelOps, plan: ChildPlan) -> None:
    """The program's cgroup becomes the root of its cgroup namespace: no host cgroup path
    shows in ``/proc/self/cgroup``."""
    k.unshare(CLONE_NEWCGROUP)
