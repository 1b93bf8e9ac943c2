/*
 * Every system call boxinit makes, behind one small interface (as sandbox/kernel.py is for
 * the Python side). Built with -DBOXINIT_RECORD, the calls that change the process are only
 * written, one name per line, to the descriptor in $BOXINIT_RECORD_FD, and succeed: fork
 * returns 0 (the runner's path is followed), execve fails with ENOENT. Messaging (sendmsg,
 * recvmsg) and reading the request stay real, so a test drives the recording build through
 * the same socket protocol as the supervisor and checks the order without privileges.
 */
#ifndef BOXINIT_KERNEL_H
#define BOXINIT_KERNEL_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/mount.h>
#include <linux/seccomp.h>
#include <linux/securebits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif

/* Always real: messages and the request. */
static inline ssize_t k_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    ssize_t n;
    do
        n = sendmsg(fd, msg, flags);
    while (n < 0 && errno == EINTR);
    return n;
}

static inline ssize_t k_recvmsg(int fd, struct msghdr *msg, int flags)
{
    ssize_t n;
    do
        n = recvmsg(fd, msg, flags);
    while (n < 0 && errno == EINTR);
    return n;
}

static inline int k_fstat(int fd, struct stat *st) { return fstat(fd, st); }
static inline ssize_t k_pread(int fd, void *buf, size_t n, off_t at) { return pread(fd, buf, n, at); }

#ifdef BOXINIT_RECORD
#include <stdio.h>
static inline void record(const char *name, const char *arg)
{
    const char *fd = getenv("BOXINIT_RECORD_FD");
    char line[512];
    int n = snprintf(line, sizeof(line), "%s%s%s\n", name, arg ? " " : "", arg ? arg : "");
    if (write(fd ? atoi(fd) : 2, line, (size_t)n) < 0)
        _exit(99);
}
#define RECORD(name, arg, result)                                                              \
    do {                                                                                       \
        record(name, arg);                                                                     \
        return result;                                                                         \
    } while (0)
static inline int k_write(int fd, const char *b, size_t n) { (void)fd; (void)b; RECORD("join_cgroup", NULL, (int)n); }
static inline int k_close(int fd) { (void)fd; return 0; }
static inline int k_unshare(int flags) { (void)flags; RECORD("unshare_cgroup", NULL, 0); }
static inline int k_mkdir(const char *p, mode_t m) { (void)m; RECORD("mkdir", p, 0); }
static inline int k_open(const char *p, int f, mode_t m) { (void)f; (void)m; RECORD("create", p, 3); }
static inline int k_move_mount(int fd, const char *t) { (void)fd; RECORD("move_mount", t, 0); }
static inline int k_mount_setattr(const char *t, unsigned a) { (void)a; RECORD("mount_setattr", t, 0); }
static inline int k_chdir(const char *p) { RECORD("chdir", p, 0); }
static inline int k_setresgid(uint32_t g) { (void)g; RECORD("setresgid", NULL, 0); }
static inline int k_setresuid(uint32_t u) { (void)u; RECORD("setresuid", NULL, 0); }
static inline int k_setsid(void) { RECORD("setsid", NULL, 0); }
static inline int k_setrlimit(uint32_t w, uint64_t v) { (void)w; (void)v; RECORD("setrlimit", NULL, 0); }
static inline int k_dup2(int a, int b) { (void)a; (void)b; RECORD("dup2", NULL, 0); }
static inline int k_close_others(int keep) { (void)keep; RECORD("close_range", NULL, 0); }
static inline int k_no_new_privs(void) { RECORD("no_new_privs", NULL, 0); }
static inline int k_drop_capabilities(void) { RECORD("drop_capabilities", NULL, 0); }
static inline void k_reset_signals(void) { record("reset_signals", NULL); }
static inline int k_seccomp(const unsigned char *bpf, uint32_t len, unsigned listener)
{
    (void)bpf; (void)len; (void)listener;
    RECORD("seccomp", NULL, dup(0));
}
static inline int k_execve(const char *p, char *const *argv, char *const *envp)
{
    (void)argv; (void)envp;
    record("execve", p);
    errno = ENOENT;
    return -1;
}
static inline pid_t k_fork(void) { RECORD("fork", NULL, 0); }
static inline pid_t k_wait4(pid_t p, int *s, int o, struct rusage *r) { (void)p; (void)s; (void)o; (void)r; errno = ECHILD; RECORD("wait4", NULL, -1); }
static inline int k_kill(pid_t p, int s) { (void)p; (void)s; RECORD("kill", NULL, 0); }
static inline int k_not_dumpable(void) { RECORD("not_dumpable", NULL, 0); }
static inline int k_pdeathsig(void) { RECORD("pdeathsig", NULL, 0); }
static inline int k_hung_up(int fd) { (void)fd; return 0; }
static inline int k_notif_recv(int fd, struct seccomp_notif *n) { (void)fd; (void)n; errno = ENOSYS; RECORD("notif_recv", NULL, -1); }
static inline int k_close_all_but(int keep) { (void)keep; RECORD("close_range", NULL, 0); }
static inline pid_t k_getppid(void) { return getppid(); }
static inline pid_t k_getpid(void) { return 1; } /* the recording build runs as a plain child */
static inline int k_cloexec(int fd) { (void)fd; return 0; }
static inline int k_fill_stdio(void) { return 0; }
#else

static inline int k_write(int fd, const char *b, size_t n) { return (int)write(fd, b, n); }
static inline int k_close(int fd) { return close(fd); }
static inline int k_unshare(int flags) { return unshare(flags); }
static inline int k_mkdir(const char *p, mode_t m) { return mkdir(p, m); }
static inline int k_open(const char *p, int f, mode_t m) { return open(p, f, m); }

static inline int k_move_mount(int fd, const char *target)
{
    return (int)syscall(SYS_move_mount, fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH);
}

static inline int k_mount_setattr(const char *target, unsigned attrs)
{
    struct mount_attr attr = {.attr_set = attrs};
    return (int)syscall(SYS_mount_setattr, AT_FDCWD, target, AT_RECURSIVE, &attr, sizeof(attr));
}

static inline int k_chdir(const char *p) { return chdir(p); }
static inline int k_setresgid(uint32_t g) { return setresgid(g, g, g); }
static inline int k_setresuid(uint32_t u) { return setresuid(u, u, u); }
static inline int k_setsid(void) { return setsid() < 0 ? -1 : 0; }

static inline int k_setrlimit(uint32_t which, uint64_t value)
{
    struct rlimit r = {.rlim_cur = value, .rlim_max = value};
    return setrlimit((int)which, &r);
}

static inline int k_dup2(int fd, int target)
{
    if (fd == target) /* dup2 onto itself keeps close-on-exec: clear it instead */
        return fcntl(fd, F_SETFD, 0);
    return dup2(fd, target);
}

/* Close every descriptor above 2 but ``keep`` (-1: close them all, 0-2 included). */
static inline int k_close_others(int keep)
{
    if (keep < 0)
        return (int)syscall(SYS_close_range, 0, ~0U, 0);
    if (keep > 3 && syscall(SYS_close_range, 3, keep - 1, 0) < 0)
        return -1;
    return (int)syscall(SYS_close_range, keep + 1, ~0U, 0);
}

static inline int k_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }

static inline int k_drop_capabilities(void)
{
    /* Ambient first (it needs the permitted set), then the bounding set (needs CAP_SETPCAP),
     * then securebits so no uid change can ever restore anything, and capset last because it
     * removes CAP_SETPCAP itself (capabilities(7), "Thread capability sets"). */
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        return -1;
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            return -1;
    if (prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP |
                                     SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED,
              0, 0, 0) < 0)
        return -1;
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    return (int)syscall(SYS_capset, &header, data);
}

static inline void k_reset_signals(void)
{
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP and glibc's own */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Install the filter; returns the listener (with RUN_LISTENER) or 0. */
static inline int k_seccomp(const unsigned char *bpf, uint32_t len, unsigned listener)
{
    struct sock_fprog prog = {.len = (unsigned short)(len / 8),
                              .filter = (struct sock_filter *)(void *)bpf};
    unsigned flags = listener ? SECCOMP_FILTER_FLAG_NEW_LISTENER : 0;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

static inline int k_execve(const char *p, char *const *argv, char *const *envp)
{
    return execve(p, argv, envp);
}

static inline pid_t k_fork(void) { return fork(); }
static inline pid_t k_wait4(pid_t p, int *s, int o, struct rusage *r) { return wait4(p, s, o, r); }
static inline int k_kill(pid_t p, int s) { return kill(p, s); }
static inline int k_not_dumpable(void) { return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); }
static inline int k_pdeathsig(void) { return prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); }

static inline int k_hung_up(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0 && (p.revents & POLLHUP);
}
static inline pid_t k_getpid(void) { return getpid(); }
static inline pid_t k_getppid(void) { return getppid(); }

/* seccomp_unotify(2): the kernel refuses (EINVAL) a struct that is not zeroed. */
static inline int k_notif_recv(int fd, struct seccomp_notif *n)
{
    memset(n, 0, sizeof(*n));
    return ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, n);
}

/* Close every descriptor but ``keep``, 0-2 included. */
static inline int k_close_all_but(int keep)
{
    if (keep > 0 && syscall(SYS_close_range, 0, keep - 1, 0) < 0)
        return -1;
    return (int)syscall(SYS_close_range, keep + 1, ~0U, 0);
}
static inline int k_cloexec(int fd) { return fcntl(fd, F_SETFD, FD_CLOEXEC); }

static inline int k_fill_stdio(void)
{
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0)
            continue;
        int null = open("/dev/null", O_RDWR);
        if (null < 0)
            return -1;
        if (null != fd) /* lowest free number: a lower one was open, so this cannot happen */
            return close(null), errno = EBADF, -1;
    }
    return 0;
}
#endif

#endif
