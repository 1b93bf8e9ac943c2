/* Make one raw syscall named on the command line and print its result and errno.
 * usage: syscall NAME  -- used by the security tests; the box should kill or refuse each. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/sched.h>

static long call(const char *name) {
    if (!strcmp(name, "ptrace")) return syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, 1, 0, 0);
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3, 0);
    if (!strcmp(name, "add_key")) return syscall(SYS_add_key, "user", "k", "v", 1, -3);
    if (!strcmp(name, "bpf")) return syscall(SYS_bpf, 0, 0, 0);
    if (!strcmp(name, "perf_event_open")) return syscall(SYS_perf_event_open, 0, 0, -1, -1, 0);
    if (!strcmp(name, "userfaultfd")) return syscall(SYS_userfaultfd, 0);
    if (!strcmp(name, "io_uring_setup")) return syscall(SYS_io_uring_setup, 1, 0);
    if (!strcmp(name, "mount")) return syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, 0);
    if (!strcmp(name, "umount2")) return syscall(SYS_umount2, "/proc", 2);
    if (!strcmp(name, "unshare")) return syscall(SYS_unshare, CLONE_NEWUSER);
    if (!strcmp(name, "setns")) return syscall(SYS_setns, 0, 0);
    if (!strcmp(name, "pivot_root")) return syscall(SYS_pivot_root, "/tmp", "/tmp");
    if (!strcmp(name, "chroot")) return syscall(SYS_chroot, "/tmp");
    if (!strcmp(name, "sethostname")) return syscall(SYS_sethostname, "evil", 4);
    if (!strcmp(name, "settimeofday")) return syscall(SYS_settimeofday, 0, 0);
    if (!strcmp(name, "clock_settime")) return syscall(SYS_clock_settime, 0, 0);
    if (!strcmp(name, "mknod")) return syscall(SYS_mknod, "/tmp/null2", 020666, 0x103);
    if (!strcmp(name, "init_module")) return syscall(SYS_init_module, 0, 0, "");
    if (!strcmp(name, "kexec_load")) return syscall(SYS_kexec_load, 0, 0, 0, 0);
    if (!strcmp(name, "reboot")) return syscall(SYS_reboot, 0, 0, 0, 0);
    if (!strcmp(name, "process_vm_readv")) return syscall(SYS_process_vm_readv, 1, 0, 0, 0, 0, 0);
    if (!strcmp(name, "open_by_handle_at")) return syscall(SYS_open_by_handle_at, -1, 0, 0);
    if (!strcmp(name, "clone_newuser")) {
        long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid(pid, 0, 0);
        return pid > 0 ? 0 : pid;
    }
    /* TIOCSTI on stdin; _high sets bit 32, which the kernel drops (its command is 32 bits). */
    if (!strcmp(name, "tiocsti")) return syscall(SYS_ioctl, 0, (unsigned long)TIOCSTI, "x");
    if (!strcmp(name, "tiocsti_high")) return syscall(SYS_ioctl, 0, 0x100000000UL | TIOCSTI, "x");
    if (!strcmp(name, "clone3")) return syscall(SYS_clone3, 0, 0);
    if (!strcmp(name, "x32_getpid")) return syscall(0x40000000 | SYS_getpid);
    if (!strcmp(name, "int80_getpid")) {
        long ret;
        __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20 /* i386 getpid */) : "memory");
        return ret;
    }
    fprintf(stderr, "unknown call %s\n", name);
    return -2;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    errno = 0;
    long r = call(argv[1]);
    printf("%s returned %ld errno %d (%s)\n", argv[1], r, errno, strerror(errno));
    return 0;
}
