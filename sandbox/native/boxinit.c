/*
 * boxinit: the native last mile of a box (docs/architecture.md, "The native last mile").
 *
 * The box's setup runs in Python up to the finished root filesystem; then two of its processes
 * become this small static program, so that the program under test is forked from a process of
 * a few hundred KiB instead of a 20 MB interpreter (Linux keeps the RSS high-water mark across
 * execve, so a fork of Python reports Python's memory as the program's; and every millisecond
 * of interpreter CPU after joining the box's cgroup would be charged to the program):
 *
 *   boxinit hold PID      the setup process, after forking the box's pid 1: waits for it, exits
 *                         with its status; dies with its parent PID, the supervisor (and pid 1
 *                         with it, by its own parent-death signal).
 *   boxinit init SYNC_FD  pid 1 of the box's pid namespace. Loop: receive PREPARE (the box
 *                         cgroup's entry files), fork the runner, wait for the runner, report
 *                         its end (EXITED, with its rusage), kill and reap everything left, and
 *                         either exit (a box used once) or make the box fresh for the next run.
 *   runner                (a fork of init): joins the box cgroup, says READY, receives RUN
 *                         (argv, environment, ids, rlimits, stdio, the seccomp filter, binds),
 *                         drops every privilege in the order below and execs the program.
 *   boxinit receive FD PID  the supervisor's receiver of the box's seccomp listener (outside
 *                         the box; sandbox/box/seccomp.py, Receiver): reports every return of
 *                         a RECV kept blocked the whole run on the socket FD; dies with PID.
 *
 * Supervisor -> box messages are binary (parse.h, fuzzed); box -> supervisor messages are the
 * JSON objects sandbox/protocol.py documents. Every system call goes through the k_* wrappers
 * of kernel.h, which a recording build (-DBOXINIT_RECORD) replaces with a log of their names,
 * so tests check the order of the steps without privileges (tests/unit/test_native.py).
 *
 * Rules kept here as in the Python phases: no step of the runner may run after seccomp but
 * sendmsg and execve; every failure is reported as a structured message and ends the process
 * with _exit, never by unwinding into anything else.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kernel.h"
#include "parse.h"

#define EXIT_SETUP_FAILED 125

static int sync_fd = -1;

/* --- messages to the supervisor (JSON, sandbox/protocol.py) ------------------------------ */

static size_t json_string(char *out, size_t room, const char *s)
{
    size_t n = 0;
    if (n < room)
        out[n++] = '"';
    for (; *s && n + 7 < room; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c < 0x20 || c >= 0x7f) {
            n += (size_t)snprintf(out + n, room - n, "\\u%04x", c);
        } else {
            out[n++] = (char)c;
        }
    }
    if (n < room)
        out[n++] = '"';
    return n;
}

static void send_json(const char *text, int fd_to_pass)
{
    struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd_to_pass >= 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd_to_pass, sizeof(int));
    }
    /* MSG_NOSIGNAL: a supervisor that went away must not kill us with SIGPIPE mid-report. */
    k_sendmsg(sync_fd, &msg, MSG_NOSIGNAL);
}

static int64_t monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int64_t cpu_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The most of fail()'s message an op may take: the rest (phase, errno, strerror) is short. */
#define OP_ROOM 512

/* A step failed: tell the supervisor which one and why, then end this process. */
static _Noreturn void fail(const char *phase, const char *op, int err)
{
    char text[1024];
    size_t n = (size_t)snprintf(text, sizeof(text), "{\"t\":\"error\",\"phase\":");
    n += json_string(text + n, sizeof(text) - n, phase);
    n += (size_t)snprintf(text + n, sizeof(text) - n, ",\"op\":");
    /* op may be a path of up to PATH_MAX bytes (the working directory, a bind's target): cut
     * it so the fields after it still fit; snprintf returns what it would have written, and
     * an offset past the buffer would make the next write land outside it. */
    n += json_string(text + n, OP_ROOM, op);
    n += (size_t)snprintf(text + n, sizeof(text) - n, ",\"errno\":%d,\"detail\":", err);
    n += json_string(text + n, sizeof(text) - n, err ? strerror(err) : "");
    snprintf(text + n, sizeof(text) - n, "}");
    send_json(text, -1);
    _exit(EXIT_SETUP_FAILED);
}

#define CHECK(phase, op, call)                                                                 \
    do {                                                                                       \
        if ((call) < 0)                                                                        \
            fail(phase, op, errno);                                                            \
    } while (0)

/* --- the runner: one run's last mile ------------------------------------------------------ */

struct received {
    int fds[BOXINIT_MAX_FDS];
    int count;
};

/* One supervisor message: its bytes and the descriptors attached to it. */
static ssize_t receive(unsigned char *buf, size_t room, struct received *got)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * BOXINIT_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = buf, .iov_len = room};
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = control.buf,
                         .msg_controllen = sizeof(control.buf)};
    got->count = 0;
    ssize_t n = k_recvmsg(sync_fd, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t fds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < fds && got->count < BOXINIT_MAX_FDS; i++)
            memcpy(&got->fds[got->count++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) {
        errno = EMSGSIZE;
        return -1;
    }
    return n;
}

/* Read the whole request from the memory file the supervisor sealed and sent. */
static unsigned char *read_request(int fd, size_t *len)
{
    struct stat st;
    if (k_fstat(fd, &st) < 0)
        return NULL;
    if (st.st_size <= 0 || st.st_size > BOXINIT_MAX_REQUEST) {
        errno = EMSGSIZE;
        return NULL;
    }
    unsigned char *buf = malloc((size_t)st.st_size);
    if (!buf)
        return NULL;
    size_t done = 0;
    while (done < (size_t)st.st_size) {
        ssize_t n = k_pread(fd, buf + done, (size_t)st.st_size - done, (off_t)done);
        if (n <= 0) {
            if (n == 0)
                errno = EIO;
            free(buf);
            return NULL;
        }
        done += (size_t)n;
    }
    *len = done;
    return buf;
}

/* mkdir -p of a bind's mount point inside a tmpfs this run has not touched yet. */
static int make_mount_point(const char *target, int is_dir)
{
    char path[BOXINIT_MAX_PATH];
    size_t len = strlen(target);
    if (len >= sizeof(path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(path, target, len + 1);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (k_mkdir(path, 0755) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (is_dir)
        return k_mkdir(path, 0755) < 0 && errno != EEXIST ? -1 : 0;
    int fd = k_open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        return errno == EEXIST ? 0 : -1;
    k_close(fd);
    return 0;
}

/* Find the program as execvp(3) does, with the box's PATH; returns only on failure. */
static int exec_program(const struct run *run)
{
    const char *argv0 = run->argv[0];
    if (strchr(argv0, '/')) {
        k_execve(argv0, run->argv, run->envp);
        return errno;
    }
    const char *path = "/usr/local/bin:/usr/bin:/bin";
    for (int i = 0; i < run->envc; i++)
        if (strncmp(run->envp[i], "PATH=", 5) == 0)
            path = run->envp[i] + 5;
    int saw_eacces = 0, last = ENOENT;
    char candidate[BOXINIT_MAX_PATH];
    for (const char *dir = path;; dir++) {
        const char *end = strchrnul(dir, ':');
        size_t dlen = (size_t)(end - dir);
        if (dlen == 0)
            dlen = 1, dir = "."; /* an empty PATH entry is the current directory */
        if (dlen + 1 + strlen(argv0) < sizeof(candidate)) {
            memcpy(candidate, dir, dlen);
            candidate[dlen] = '/';
            strcpy(candidate + dlen + 1, argv0);
            k_execve(candidate, run->argv, run->envp);
            if (errno == EACCES)
                saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR)
                return errno;
            last = errno;
        }
        if (*end == '\0')
            break;
        dir = end;
    }
    return saw_eacces ? EACCES : last;
}

/*
 * The runner: forked by init before the request is known, so joining the box cgroup (slow on
 * cgroup v2: cgroup.procs takes a global lock whose first use costs an RCU grace period) is
 * done ahead of time. Then it receives the run and drops privileges in the order of the
 * Python phases it replaces (child.py; each step says why it comes where it does).
 */
static _Noreturn void runner(const int *cgroup_fds, int ncgroup)
{
    /* 1. Join the box cgroup through the files the supervisor opened ("0" is the writer).
     *    The scheduler charges a running task's CPU to its cgroup only when it next updates
     *    the task's runtime, to the cgroup the task is in by then: reading this process's CPU
     *    clock makes it update now (task_sched_runtime), so the time since this process was
     *    forked stays outside the box cgroup, and from here on everything it uses is
     *    subtracted from the box's figure (the `exec` message). */
    int64_t joined_cpu = cpu_ns();
    for (int i = 0; i < ncgroup; i++) {
        CHECK("join_cgroup", "write cgroup entry", k_write(cgroup_fds[i], "0", 1));
        k_close(cgroup_fds[i]);
    }
    /* 2. After joining: the box's cgroup becomes the root of its cgroup namespace. */
    CHECK("unshare_cgroup", "unshare", k_unshare(CLONE_NEWCGROUP));
    send_json("{\"t\":\"ready\"}", -1);

    /* 3. The run itself. */
    unsigned char header[16];
    struct received got;
    ssize_t n = receive(header, sizeof(header), &got);
    if (n == 0)
        _exit(0); /* the supervisor closed the box without a run */
    if (n < 0)
        fail("receive_run", "recvmsg", errno);
    if (n != 8 || memcmp(header, "SBX1RUN\0", 8) != 0 || got.count < 4)
        fail("receive_run", "not a run request", EPROTO);
    size_t len = 0;
    unsigned char *request = read_request(got.fds[0], &len);
    if (!request)
        fail("receive_run", "read the request", errno);
    static struct run run;
    const char *why = NULL;
    if (parse_run(request, len, &run, &why) < 0)
        fail("receive_run", why, EPROTO);
    if (got.count != 4 + run.nbinds)
        fail("receive_run", "descriptor count does not match the request", EPROTO);

    /* 4. Become the program's uid/gid (as root, pid 1 has ids of its own): from here the
     *    program cannot signal, trace, prlimit or read the box's init. */
    CHECK("switch_ids", "setresgid", k_setresgid(run.gid));
    CHECK("switch_ids", "setresuid", k_setresuid(run.uid));
    /* 5. Per-run binds (as root: detached trees of host paths the supervisor checked), each
     *    on a mount point made in the box's work dir, a tmpfs no program has run in yet;
     *    made with the program's ids (its own directory), attached with the capabilities
     *    the runner still holds. */
    for (int i = 0; i < run.nbinds; i++) {
        const struct bind *b = &run.binds[i];
        CHECK("attach_binds", b->target, make_mount_point(b->target, b->flags & BIND_DIR));
        CHECK("attach_binds", b->target, k_move_mount(got.fds[4 + i], b->target));
        unsigned attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if (!(b->flags & BIND_WRITABLE))
            attrs |= MOUNT_ATTR_RDONLY;
        CHECK("attach_binds", b->target, k_mount_setattr(b->target, attrs));
        k_close(got.fds[4 + i]);
    }
    /* 6. pivot_root(2) left the working directory on the old root: enter the box's, with the
     *    program's own access rights. */
    CHECK("chdir", run.cwd, k_chdir(run.cwd));
    /* 7. No controlling terminal, so TIOCSTI cannot reach the caller's (CVE-2017-5226). */
    CHECK("new_session", "setsid", k_setsid());
    /* 8. Limits from the supervisor's table. */
    for (int i = 0; i < run.nrlimits; i++)
        CHECK("set_rlimits", "setrlimit", k_setrlimit(run.rlimits[i].which, run.rlimits[i].value));
    /* 9. The program's stdin, stdout, stderr (received above fd 2, see main). */
    for (int i = 0; i < 3; i++)
        CHECK("set_stdio", "dup2", k_dup2(got.fds[1 + i], i));
    /* 10. Late, so nothing opened during setup leaks in (runc CVE-2024-21626 leaked a cgroup
     *     descriptor): only stdio and the sync socket (close-on-exec) stay. */
    CHECK("close_fds", "close_range", k_close_others(sync_fd));
    /* 11. no_new_privs before the filter: seccomp(2) refuses an unprivileged filter without
     *     it, and it keeps any set-uid file from granting anything (prctl(2)). */
    CHECK("no_new_privs", "prctl", k_no_new_privs());
    /* 12. Every capability of every set: ambient, bounding (needs CAP_SETPCAP), securebits
     *     locked, then the rest, last, because capset removes CAP_SETPCAP itself. */
    CHECK("drop_capabilities", "capabilities", k_drop_capabilities());
    /* 13. The program starts with default signal dispositions and an empty mask. */
    k_reset_signals();
    /* 14. seccomp, last: between it and execve only sendmsg and execve run. */
    int listener = k_seccomp(run.bpf, run.bpf_len, run.flags & RUN_LISTENER);
    if (listener < 0)
        fail("install_seccomp", "seccomp", errno);
    char text[160];
    /* CLOCK_MONOTONIC is one clock for every namespace (no time namespace is made), so the
     * supervisor measures wall time from this instant. The CPU this process used since
     * joining the cgroup is the sandbox's, not the program's: the supervisor subtracts it. */
    snprintf(text, sizeof(text), "{\"t\":\"exec\",\"at\":%lld,\"cpu_ns\":%lld}",
             (long long)monotonic_ns(), (long long)(cpu_ns() - joined_cpu));
    send_json(text, (run.flags & RUN_LISTENER) ? listener : -1);
    int err = exec_program(&run);
    snprintf(text, sizeof(text), "{\"t\":\"exec_error\",\"errno\":%d}", err);
    send_json(text, -1);
    _exit(127);
}

/* --- pid 1 -------------------------------------------------------------------------------- */

static void reap_everything(void)
{
    /* kill(2) with pid -1 from pid 1 reaches every other process of its namespace. */
    k_kill(-1, SIGKILL);
    while (k_wait4(-1, NULL, 0, NULL) > 0 || errno == EINTR)
        ;
}

static int init_main(void)
{
    for (;;) {
        unsigned char header[16];
        struct received got;
        ssize_t n = receive(header, sizeof(header), &got);
        if (n == 0)
            return 0; /* the supervisor is done with this box */
        if (n < 0)
            fail("init", "recvmsg", errno);
        if (n != 8 || memcmp(header, "SBX1PRE\0", 8) != 0)
            fail("init", "not a prepare request", EPROTO);
        pid_t pid = k_fork();
        if (pid < 0)
            fail("init", "fork", errno);
        if (pid == 0)
            runner(got.fds, got.count);
        for (int i = 0; i < got.count; i++)
            k_close(got.fds[i]);
        int status = 0;
        struct rusage usage;
        for (;;) {
            pid_t reaped = k_wait4(-1, &status, 0, &usage);
            if (reaped == pid)
                break;
            if (reaped < 0 && errno != EINTR)
                fail("init", "wait4", errno);
        }
        char text[256];
        snprintf(text, sizeof(text),
                 "{\"t\":\"exit\",\"status\":%d,\"at\":%lld,\"utime_us\":%lld,"
                 "\"stime_us\":%lld,\"maxrss_kb\":%ld}",
                 status, (long long)monotonic_ns(),
                 (long long)usage.ru_utime.tv_sec * 1000000 + usage.ru_utime.tv_usec,
                 (long long)usage.ru_stime.tv_sec * 1000000 + usage.ru_stime.tv_usec,
                 usage.ru_maxrss);
        send_json(text, -1);
        reap_everything();
        return 0;
    }
}

/* --- the seccomp listener's receiver (outside the box) ------------------------------------ */

/*
 * The supervisor forks this and execs it at once, so what waits beside a box for its whole run
 * is this small program, not a copy of the interpreter. Every notification of the box's filter
 * is a forbidden call (its only notify action is its kill action). A notification whose caller
 * dies, or whose wait a signal interrupts, before anyone received it leaves no trace but the
 * kernel's count of requests: only a RECV already blocked, or started while the count is above
 * zero, sees it, returning ENOENT (seccomp_unotify(2)). So one RECV stays blocked the whole
 * time, and each return is one fixed-size report on the socket (box/seccomp.py reads them):
 * 'C' nr arch, a call (never answered: its caller stays blocked until the box is killed);
 * 'V', one whose caller vanished; 'F' errno, RECV failed; 'E', no task is left under the filter.
 */
struct __attribute__((packed)) notif_report {
    char kind;
    int32_t value;
    uint32_t arch;
};

static int report_notif(int sock, char kind, int32_t value, uint32_t arch)
{
    struct notif_report r = {.kind = kind, .value = value, .arch = arch};
    struct iovec iov = {.iov_base = &r, .iov_len = sizeof(r)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    return k_sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)sizeof(r) ? 0 : -1;
}

static int receive_main(int sock, pid_t supervisor)
{
    /* Die with the supervisor; if it died before the signal was armed, stop now. */
    if (k_pdeathsig() < 0 || k_getppid() != supervisor)
        return 1;
    /* Keep nothing of the supervisor's: a pipe end held here would keep a peer from its EOF. */
    if (k_close_all_but(sock) < 0)
        return 1;
    sync_fd = sock;
    unsigned char byte[1];
    struct received got;
    ssize_t n = receive(byte, sizeof(byte), &got);
    if (n <= 0 || got.count != 1)
        return 0; /* the run ended before the program's execve */
    int listener = got.fds[0];
    for (;;) {
        struct seccomp_notif notif;
        if (k_notif_recv(listener, &notif) == 0) {
            if (report_notif(sock, 'C', notif.data.nr, notif.data.arch) < 0)
                return 0;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno != ENOENT) {
            report_notif(sock, 'F', errno, 0);
            return 0;
        }
        /* ENOENT also answers at once when the filter has no users left (POLLHUP): then it
         * means nothing, and nothing can notify any more. Users never come back, so ENOENT
         * without a hang-up is a request whose caller vanished. */
        if (k_hung_up(listener)) {
            report_notif(sock, 'E', 0, 0);
            return 0;
        }
        if (report_notif(sock, 'V', 0, 0) < 0)
            return 0;
    }
}

/* The setup process after forking pid 1: wait for it and exit as it did. */
static int hold_main(pid_t supervisor)
{
    int status = 0, code = EXIT_SETUP_FAILED;
    /* As root this exec was set-id (effective uid the box's, real uid 0), and such an exec
     * clears the parent-death signal (execve(2)): set it again, then make sure the supervisor
     * did not die before it took effect. */
    if (k_pdeathsig() < 0 || getppid() != supervisor)
        return EXIT_SETUP_FAILED;
    for (;;) {
        pid_t pid = k_wait4(-1, &status, 0, NULL);
        if (pid > 0) {
            code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            continue;
        }
        if (errno != EINTR)
            return code;
    }
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "hold") == 0) {
        k_close_others(-1);
        return hold_main((pid_t)atoi(argv[2]));
    }
    if (argc == 4 && strcmp(argv[1], "receive") == 0)
        return receive_main(atoi(argv[2]), (pid_t)atoi(argv[3]));
    if (argc != 3 || strcmp(argv[1], "init") != 0) {
        fprintf(stderr, "usage: boxinit hold PID | boxinit init SYNC_FD | boxinit receive FD PID\n");
        return 2;
    }
    /* Only as pid 1 of the box's pid namespace: its end is kill(-1, SIGKILL), which from any
     * other process reaches every process it may signal, outside the box too (kill(2)). */
    if (k_getpid() != 1) {
        fprintf(stderr, "boxinit init: not pid 1 of a pid namespace\n");
        return 2;
    }
    char *end;
    long fd = strtol(argv[2], &end, 10);
    if (*end || fd < 3 || fd > 1 << 20)
        return 2;
    sync_fd = (int)fd;
    /* pid 1 must not be readable or traceable by the program (same uid in the namespace);
     * execve made this process dumpable again (prctl(2), PR_SET_DUMPABLE). */
    CHECK("protect_init", "prctl", k_not_dumpable());
    /* Die with the setup process, as before the execve (which may have cleared the signal);
     * if the supervisor is already gone, its end of the sync socket reads as hung up. */
    CHECK("die_with_parent", "prctl", k_pdeathsig());
    if (k_hung_up(sync_fd))
        fail("die_with_parent", "supervisor is gone", 0);
    /* The sync socket came through execve; the program must not inherit it. */
    CHECK("init", "fcntl", k_cloexec(sync_fd));
    /* Descriptors 0-2 are the program's only once the runner dup2s them: hold them with
     * /dev/null so descriptors received later never take those numbers. */
    CHECK("init", "open /dev/null", k_fill_stdio());
    return init_main();
}
