/* The run request's parser (layout in parse.h). Hostile input is assumed: it came from the
 * supervisor, but a parser that trusts its input is a bug waiting for a second writer. */
#include "parse.h"

#include <string.h>

static uint32_t u32le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t u64le(const unsigned char *p)
{
    return (uint64_t)u32le(p) | (uint64_t)u32le(p + 4) << 32;
}

/* A string record: non-empty, exactly one NUL, at its end. */
static char *string(unsigned char *data, uint32_t len)
{
    if (len < 2 || data[len - 1] != '\0' || memchr(data, '\0', len - 1) != NULL)
        return NULL;
    return (char *)data;
}

/* Does the absolute path hold a ".." component? */
static int has_dotdot(const char *path)
{
    for (const char *p = path; (p = strstr(p, "..")) != NULL; p += 2)
        if (p[-1] == '/' && (p[2] == '/' || p[2] == '\0'))
            return 1;
    return 0;
}

#define REFUSE(text)                                                                           \
    do {                                                                                       \
        *why = text;                                                                           \
        return -1;                                                                             \
    } while (0)

int parse_run(unsigned char *buf, size_t len, struct run *run, const char **why)
{
    static const unsigned char magic[8] = "SBXRUN1";
    memset(run, 0, sizeof(*run));
    if (len < sizeof(magic) || memcmp(buf, magic, sizeof(magic)) != 0)
        REFUSE("bad magic");
    size_t at = sizeof(magic);
    while (at < len) {
        if (len - at < 6)
            REFUSE("truncated record header");
        uint32_t tag = (uint32_t)buf[at] | (uint32_t)buf[at + 1] << 8;
        uint32_t size = u32le(buf + at + 2);
        at += 6;
        if (size > len - at)
            REFUSE("record longer than the request");
        unsigned char *data = buf + at;
        at += size;
        switch (tag) {
        case TAG_ARG:
            if (run->argc >= BOXINIT_MAX_ARGS)
                REFUSE("too many arguments");
            if (!(run->argv[run->argc++] = string(data, size)))
                REFUSE("bad argument");
            break;
        case TAG_ENV: {
            if (run->envc >= BOXINIT_MAX_ENV)
                REFUSE("too many environment variables");
            char *s = string(data, size);
            if (!s || s[0] == '=' || !strchr(s, '='))
                REFUSE("bad environment variable");
            run->envp[run->envc++] = s;
            break;
        }
        case TAG_CWD:
            if (run->cwd)
                REFUSE("two working directories");
            if (!(run->cwd = string(data, size)) || run->cwd[0] != '/' ||
                size > BOXINIT_MAX_PATH)
                REFUSE("bad working directory");
            break;
        case TAG_IDS:
            if (run->have_ids || size != 8)
                REFUSE("bad ids");
            run->uid = u32le(data);
            run->gid = u32le(data + 4);
            /* -1 means "unchanged" to setresuid(2). (0 is a build step's: the image's owner.) */
            if (run->uid == UINT32_MAX || run->gid == UINT32_MAX)
                REFUSE("bad ids");
            run->have_ids = 1;
            break;
        case TAG_RLIMIT:
            if (size != 12 || run->nrlimits >= BOXINIT_MAX_RLIMITS)
                REFUSE("bad rlimit");
            run->rlimits[run->nrlimits].which = u32le(data);
            run->rlimits[run->nrlimits].value = u64le(data + 4);
            if (run->rlimits[run->nrlimits].which >= 16) /* RLIM_NLIMITS */
                REFUSE("bad rlimit");
            run->nrlimits++;
            break;
        case TAG_BPF:
            if (run->bpf || size == 0 || size % 8 || size > BOXINIT_MAX_BPF)
                REFUSE("bad seccomp filter");
            run->bpf = data;
            run->bpf_len = size;
            break;
        case TAG_FLAGS:
            if (run->have_flags || size != 4 || (u32le(data) & ~RUN_KNOWN_FLAGS))
                REFUSE("bad flags");
            run->flags = u32le(data);
            run->have_flags = 1;
            break;
        case TAG_BIND: {
            if (size < 6 || run->nbinds >= BOXINIT_MAX_BINDS)
                REFUSE("bad bind");
            struct bind *b = &run->binds[run->nbinds];
            b->flags = u32le(data);
            b->target = string(data + 4, size - 4);
            if ((b->flags & ~BIND_KNOWN_FLAGS) || !b->target || b->target[0] != '/' ||
                size - 4 > BOXINIT_MAX_PATH || has_dotdot(b->target))
                REFUSE("bad bind");
            run->nbinds++;
            break;
        }
        default:
            REFUSE("unknown record");
        }
    }
    if (run->argc == 0)
        REFUSE("no argv");
    if (!run->cwd)
        REFUSE("no working directory");
    if (!run->have_ids)
        REFUSE("no ids");
    if (!run->bpf)
        REFUSE("no seccomp filter");
    run->argv[run->argc] = NULL;
    run->envp[run->envc] = NULL;
    return 0;
}
