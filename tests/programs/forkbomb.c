/* A fork bomb that counts: fork() until MAX children are alive or fork fails, keeping every
 * child alive (blocked on a pipe) so each one holds a pid; print how many forks succeeded and
 * the errno of the first failure (0 if none), then let the children go.
 * usage: forkbomb MAX  -- used by the pids-limit tests, with a control under a large limit. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int max = argc > 1 ? atoi(argv[1]) : 1000;
    int gate[2];
    if (pipe(gate) != 0) return 2;
    int forked = 0, failure = 0;
    while (forked < max) {
        pid_t pid = fork();
        if (pid < 0) {
            failure = errno;
            break;
        }
        if (pid == 0) {  /* hold a pid until the parent closes the gate */
            char c;
            close(gate[1]);
            while (read(gate[0], &c, 1) < 0 && errno == EINTR) {}
            _exit(0);
        }
        forked++;
    }
    close(gate[1]);
    while (wait(NULL) > 0) {}
    printf("forked %d errno %d (%s)\n", forked, failure, failure ? strerror(failure) : "none");
    return 0;
}
