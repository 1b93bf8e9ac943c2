/* `leftovers make` leaves behind everything a run could try to pass to a later run of the
 * same box; `leftovers check` prints what it finds of it, one name per line. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <mqueue.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define KEY 0x5eed

static struct sockaddr_un abstract(socklen_t *len)
{
    static struct sockaddr_un addr;
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, "\0sandbox-leftover", 17);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 17);
    return addr;
}

static int make(void)
{
    const char *files[] = {"/tmp/leftover", "/box/leftover", "/dev/shm/leftover"};
    for (int i = 0; i < 3; i++)
        close(open(files[i], O_CREAT | O_WRONLY, 0644));
    shmget(KEY, 4096, IPC_CREAT | 0666);
    msgget(KEY, IPC_CREAT | 0666);
    struct mq_attr attr = {.mq_maxmsg = 1, .mq_msgsize = 8};
    mq_open("/leftover", O_CREAT | O_RDWR, 0666, &attr);
    socklen_t len;
    struct sockaddr_un addr = abstract(&len);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    bind(s, (struct sockaddr *)&addr, len);
    listen(s, 1);
    if (fork() == 0) { /* a background process keeping the socket, in a new session */
        setsid();
        sleep(30);
        _exit(0);
    }
    return 0;
}

static int check(void)
{
    const char *files[] = {"/tmp/leftover", "/box/leftover", "/dev/shm/leftover"};
    for (int i = 0; i < 3; i++)
        if (access(files[i], F_OK) == 0)
            printf("file %s\n", files[i]);
    if (shmget(KEY, 0, 0) >= 0)
        printf("sysv shm\n");
    if (msgget(KEY, 0) >= 0)
        printf("sysv msg\n");
    if (mq_open("/leftover", O_RDONLY) >= 0)
        printf("posix mqueue\n");
    socklen_t len;
    struct sockaddr_un addr = abstract(&len);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&addr, len) == 0)
        printf("abstract socket\n");
    if (getenv("LEFTOVER"))
        printf("environment\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "make") == 0)
        return make();
    return check();
}
