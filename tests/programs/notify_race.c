/* Race forbidden syscalls against their own caller's death, so the notification the sandbox's
 * supervisor waits for vanishes before it can read it (SECCOMP_IOCTL_NOTIF_RECV then fails with
 * ENOENT).  usage: notify_race signal|kill N [LINGER_MS]
 *   signal: a thread makes the forbidden call N times while the main thread keeps interrupting
 *           it with a signal whose handler has no SA_RESTART, so the call returns EINTR;
 *   kill:   N times, a child makes the forbidden call and a sibling SIGKILLs it as soon as it
 *           sleeps in it: the child publishes its pid in shared memory right before the call,
 *           the sibling then rereads /proc/PID/stat until the state is S (asleep: in the
 *           notification wait, nothing else between can sleep). The parent reaps both and,
 *           after LINGER_MS (default 0), exits 0.
 * Prints "survived" if every attempt came back: in a box that verdict must never be "ok". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* kcmp(2) with an unknown type: refused by the strict filter, EINVAL from the kernel. */
static long forbidden(void) { return syscall(SYS_kcmp, 0, 0, 99, 0, 0); }

static atomic_int done;
static atomic_int tid;

static void on_signal(int sig) { (void)sig; }

static void *caller(void *arg) {
    long n = (long)arg;
    atomic_store(&tid, (int)gettid());
    for (long i = 0; i < n; i++) forbidden();
    atomic_store(&done, 1);
    return NULL;
}

static int by_signal(long n) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;  /* no SA_RESTART: the interrupted call returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, caller, (void *)n);
    while (!atomic_load(&tid)) sched_yield();
    while (!atomic_load(&done)) syscall(SYS_tgkill, getpid(), atomic_load(&tid), SIGUSR1);
    pthread_join(t, NULL);
    return 0;
}

/* The state letter of /proc/PID/stat ("pid (comm) S ..."), or 0 once it cannot be read. */
static char state_of(int fd) {
    char buf[512];
    ssize_t len = pread(fd, buf, sizeof buf - 1, 0);
    if (len <= 0) return 0;
    buf[len] = 0;
    char *end = strrchr(buf, ')');
    return end && end[1] == ' ' ? end[2] : 0;
}

static void kill_when_asleep(int pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    char state;
    while (fd >= 0 && (state = state_of(fd)) && state != 'S' && state != 'Z') {}
    kill(pid, SIGKILL);
}

static int by_kill(long n) {
    atomic_int *victim = mmap(NULL, sizeof *victim, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (victim == MAP_FAILED) return 1;
    for (long i = 0; i < n; i++) {
        atomic_store(victim, 0);
        pid_t killer = fork();
        if (killer == 0) {
            int pid;
            while (!(pid = atomic_load(victim))) {}
            kill_when_asleep(pid);
            _exit(0);
        }
        pid_t pid = fork();
        if (pid == 0) {
            atomic_store(victim, (int)getpid());
            forbidden();
            _exit(0);
        }
        if (killer < 0 || pid < 0) return 1;
        waitpid(pid, NULL, 0);
        waitpid(killer, NULL, 0);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) return 2;
    long n = atol(argv[2]);
    int rc = !strcmp(argv[1], "signal") ? by_signal(n) : !strcmp(argv[1], "kill") ? by_kill(n) : 2;
    if (argc == 4) usleep(1000 * atoi(argv[3]));
    if (rc == 0) printf("survived\n");
    return rc;
}
