"""Filter compilation: groups exist on this ABI, BPF is well formed and cached per policy."""

import pytest

from sandbox import syscall_groups
from sandbox.box import seccomp
from sandbox.profiles import load_profile


@pytest.mark.parametrize("group", sorted(syscall_groups.GROUPS))
def test_every_group_member_is_a_syscall_of_this_architecture(group):
    assert seccomp.unknown_syscalls(syscall_groups.GROUPS[group]) == []


def test_dangerous_calls_are_in_no_group():
    every = {name for names in syscall_groups.GROUPS.values() for name in names}
    for name in ("ptrace", "mount", "unshare", "setns", "bpf", "keyctl", "perf_event_open",
                 "userfaultfd", "io_uring_setup", "process_vm_readv", "pivot_root", "chroot",
                 "init_module", "kexec_load", "open_by_handle_at", "mknod", "sethostname"):
        assert name not in every


@pytest.mark.parametrize("notify", [True, False])
def test_strict_compiles_to_whole_bpf_instructions(notify):
    bpf = seccomp.compile_filter(load_profile("strict").seccomp, notify=notify)
    assert len(bpf) % 8 == 0 and 16 < len(bpf) // 8 < 4096


def test_compilation_is_cached_per_policy():
    policy = load_profile("strict").seccomp
    assert seccomp.compile_filter(policy, notify=True) is seccomp.compile_filter(policy,
                                                                                notify=True)


def test_foreign_and_x32_calls_are_described():
    arch = seccomp.native_arch()
    assert seccomp.describe_syscall(arch, 39) == "getpid"
    assert seccomp.describe_syscall(arch, 39 | seccomp.X32_SYSCALL_BIT) == "getpid (x32)"
    import pyseccomp

    assert seccomp.describe_syscall(pyseccomp.Arch.X86, 20) == "getpid (x86)"
