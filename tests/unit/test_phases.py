"""The child's phase order, checked against a recording kernel (no privileges needed)."""

import os
import signal

import pytest

from sandbox import child, protocol
from sandbox.box.mounts import RootPlan
from sandbox.kernel import CLONE_NEWCGROUP, CLONE_NEWUSER
from sandbox.spec import NetworkMode


class RecordingKernel:
    """Records every call by name; install_seccomp returns a real (harmless) descriptor."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def __getattr__(self, name: str):
        def record(*args: object, **kwargs: object) -> object:
            self.calls.append((name, args))
            if name == "install_seccomp":
                return os.open(os.devnull, os.O_RDONLY)
            return None
        return record

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


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
                        listener=True, supervisor_pid=os.getppid(), root_ready=os.pipe(),
                        cgroup_entry=(7, 8))
    os.write(p.root_ready[1], b"1")
    yield p, ours
    ours.close()
    theirs.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def test_setup_phases_drop_groups_then_unshare_user_first_then_wait_for_maps(plan):
    p, supervisor = plan
    supervisor.send(protocol.encode(protocol.GO))
    k = RecordingKernel()
    child._run_phases(k, p, child.SETUP_PHASES)
    assert k.names == ["set_pdeathsig", "close_fds_except", "setgroups", "setrlimit", "seteuid",
                       "set_pdeathsig", "unshare"]
    # The box's host uid creates the user namespace, with its counters bounded first, and the
    # parent-death signal that the uid change cleared is set again.
    assert k.calls[4][1] == (100_000_005,) and k.calls[3][1] == (11, 1024)
    flags = k.calls[6][1][0]
    assert flags & CLONE_NEWUSER and not flags & CLONE_NEWCGROUP
    assert protocol.receive(supervisor).kind == protocol.UNSHARED


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
    # ... the cgroup namespace is made after joining the cgroup, while caps remain ...
    assert names.index("unshare") < names.index("setresuid")
    # ... and fds are closed after stdio is in place, so only 0-2 and sync survive.
    assert names.index("dup2") < names.index("close_fds_except")
    assert k.calls[names.index("close_fds_except")][1][0] == (0, 1, 2, p.sync.fileno())
    assert names[:2] == ["join_cgroup", "join_cgroup"]  # one per entry file, before all else
    assert protocol.receive(supervisor).kind == protocol.EXEC


def test_phase_lists_keep_the_documented_order():
    assert [f.__name__ for f in child.INIT_EARLY_PHASES] == ["die_with_parent"]
    init = [f.__name__ for f in child.INIT_PHASES]
    assert init[0] == "mount_root" and init[1] == "rearm_death_signal"
    assert init.index("protect_init") < init.index("announce_root") == len(init) - 1
    program = [f.__name__ for f in child.PROGRAM_PHASES]
    assert program[:2] == ["join_cgroup", "await_root"]  # joined and in the new root first
    assert program[-2:] == ["no_new_privs", "drop_capabilities"]


def test_a_failing_phase_is_reported_with_its_name_and_errno(plan):
    p, _ = plan

    class Failing(RecordingKernel):
        def setsid(self) -> None:
            raise OSError(1, "Operation not permitted", "setsid")

    p.sync.send(b"")  # unused; keeps the socket busy-free
    with pytest.raises(child.PhaseError) as info:
        child._run_phases(Failing(), p, (child.new_session,))
    assert (info.value.phase, info.value.err, info.value.op) == ("new_session", 1, "setsid")


def test_a_missing_program_is_reported_before_seccomp(plan):
    p, supervisor = plan
    p = child.ChildPlan(**{**p.__dict__, "argv": ("no-such-program",)})  # type: ignore[arg-type]
    k = RecordingKernel()
    child.exec_program(k, p)
    assert "install_seccomp" not in k.names
    msg = protocol.receive(supervisor)
    assert msg.kind == protocol.EXEC_ERROR and msg.fields["errno"] == 2


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
    from sandbox.box.mounts import HostDir, MountSource, build_root
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
