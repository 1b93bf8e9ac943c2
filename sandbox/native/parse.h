/*
 * The run request the supervisor sends the box (sandbox/native_protocol.py writes it).
 *
 * Layout: the 8-byte magic "SBXRUN1\0", then records until the end, each a little-endian
 * u16 tag, a u32 length and that many bytes. Strings end with the one NUL they may contain.
 *
 *   ARG     string          argv, in order, at least one
 *   ENV     string          one "NAME=value" of the environment, in order
 *   CWD     string          absolute path of the working directory, exactly once
 *   IDS     u32 uid, u32 gid  exactly once (never -1)
 *   RLIMIT  u32 resource, u64 value (soft = hard)
 *   BPF     the seccomp filter: sock_filter instructions (8 bytes each), exactly once
 *   FLAGS   u32 (RUN_LISTENER: ask for a user-notification listener), at most once
 *   BIND    u32 flags (BIND_DIR, BIND_WRITABLE), string target: one per bind descriptor
 *
 * parse_run never reads outside the buffer, never allocates, and keeps pointers into it.
 */
#ifndef BOXINIT_PARSE_H
#define BOXINIT_PARSE_H

#include <stddef.h>
#include <stdint.h>

#define BOXINIT_MAX_ARGS 4096
#define BOXINIT_MAX_ENV 4096
#define BOXINIT_MAX_RLIMITS 16
#define BOXINIT_MAX_BINDS 32
#define BOXINIT_MAX_PATH 4096
#define BOXINIT_MAX_BPF (4096 * 8)
#define BOXINIT_MAX_REQUEST (8 << 20)
#define BOXINIT_MAX_FDS (4 + BOXINIT_MAX_BINDS)

enum {
    TAG_ARG = 1,
    TAG_ENV = 2,
    TAG_CWD = 3,
    TAG_IDS = 4,
    TAG_RLIMIT = 5,
    TAG_BPF = 6,
    TAG_FLAGS = 7,
    TAG_BIND = 8,
};

#define RUN_LISTENER 1u
#define RUN_KNOWN_FLAGS RUN_LISTENER
#define BIND_DIR 1u
#define BIND_WRITABLE 2u
#define BIND_KNOWN_FLAGS (BIND_DIR | BIND_WRITABLE)

struct rlimit_entry {
    uint32_t which;
    uint64_t value;
};

struct bind {
    uint32_t flags;
    const char *target;
};

struct run {
    char *argv[BOXINIT_MAX_ARGS + 1];
    int argc;
    char *envp[BOXINIT_MAX_ENV + 1];
    int envc;
    const char *cwd;
    uint32_t uid, gid;
    int have_ids;
    struct rlimit_entry rlimits[BOXINIT_MAX_RLIMITS];
    int nrlimits;
    const unsigned char *bpf;
    uint32_t bpf_len;
    uint32_t flags;
    int have_flags;
    struct bind binds[BOXINIT_MAX_BINDS];
    int nbinds;
};

/* 0 on success; -1 with *why naming the first problem. */
int parse_run(unsigned char *buf, size_t len, struct run *run, const char **why);

#endif
