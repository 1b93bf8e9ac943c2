"""CPU and memory limits for the box's whole process tree without cgroups.

Rlimits are per process: RLIMIT_CPU and RLIMIT_AS let twelve processes of 240 MiB each run
under a 256 MiB limit. Without a cgroup the box's init enforces both limits instead: it is pid 1
of the box's pid namespace, so its ``/proc`` lists every process of the box and nothing else,
and it samples them from its reap loop (it is the only process the program cannot signal or
trace, see ``protect_init``):

* CPU: ``utime + stime + cutime + cstime`` of ``/proc/PID/stat`` for every live process (the
  last two hold the children it reaped) plus init's own ``RUSAGE_CHILDREN`` (the program's
  process and the orphans init reaped). Init itself (pid 1) is never counted.
* memory: ``RssAnon + RssShmem + VmSwap`` of ``/proc/PID/status`` for every process, plus the
  resident and swapped pages of SysV shared memory segments no process has attached (listed in
  ``/proc/sysvipc/shm`` for the box's own IPC namespace). Pages shared between processes (after
  fork, or MAP_SHARED) are counted once per process: the sum is an upper bound.

Only files the kernel fills without taking the target's mmap lock are read (``smaps`` would
let the program stall init by holding it). When a limit is passed, init sends SIGKILL to every
process of its namespace (kill(2) with pid -1 skips only init) and its caller reports it.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import signal
import time
from typing import NamedTuple

from ..kernel import KernelOps
from ..limits import Limits
from ..protocol import Tree
from ..report import AppliedLimit, StopReason

#: How the report names the mechanisms (docs/profiles.md, "Without cgroups").
CPU_MECHANISM = "box init sampling /proc (CPU of every process); RLIMIT_CPU per process"
MEMORY_MECHANISM = (
    "box init sampling /proc (RssAnon+RssShmem+VmSwap of every process, SysV shm); "
    "RLIMIT_AS per process"
)
#: Memory sampling interval while the box uses CPU, and the longest one once it is idle:
#: memory only grows while the box runs (its page faults are its own CPU time).
ACTIVE_INTERVAL = 0.005
IDLE_INTERVAL = 0.1
#: The shortest wait before the next CPU check (stat's figures move in clock ticks anyway).
MIN_CPU_WAIT = 0.002
_TICK = os.sysconf("SC_CLK_TCK")
_GONE = (errno.ENOENT, errno.ESRCH)  # the process ended between listing and reading


# A NamedTuple rather than a dataclass: made at import several times faster, and every run
# imports this module (docs/performance.md).
class TreeLimits(NamedTuple):
    """What init enforces: ``cpu_time`` (seconds, limit plus grace) and ``memory`` (bytes)."""

    cpu_time: float | None
    memory: int | None


def applied(tree: TreeLimits, limits: Limits) -> dict[str, AppliedLimit]:
    """The limits ``tree`` makes init enforce, as the report shows them."""
    out = {}
    if tree.cpu_time is not None:
        out["cpu_time"] = AppliedLimit(limits.cpu_time, CPU_MECHANISM)
    if tree.memory is not None:
        out["memory"] = AppliedLimit(tree.memory, MEMORY_MECHANISM)
    return out


class Sample(NamedTuple):
    """One reading of the whole tree."""

    user: float  # seconds
    system: float
    memory: int  # bytes; 0 when memory is not limited (not read)


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    try:
        return os.read(fd, 16384)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    finally:
        os.close(fd)


def _cpu_ticks(pid: str) -> tuple[int, int]:
    data = _read(f"/proc/{pid}/stat")
    if data is None:
        return 0, 0
    # The command name (field 2) may hold spaces and parentheses: fields restart after the
    # last ')'. utime, stime, cutime, cstime are fields 14-17 (proc(5)).
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime + cutime, stime + cstime


def _memory(pid: str) -> int:
    data = _read(f"/proc/{pid}/status")
    if data is None:
        return 0
    total = 0
    for line in data.splitlines():
        if line.startswith((b"RssAnon:", b"RssShmem:", b"VmSwap:")):
            total += int(line.split()[1]) * 1024
    return total


def _detached_shm() -> int:
    """Bytes of SysV segments no process maps (mapped ones are in their RssShmem)."""
    data = _read("/proc/sysvipc/shm")
    if data is None:
        return 0
    lines = data.splitlines()
    header = lines[0].split()
    nattch, rss, swap = (header.index(name) for name in (b"nattch", b"rss", b"swap"))
    total = 0
    for line in lines[1:]:
        cols = line.split()
        if int(cols[nattch]) == 0:
            total += int(cols[rss]) + int(cols[swap])
    return total


def sample(memory: bool) -> Sample:
    """Read the tree as init sees it (call only from the box's init)."""
    user_ticks = system_ticks = 0
    mem = _detached_shm() if memory else 0
    # Ascending pids, so parents come before the children they may reap meanwhile: a race
    # then misses a child for one sample instead of counting it twice.
    pids = sorted((p for p in os.listdir("/proc") if p.isdigit() and p != "1"), key=int)
    for pid in pids:
        u, s = _cpu_ticks(pid)
        user_ticks, system_ticks = user_ticks + u, system_ticks + s
        if memory:
            mem += _memory(pid)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Sample(user_ticks / _TICK + reaped.ru_utime, system_ticks / _TICK + reaped.ru_stime, mem)


class TreeWatch:
    """Init's reap loop with the limits: wait for a child or the next sample, whichever first.

    Reaping never blocks (WNOHANG) and a sample is taken whenever one is due, so neither a
    flood of exiting children nor a silent program keeps the other from happening.
    """

    def __init__(self, limits: TreeLimits, k: KernelOps) -> None:
        self.limits, self.k = limits, k
        # Any CPU of the host may run a box process at once (it may change its own affinity).
        self.cpus = os.cpu_count() or 1
        self.fired: StopReason | None = None
        self.last = Sample(0.0, 0.0, 0)
        self.memory_peak = 0
        self.sampled_at = time.monotonic_ns()
        self.interval = ACTIVE_INTERVAL
        self.due = time.monotonic()
        # Blocked, SIGCHLD stays pending for sigtimedwait instead of being discarded (its
        # default action is to ignore it; signal(7)). The program's process resets its mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})

    def step(self) -> tuple[StopReason | None, tuple[int, int, resource.struct_rusage] | None]:
        """(limit that fired in this step, reaped child): either may be None."""
        reaped = self._reap()
        fired = None
        if time.monotonic() >= self.due:
            fired = self.check()
        elif reaped is None:
            signal.sigtimedwait({signal.SIGCHLD}, max(self.due - time.monotonic(), 0.0))
        return fired, reaped

    def check(self) -> StopReason | None:
        """Sample now; kill the box when a limit is passed. Returns the limit that fired."""
        now = self.sample()
        if self.fired is not None:  # killed already: anything left is killed again
            self._kill_all()
            return None
        if self.limits.cpu_time is not None and now.user + now.system >= self.limits.cpu_time:
            self.fired = StopReason.CPU_TIME
        elif self.limits.memory is not None and now.memory > self.limits.memory:
            self.fired = StopReason.MEMORY
        if self.fired is not None:
            self._kill_all()
        return self.fired

    def sample(self) -> Sample:
        """Sample now and plan the next one."""
        previous, now = self.last, sample(self.limits.memory is not None)
        self.last, self.sampled_at = now, time.monotonic_ns()
        self.memory_peak = max(self.memory_peak, now.memory)
        used = now.user + now.system
        busy = used > previous.user + previous.system
        self.interval = ACTIVE_INTERVAL if busy else min(self.interval * 2, IDLE_INTERVAL)
        wait = self.interval if self.limits.memory is not None else math.inf
        if self.limits.cpu_time is not None:
            # The tree cannot use CPU faster than on every CPU at once.
            wait = min(wait, max((self.limits.cpu_time - used) / self.cpus, MIN_CPU_WAIT))
        if self.fired is not None:
            wait = IDLE_INTERVAL
        self.due = time.monotonic() + wait
        return now

    def message(self, limit: str) -> Tree:
        """The last sample as the message to the supervisor, for ``limit`` ("" for none)."""
        return Tree(
            limit=limit,
            at=self.sampled_at,
            user_us=round(self.last.user * 1e6),
            system_us=round(self.last.system * 1e6),
            memory_peak=self.memory_peak,
        )

    def _reap(self) -> tuple[int, int, resource.struct_rusage] | None:
        try:
            pid, status, usage = self.k.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        return (pid, status, usage) if pid else None

    def _kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # nothing left to kill
            self.k.kill(-1, signal.SIGKILL)
