/* Race forbidden syscalls against their own caller's death, so the notification the sandbox's
 * supervisor waits for vanishes before it can read it (SECCOMP_IOCTL_NOTIF_RECV then fails with
 * ENOENT).  usage: notify_race signal|kill N
 *   signal: a thread makes the forbidden call N times while the main thread keeps interrupting
 *           it with a signal whose handler has no SA_RESTART, so the call returns EINTR;
 *   kill:   N children each make the forbidden call and are SIGKILLed by the parent at once.
 * Prints "survived" if every attempt came back: in a box that verdict must never be "ok". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static int by_kill(long n) {
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            forbidden();
            _exit(0);
        }
        if (pid < 0) return 1;
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long n = atol(argv[2]);
    int rc = !strcmp(argv[1], "signal") ? by_signal(n) : !strcmp(argv[1], "kill") ? by_kill(n) : 2;
    if (rc == 0) printf("survived\n");
    return rc;
}
