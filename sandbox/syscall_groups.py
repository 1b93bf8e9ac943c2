"""Named syscall groups for profiles (in the spirit of systemd's ``@system-service``).

A profile's ``[seccomp] allow`` list names groups (``@basic``) and single syscalls. Groups are
deliberately small and only contain calls that act on the process itself, its own files and its
own sockets; everything that administers the system, other processes or the kernel stays out.
Three syscalls are never allowed unconditionally, whatever a profile says (see ``seccomp.py``):
``clone`` (namespace flags refused), ``ioctl`` (TIOCSTI/TIOCLINUX refused) and ``socket``
(families outside the profile's ``socket_families`` refused).
"""

from __future__ import annotations

GROUPS: dict[str, tuple[str, ...]] = {
    # Memory, signals, time, identity queries: what every libc start-up performs.
    "@basic": (
        "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "mincore", "msync",
        "exit", "exit_group", "rt_sigreturn", "rt_sigaction", "rt_sigprocmask", "rt_sigpending",
        "rt_sigsuspend", "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
        "sigaltstack", "pause", "alarm",
        "arch_prctl", "set_tid_address", "set_robust_list", "get_robust_list", "rseq",
        "futex", "futex_waitv", "restart_syscall", "membarrier",
        "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
        "getresgid", "getgroups", "getpgrp", "getpgid", "getsid", "setpgid", "setsid",
        "uname", "sysinfo", "times", "getrusage", "getrlimit", "setrlimit", "prlimit64",
        "getrandom", "umask", "getcpu", "personality",
        "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam",
        "sched_getscheduler", "sched_get_priority_max", "sched_get_priority_min",
        "getpriority", "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres",
        "gettimeofday", "time", "getitimer", "setitimer", "timer_create", "timer_settime",
        "timer_gettime", "timer_getoverrun", "timer_delete",
        "prctl", "capget", "pkey_alloc", "pkey_free", "pkey_mprotect",
    ),
    # Reading, writing and polling descriptors the process already has.
    "@io": (
        "read", "pread64", "readv", "preadv", "preadv2", "write", "pwrite64", "writev",
        "pwritev", "pwritev2", "close", "close_range", "dup", "dup2", "dup3", "fcntl", "lseek",
        "pipe", "pipe2", "sendfile", "splice", "tee", "copy_file_range",
        "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
        "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
        "timerfd_create", "timerfd_settime", "timerfd_gettime", "signalfd", "signalfd4",
        "ioctl",
    ),
    # Path-based file access; what a path may reach is decided by the mounts, not here.
    "@file": (
        "open", "openat", "openat2", "creat", "stat", "fstat", "lstat", "newfstatat", "statx",
        "statfs", "fstatfs", "access", "faccessat", "faccessat2", "readlink", "readlinkat",
        "getdents", "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir",
        "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink",
        "symlinkat", "chmod", "fchmod", "fchmodat", "truncate", "ftruncate", "fallocate",
        "fadvise64", "readahead", "fsync", "fdatasync", "sync_file_range", "flock",
        "utime", "utimes", "utimensat", "futimesat", "memfd_create",
        "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr",
        "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    ),
    # Creating processes and threads (clone is argument-checked), running programs, waiting.
    "@process": (
        "clone", "clone3", "fork", "vfork", "execve", "execveat", "wait4", "waitid",
        "kill", "tkill", "tgkill",
    ),
    # Sockets the process creates itself (socket is argument-checked by family).
    "@network": (
        "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto",
        "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown", "getsockname",
        "getpeername", "setsockopt", "getsockopt",
    ),
    # System V and POSIX IPC inside the box's own IPC namespace.
    "@ipc": (
        "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
        "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
        "mq_timedreceive", "mq_notify", "mq_getsetattr",
    ),
    # What managed runtimes (the JVM, Go) add to the above: NUMA queries and memory locks.
    "@runtime": ("get_mempolicy", "mlock", "munlock", "mlock2", "sched_setscheduler", "setpriority"),
}


def expand(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Expand groups in ``names``; order is kept and duplicates dropped.

    Raises ``KeyError`` with the unknown group's name.
    """
    out: dict[str, None] = {}
    for name in names:
        if name.startswith("@"):
            if name not in GROUPS:
                raise KeyError(name)
            out.update(dict.fromkeys(GROUPS[name]))
        else:
            out[name] = None
    return tuple(out)
