/* Exhaust or probe one per-user kernel counter.
 * usage: counters KIND hold SECONDS   -- take as many as the kernel allows, print how many
 *                                       ("held N"), then keep them for SECONDS
 *        counters KIND probe          -- take one, print "ok" or the errno name
 * KIND: sigpending (queued real-time signals), inotify (instances), mqueue (POSIX queues). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <mqueue.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <unistd.h>

static int take(const char *kind, int n) {
    if (!strcmp(kind, "sigpending")) {
        union sigval value = {.sival_int = n};
        return sigqueue(getpid(), SIGRTMIN, value);
    }
    if (!strcmp(kind, "inotify")) return inotify_init1(IN_CLOEXEC) < 0 ? -1 : 0;
    if (!strcmp(kind, "mqueue")) {
        char name[64];
        struct mq_attr attr = {.mq_maxmsg = 10, .mq_msgsize = 8192};
        snprintf(name, sizeof name, "/counters-%d-%d", getpid(), n);
        mqd_t q = mq_open(name, O_CREAT | O_EXCL | O_RDWR, 0600, &attr);
        if (q == (mqd_t)-1) return -1;
        mq_unlink(name); /* the queue lives as long as the descriptor */
        return 0;
    }
    fprintf(stderr, "unknown kind %s\n", kind);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    sigprocmask(SIG_BLOCK, &set, NULL); /* queued signals stay pending */
    struct rlimit files;
    getrlimit(RLIMIT_NOFILE, &files); /* on the host: more descriptors than the counters */
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
    if (!strcmp(argv[2], "probe")) {
        if (take(argv[1], 0) == 0) puts("ok");
        else printf("%s\n", strerrorname_np(errno));
        return 0;
    }
    int n = 0;
    while (n < 10000000 && take(argv[1], n) == 0) n++;
    printf("held %d %s\n", n, strerrorname_np(errno));
    fflush(stdout);
    sleep(argc > 3 ? atoi(argv[3]) : 3);
    return 0;
}
