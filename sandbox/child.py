"""The child side of a run: three processes, each a straight list of phases, then ``execve``.

::

    supervisor
      └─ setup (A): drops host ids, unshares namespaces, waits for its id maps, forks, then
         becomes ``boxinit hold`` (it only waits):
          └─ init (B): pid 1 of the new pid namespace; builds the root, then becomes the native
             ``boxinit init`` (sandbox/native/boxinit.c), which forks, reaps and reports:
              └─ runner (C): joins the box cgroup, receives its run, drops every privilege,
                 seccomp, execve (native; its steps are listed in boxinit.c)

The two ``execve`` into the static boxinit binary replace the interpreter: an idle box costs the
host a few hundred KiB, and the program starts from a small process, so its rusage is its own.
Without a cgroup (a rootless host without delegation), init stays in Python to sample the whole
tree (treelimits.py), and C is a fork of it running :data:`PROGRAM_PHASES`.

Each step is a ``child_`` function of the module of its kernel concern (sandbox/box/: userns,
mounts, cgroups, rlimits, caps, descriptors, uts, network, pidns, seccomp); this module only
says in which process and in which order they run. The order is data (:data:`SETUP_PHASES`,
:data:`INIT_PHASES`, :data:`PROGRAM_PHASES`, :data:`NATIVE_INIT_PHASES`), and every
operation goes through the kernel object, forks and waits included, so unit tests run these
processes' whole bodies against a recording kernel. Rules this code keeps (docs/architecture.md,
"Processes and threads" and "Why this shape"):

* it never logs, never takes a lock and never returns into the caller's stack: every process
  ends in ``os._exit``; a failure is sent to the supervisor as a structured message;
* the box cgroup holds only the program's process tree, so setup costs no CPU or memory there;
* seccomp is installed last, right before ``execve``, after ``no_new_privs`` and the capability
  drop (seccomp(2): without no_new_privs an unprivileged filter install fails, and anything
  between the filter and execve would have to be allowed by it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from . import protocol
from .box import caps, cgroups, descriptors, mounts, network, pidns, rlimits, seccomp, userns, uts
from .box.plan import ChildPlan, Phase, PhaseError
from .kernel import KernelOps

__all__ = ["EXIT_SETUP_FAILED", "ChildPlan", "PhaseError", "start"]

EXIT_SETUP_FAILED = 125

#: The setup process (A), forked by the supervisor.
SETUP_PHASES: tuple[Phase, ...] = (
    pidns.child_die_with_supervisor,
    descriptors.child_isolate_fds,
    userns.child_drop_groups,
    rlimits.child_bound_counters,
    userns.child_become_box_owner,
    userns.child_unshare_namespaces,
    userns.child_await_id_maps,
)

#: pid 1 with the native init: the root, then boxinit does the rest (boxinit.c).
NATIVE_INIT_PHASES: tuple[Phase, ...] = (
    pidns.child_die_with_parent,
    mounts.child_mount_root,
    pidns.child_rearm_death_signal,
    uts.child_set_hostname,
    network.child_set_up_network,
    pidns.child_become_native_init,
)

#: The Python init (no cgroup), before it forks the program's process. It is forked this early
#: so the program's process is waiting while the root is built.
INIT_EARLY_PHASES: tuple[Phase, ...] = (pidns.child_die_with_parent,)
INIT_PHASES: tuple[Phase, ...] = (
    mounts.child_mount_root,
    pidns.child_rearm_death_signal,
    uts.child_set_hostname,
    network.child_set_up_network,
    pidns.child_protect_init,
    mounts.child_announce_root,
)

#: The Python init's program process (C), forked by init.
PROGRAM_PHASES: tuple[Phase, ...] = (
    mounts.child_await_root,
    cgroups.child_unshare_cgroup,
    userns.child_switch_ids,
    descriptors.child_new_session,
    rlimits.child_set_rlimits,
    descriptors.child_set_stdio,
    descriptors.child_close_fds,
    caps.child_no_new_privs,
    caps.child_drop_capabilities,
    pidns.child_reset_signals,
)

#: The two steps after every phase above: the filter, then execve (see :func:`exec_program`).
FINAL_STEPS = ("install_seccomp", "execve")


def phase_name(phase: Phase) -> str:
    """``child_set_hostname`` -> ``set_hostname``: the name reports and docs use."""
    return phase.__name__.removeprefix("child_")


def _run_phases(k: KernelOps, plan: ChildPlan, phases: tuple[Phase, ...]) -> None:
    for phase in phases:
        try:
            phase(k, plan)
        except PhaseError:
            raise
        except OSError as e:
            name = phase_name(phase)
            raise PhaseError(
                name, str(e.filename or name), e.errno or 0, e.strerror or ""
            ) from None
        except Exception as e:  # report anything; this process must not unwind
            raise PhaseError(phase_name(phase), type(e).__name__, 0, str(e)) from None


def resolve_program(argv0: str, env: dict[str, str]) -> str:
    """Find ``argv0`` like execvp(3) does, inside the box's root and with the box's PATH."""
    if "/" in argv0:
        return argv0
    for directory in env.get("PATH", "/usr/bin:/bin").split(":"):
        candidate = os.path.join(directory or ".", argv0)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, "not found", argv0)


def exec_program(k: KernelOps, plan: ChildPlan) -> None:
    """Install seccomp and execve. Between the two only ``sendmsg`` and ``execve`` run."""
    try:
        path = resolve_program(plan.argv[0], plan.env)
    except FileNotFoundError:
        protocol.send(plan.sync, protocol.ExecError(errno=2))
        return
    try:
        listener = seccomp.child_install(k, plan)
    except OSError as e:
        raise PhaseError("install_seccomp", "seccomp", e.errno or 0) from None
    # CLOCK_MONOTONIC is one clock for every namespace (no time namespace is made), so the
    # supervisor can measure wall time from this instant rather than from its own wake-up.
    # This process is in no box cgroup (the Python init runs only without one; the box init's
    # figures are the whole tree's): none of the cgroup's CPU is the sandbox's.
    protocol.send(
        plan.sync,
        protocol.Exec(at=time.monotonic_ns(), cpu_ns=0),
        fds=(listener,) if plan.listener else (),
    )
    try:
        k.execve(path, plan.argv, plan.env)
    except OSError as e:
        protocol.send(plan.sync, protocol.ExecError(errno=e.errno or 0))


def _report(plan: ChildPlan, e: PhaseError) -> None:
    with contextlib.suppress(OSError):  # the supervisor is gone: exiting is all that is left
        message = protocol.SetupError(e.phase, e.op[:200], e.err, e.detail[:500])
        protocol.send(plan.sync, message)


def _program(k: KernelOps, plan: ChildPlan) -> None:
    _run_phases(k, plan, PROGRAM_PHASES)
    exec_program(k, plan)


def _init(k: KernelOps, plan: ChildPlan) -> int:
    """pid 1: native (with a cgroup), or fork the program's process early, set up, and reap
    every child until it exits."""
    if plan.native_init is not None:
        _run_phases(k, plan, NATIVE_INIT_PHASES)
        raise PhaseError("become_native_init", "execve returned", 0)
    _run_phases(k, plan, INIT_EARLY_PHASES)
    program = k.fork()
    if program == 0:
        _in_child(k, plan, _program)
    k.close(plan.root_ready[0])
    _run_phases(k, plan, INIT_PHASES)
    pidns.child_reap_until_the_program_exits(k, plan, program)
    return 0


def _setup(k: KernelOps, plan: ChildPlan) -> int:
    _run_phases(k, plan, SETUP_PHASES)
    init = k.fork()
    if init == 0:
        _in_child(k, plan, _init)
    if plan.native_init is not None:
        try:  # nothing is left for Python here
            pidns.child_hold(k, plan)
        except OSError as e:
            raise PhaseError("hold", "execve boxinit", e.errno or 0) from None
    _, status, _ = k.wait4(init, 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


def _in_child(
    k: KernelOps, plan: ChildPlan, body: Callable[[KernelOps, ChildPlan], object]
) -> None:
    """Run ``body`` in a freshly forked process and never return into the caller's stack."""
    code = EXIT_SETUP_FAILED
    try:
        result = body(k, plan)
        code = result if isinstance(result, int) else EXIT_SETUP_FAILED
    except PhaseError as e:
        _report(plan, e)
    except BaseException as e:
        _report(plan, PhaseError("child", type(e).__name__, 0, str(e)))
    finally:
        k.exit(code)


def start(k: KernelOps, plan: ChildPlan) -> int:
    """Fork the setup process; returns its pid. Call only from a single-threaded process."""
    pid = k.fork()
    if pid == 0:
        _in_child(k, plan, _setup)
    return pid
