"""The child's phase order, checked against a recording kernel (no privileges needed)."""

import os
import resource
import signal

import pytest

from sandbox import child, protocol
from sandbox.box import descriptors
from sandbox.box.plan import RootPlan
from sandbox.kernel import CLONE_NEWCGROUP, CLONE_NEWUSER
from sandbox.spec import NetworkMode


class Exited(Exception):
    """The recording kernel's ``exit``: the process body ended with this code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class RecordingKernel:
    """Records every call by name. Queries answer as on a healthy host (the parent is the
    supervisor, the sync socket is open, the root is announced); ``forks`` are the pids
    ``fork`` returns in turn and ``reaped`` what ``wait4`` reaps; ``exit`` raises
    :class:`Exited`; install_seccomp returns a real (harmless) descriptor."""

    QUERIES = ("parent_pid", "hung_up")

    def __init__(self, forks: tuple[int, ...] = (), reaped: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.forks, self.reaped = list(forks), list(reaped)
        self.supervisor_pid = os.getppid()

    def __getattr__(self, name: str):
        def record(*args: object, **kwargs: object) -> object:
            self.calls.append((name, args))
            if name == "install_seccomp":
                return os.open(os.devnull, os.O_RDONLY)
            if name == "parent_pid":
                return self.supervisor_pid
            if name == "hung_up":
                return False
            if name == "read":
                return b"1"
            if name == "fork":
                return self.forks.pop(0)
            if name == "wait4":
                return self.reaped.pop(0), 0, resource.getrusage(resource.RUSAGE_SELF)
            if name == "exit":
                raise Exited(int(args[0]))  # type: ignore[call-overload]
            return None
        return record

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls if name not in self.QUERIES]


@pytest.fixture
def plan():
    ours, theirs = protocol.socketpair()
    root = RootPlan(layers=(), binds=(), tmp_size=1, work_size=1, workdir="/box",
                    noexec_tmp=False, uid=1000, gid=1000)
    p = child.ChildPlan(argv=("/bin/true",), env={"PATH": "/bin"}, hostname="box",
                        network=NetworkMode.NONE, address=None, uid=1000, gid=1000,
                        drop_groups=True, creator_uid=100_000_005,
                        counter_limits=((11, 1024),), root=root,
                        rlimits=((4, 0),), stdio=(0, 1, 2), sync=theirs, bpf=b"\0" * 8,
                        listener=True, supervisor_pid=os.getppid(), root_ready=os.pipe())
    os.write(p.root_ready[1], b"1")
    yield p, ours
    ours.close()
    theirs.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def test_setup_phases_drop_groups_then_unshare_user_first_then_wait_for_maps(plan):
    p, supervisor = plan
    supervisor.send(protocol.encode(protocol.Go()))
    k = RecordingKernel()
    child._run_phases(k, p, child.SETUP_PHASES)
    assert k.names == ["set_pdeathsig", "close_fds_except", "setgroups", "setrlimit", "seteuid",
                       "set_pdeathsig", "unshare"]
    # Each parent-death signal is followed by the check that the supervisor is still there.
    assert [n for n, _ in k.calls].count("parent_pid") == 2
    calls = [c for c in k.calls if c[0] not in k.QUERIES]
    # The box's host uid creates the user namespace, with its counters bounded first, and the
    # parent-death signal that the uid change cleared is set again.
    assert calls[4][1] == (100_000_005,) and calls[3][1] == (11, 1024)
    flags = calls[6][1][0]
    assert flags & CLONE_NEWUSER and not flags & CLONE_NEWCGROUP
    assert isinstance(protocol.receive(supervisor).message, protocol.Unshared)


def test_program_phases_end_with_privileges_dropped_then_seccomp_then_execve(plan):
    p, supervisor = plan
    k = RecordingKernel()
    child._run_phases(k, p, child.PROGRAM_PHASES)
    child.exec_program(k, p)
    names = k.names
    # The documented final steps are the ones really taken, last, in this order.
    assert names[-2:] == ["install_seccomp", "execve"] == list(child.FINAL_STEPS)
    assert names.index("set_no_new_privs") < names.index("install_seccomp")
    assert names.index("drop_capabilities") < names.index("install_seccomp")
    # ids change before capabilities go (setresuid needs CAP_SETUID in the namespace) ...
    assert names.index("setresuid") < names.index("drop_capabilities")
    # ... the cgroup namespace is made while caps remain ...
    assert names.index("unshare") < names.index("setresuid")
    # ... and fds are closed after stdio is in place, so only 0-2 and sync survive.
    assert names.index("dup2") < names.index("close_fds_except")
    # ... and the program starts with default signal dispositions and an empty mask.
    assert names.index("unblock_signals") < names.index("install_seccomp")
    assert k.calls[names.index("close_fds_except")][1][0] == (0, 1, 2, p.sync.fileno())
    assert names[:2] == ["close", "read"]  # it waits for the root before all else
    assert isinstance(protocol.receive(supervisor).message, protocol.Exec)


def test_phase_lists_keep_the_documented_order():
    assert [child.phase_name(f) for f in child.INIT_EARLY_PHASES] == ["die_with_parent"]
    init = [child.phase_name(f) for f in child.INIT_PHASES]
    assert init[0] == "mount_root" and init[1] == "rearm_death_signal"
    assert init.index("protect_init") < init.index("announce_root") == len(init) - 1
    program = [child.phase_name(f) for f in child.PROGRAM_PHASES]
    assert program[0] == "await_root"  # in the new root first
    assert program[-3:] == ["no_new_privs", "drop_capabilities", "reset_signals"]


def test_a_failing_phase_is_reported_with_its_name_and_errno(plan):
    p, _ = plan

    class Failing(RecordingKernel):
        def setsid(self) -> None:
            raise OSError(1, "Operation not permitted", "setsid")

    p.sync.send(b"")  # unused; keeps the socket busy-free
    with pytest.raises(child.PhaseError) as info:
        child._run_phases(Failing(), p, (descriptors.child_new_session,))
    assert (info.value.phase, info.value.err, info.value.op) == ("new_session", 1, "setsid")


def test_a_missing_program_is_reported_before_seccomp(plan):
    p, supervisor = plan
    p = child.ChildPlan(**{**p.__dict__, "argv": ("no-such-program",)})  # type: ignore[arg-type]
    k = RecordingKernel()
    child.exec_program(k, p)
    assert "install_seccomp" not in k.names
    failed = protocol.receive(supervisor).message
    assert isinstance(failed, protocol.ExecError) and failed.errno == 2


def test_program_lookup_follows_path_like_execvp(tmp_path):
    exe = tmp_path / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "plain").write_text("")
    env = {"PATH": f"/nonexistent:{tmp_path}"}
    assert child.resolve_program("tool", env) == str(exe)
    assert child.resolve_program("./x", env) == "./x"
    with pytest.raises(FileNotFoundError):
        child.resolve_program("plain", env)


def test_the_root_is_built_in_the_documented_order():
    """As root (detached trees): "/" private first, files made as the box's ids, the overlay
    before the mounts on it, binds before /dev and /proc, the root made read-only, then
    pivot_root and the old root detached; every mount point is made through the kernel ops."""
    from sandbox.box.mounts import build_root
    from sandbox.box.plan import HostDir, MountSource
    from sandbox.hostpath import CheckedPath

    def tree(path: str, is_dir: bool = True) -> HostDir:
        return HostDir(CheckedPath(path, 1, 2, is_dir), os.open(os.devnull, os.O_RDONLY))

    plan = RootPlan(
        layers=(tree("/nonexistent/layer"),),
        binds=(MountSource(tree("/nonexistent/src"), "/box/in", False),),
        tmp_size=1 << 20, work_size=1 << 20, workdir="/box", noexec_tmp=False,
        uid=1000, gid=1000,
    )
    k = RecordingKernel()
    build_root(k, plan)
    names = k.names
    assert k.calls[0] == ("mount", (None, "/", None, 0x4000 | 0x40000))  # MS_REC | MS_PRIVATE
    assert names[1] == "set_fsids"  # before anything is created
    mounts = [args[1] for name, args in k.calls if name == "mount"]
    overlay = next(i for i, (n, a) in enumerate(k.calls) if n == "mount" and a[2] == "overlay")
    first_made = min(i for i, n in enumerate(names) if n in ("mkdir", "make_dirs", "make_file"))
    assert first_made > 1
    assert mounts.index("/tmp/root/tmp") > mounts.index("/tmp/root")  # on top of the overlay
    attach = [args[1] for name, args in k.calls if name == "attach_tree"]
    assert attach == ["/tmp/layer0", "/tmp/root/box/in"]  # the layer, then the bind
    assert names.index("attach_tree") < overlay < len(names) - names[::-1].index("attach_tree")
    proc = next(i for i, (n, a) in enumerate(k.calls) if n == "mount" and a[2] == "proc")
    assert proc < names.index("pivot_root")  # a proc mount needs a fully visible proc
    assert [n for n in names if n == "symlink"] == ["symlink"] * 5  # /dev/fd, stdio, shm
    assert names[-4:] == ["chdir", "pivot_root", "umount2", "chdir"]
    root_ro = [a for n, a in k.calls if n == "mount_setattr" and a[0] == "/tmp/root"]
    assert root_ro and names.index("pivot_root") > max(
        i for i, (n, a) in enumerate(k.calls) if n == "mount_setattr" and a[0] == "/tmp/root"
    )


def _without_root_building(names: list[str]) -> list[str]:
    """The calls around the root builder's (its own order is checked above)."""
    building = {"mount", "set_fsids", "mkdir", "make_dirs", "make_file", "symlink",
                "mount_setattr", "attach_tree", "pivot_root", "umount2", "chdir"}
    return [n for n in names if n not in building]


def test_the_python_init_forks_its_program_first_then_builds_the_root_and_reaps_it(plan):
    p, supervisor = plan
    k = RecordingKernel(forks=(42,), reaped=(41, 42))  # a stray child first, then the program
    assert child._init(k, p) == 0
    names = k.names
    # The program's process is forked before the root exists (it waits for it meanwhile).
    assert names.index("fork") < names.index("mount")
    assert _without_root_building(names) == [
        "set_pdeathsig", "fork", "close",  # root_ready's read end
        "set_pdeathsig", "sethostname", "set_dumpable", "write", "close",
        "default_signal", "wait4", "wait4",
    ]
    assert ("write", (p.root_ready[1], b"1")) in k.calls  # the root is announced last
    exited = protocol.receive(supervisor).message
    assert isinstance(exited, protocol.Exited) and exited.status == 0


def test_the_python_inits_program_process_runs_its_phases_after_the_fork(plan):
    p, supervisor = plan
    k = RecordingKernel(forks=(0,))
    with pytest.raises(Exited):  # execve "returned" here; the process ends, never unwinds
        child._init(k, p)
    names = k.names
    assert names[:4] == ["set_pdeathsig", "fork", "close", "read"]  # it waits for the root
    assert "mount" not in names  # the root is init's job
    assert names[-3:] == ["install_seccomp", "execve", "exit"]
    assert isinstance(protocol.receive(supervisor).message, protocol.Exec)


def _native(p):
    return child.ChildPlan(**{**p.__dict__, "native_init": 5,  # type: ignore[arg-type]
                              "init_ids": (4_000_000_000, 4_000_000_000)})


def test_the_native_setup_process_forks_init_then_waits_as_boxinit_hold(plan):
    p, supervisor = plan
    supervisor.send(protocol.encode(protocol.Go()))
    k = RecordingKernel(forks=(42,), reaped=(42,))
    child._setup(k, _native(p))
    names = k.names
    assert names[names.index("fork"):] == ["fork", "set_real_ids", "exec_fd", "wait4"]
    # A waits with init's ids, so the parent-death signal may reach init (kill(2)).
    assert ("set_real_ids", (4_000_000_000, 4_000_000_000)) in k.calls
    assert ("exec_fd", (5, ("boxinit", "hold", str(p.supervisor_pid)))) in k.calls


def test_the_native_init_builds_the_root_then_becomes_boxinit_keeping_its_capabilities(plan):
    from sandbox.box.caps import NATIVE_INIT_CAPABILITIES

    p, supervisor = plan
    supervisor.send(protocol.encode(protocol.Go()))
    k = RecordingKernel(forks=(0,))
    with pytest.raises(Exited) as ended:
        child._setup(k, _native(p))
    assert ended.value.code == child.EXIT_SETUP_FAILED  # exec_fd "returned"
    names = k.names
    init = names[names.index("fork") + 1:]
    assert init[0] == "set_pdeathsig" and init[1] == "mount"  # dies with A, then the root
    sync = p.sync.fileno()
    assert _without_root_building(init) == [
        "set_pdeathsig", "set_pdeathsig", "sethostname", "close_fds_except", "set_inheritable",
        "set_real_ids", "keep_capabilities_across_exec", "set_pdeathsig", "exec_fd", "exit",
    ]
    assert ("close_fds_except", ((sync, 5),)) in k.calls
    assert ("set_real_ids", (4_000_000_000, 4_000_000_000)) in k.calls
    assert ("keep_capabilities_across_exec", (NATIVE_INIT_CAPABILITIES,)) in k.calls
    assert ("exec_fd", (5, ("boxinit", "init", str(sync)))) in k.calls
    assert isinstance(protocol.receive(supervisor).message, protocol.Unshared)
    failed = protocol.receive(supervisor).message
    assert isinstance(failed, protocol.SetupError) and failed.phase == "become_native_init"


def test_every_phase_is_a_child_step_of_its_concern_module():
    """A reader finds each step in the module of its kernel concern, named for its side."""
    lists = (child.SETUP_PHASES, child.NATIVE_INIT_PHASES, child.INIT_EARLY_PHASES,
             child.INIT_PHASES, child.PROGRAM_PHASES)
    for phase in (f for phases in lists for f in phases):
        assert phase.__name__.startswith("child_"), phase
        assert phase.__module__.startswith("sandbox.box."), phase
