/* Burn CPU: spin THREADS threads (default 1) until each has used SECONDS of CPU time, or
 * forever when SECONDS is 0. Used by the CPU-limit tests and benchmarks. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double limit;

static double thread_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *spin(void *arg) {
    volatile unsigned long n = 0;
    (void)arg;
    while (limit == 0 || thread_cpu() < limit)
        for (int i = 0; i < 10000; i++) n++;
    return NULL;
}

int main(int argc, char **argv) {
    limit = argc > 1 ? atof(argv[1]) : 0;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    pthread_t t[64];
    for (int i = 1; i < threads && i < 64; i++) pthread_create(&t[i], NULL, spin, NULL);
    spin(NULL);
    for (int i = 1; i < threads && i < 64; i++) pthread_join(t[i], NULL);
    puts("done");
    return 0;
}
