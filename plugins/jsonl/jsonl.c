/*
 * jsonl.c: the jsonl sink plugin: one JSON object per event, one per line.
 *
 *   [sink audit]
 *   plugin = jsonl
 *   path = /var/lib/walpipe/audit.jsonl   ; or "-" for stdout
 *   rotate_bytes = 104857600              ; 0 (default) = never rotate
 *   fsync = on                            ; default on
 *
 * Each line: {"source","lsn","seq","op","schema","table","xid","commit_ts","payload"}
 * (lsn as text X/X, commit_ts as ISO 8601 UTC or null, payload the staged JSON as is),
 * and "replay":true last on the lines of a `walpipe replay`.
 *
 * Durability: deliver writes the batch with one write() and fsyncs it; only
 * then are its tickets durable (poll and flush just report them).  Rotation
 * renames path to path.N (N one more than the newest) once the next batch
 * would pass rotate_bytes, so the files in order are path.1 .. path.N, path.
 *
 * Exactly once: after a crash or a retry the core delivers again events that
 * may already be in the file.  At open the torn tail of a crash (a last line
 * without its newline, never reported durable) is cut off; then, the first
 * time a session meets a source, the files are read backwards from the end
 * until a line of that source turns up: that line is the last event of the
 * source the file holds (events of a source are written in order), and every
 * event at or before it is skipped and reported durable, unless it is a
 * replay.  Replay lines are passed over by the search: they are history
 * written again, not the stream's tail.  One backward pass serves all
 * sources (it remembers how far it got).  stdout cannot be read back: "-" is at least once.
 *
 * A missing directory is WP_SINK_RETRY ("down" until it appears); a bad key
 * is WP_SINK_FATAL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <walpipe/sink.h>

static const char *const jsonl_keys[] = {"path", "rotate_bytes", "fsync", NULL};

/* The last event of one source the files hold. */
typedef struct tail {
    char *source;
    uint64_t lsn;
    int32_t seq;
    int known; /* 0: not found in what the backward pass read so far */
} tail_t;

typedef struct jsonl {
    const wp_sink_host_t *host;
    char *path;           /* NULL = stdout */
    long long rotate_bytes;
    int fsync_on;
    int fd;
    off_t size;           /* of the current file */
    uint64_t durable;     /* highest ticket written and synced */
    tail_t *tails;
    size_t ntails;
    /* the backward pass: file index (0 = path, k = path.(nfiles_rotated - k + 1)) and offset reached */
    int scan_file;        /* -1 when every file was read */
    off_t scan_off;
    char *scan_carry;     /* part of a line that straddles two reads */
    size_t scan_carry_len;
    int rotated;          /* N of the newest path.N, 0 = none */
    char *buf;            /* the batch being written */
    size_t len, cap;
} jsonl_t;

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return rc;
}

static void put(jsonl_t *j, const char *s, size_t n)
{
    if (j->len + n + 1 > j->cap) {
        j->cap = (j->len + n + 1) * 2;
        j->buf = realloc(j->buf, j->cap);
        if (j->buf == NULL)
            abort();
    }
    memcpy(j->buf + j->len, s, n);
    j->len += n;
}

static void put_str(jsonl_t *j, const char *s)
{
    put(j, s, strlen(s));
}

/* s as a JSON string (or null). */
static void put_json_string(jsonl_t *j, const char *s)
{
    if (s == NULL) {
        put_str(j, "null");
        return;
    }
    json_t *v = json_string(s);
    char *text = v ? json_dumps(v, JSON_ENCODE_ANY) : NULL;
    put_str(j, text ? text : "null");
    free(text);
    json_decref(v);
}

static int parse_lsn(const char *s, uint64_t *out)
{
    unsigned hi, lo;
    char end;
    if (sscanf(s, "%X/%X%c", &hi, &lo, &end) != 2)
        return -1;
    *out = ((uint64_t)hi << 32) | lo;
    return 0;
}

static tail_t *find_tail(jsonl_t *j, const char *source, int create)
{
    for (size_t i = 0; i < j->ntails; i++)
        if (strcmp(j->tails[i].source, source) == 0)
            return &j->tails[i];
    if (!create)
        return NULL;
    j->tails = realloc(j->tails, (j->ntails + 1) * sizeof *j->tails);
    if (j->tails == NULL || (j->tails[j->ntails].source = strdup(source)) == NULL)
        abort();
    j->tails[j->ntails].lsn = 0;
    j->tails[j->ntails].seq = 0;
    j->tails[j->ntails].known = 0;
    return &j->tails[j->ntails++];
}

/* One line met by the backward pass: the first line of a source met is its tail. */
static void scan_line(jsonl_t *j, const char *line, size_t n)
{
    json_error_t jerr;
    json_t *o = json_loadb(line, n, 0, &jerr);
    const char *source = json_string_value(json_object_get(o, "source"));
    const char *lsn = json_string_value(json_object_get(o, "lsn"));
    if (json_is_true(json_object_get(o, "replay"))) {
        json_decref(o); /* a replay's line says nothing of where the stream is */
        return;
    }
    json_t *seq = json_object_get(o, "seq");
    uint64_t l;
    if (source && lsn && json_is_integer(seq) && parse_lsn(lsn, &l) == 0) {
        tail_t *t = find_tail(j, source, 1);
        if (!t->known) {
            t->known = 1;
            t->lsn = l;
            t->seq = (int32_t)json_integer_value(seq);
        }
    }
    json_decref(o);
}

/* The name of file k of the backward pass: 0 = path, then path.N down to path.1. */
static void file_name(const jsonl_t *j, int k, char *buf, size_t size)
{
    if (k == 0)
        snprintf(buf, size, "%s", j->path);
    else
        snprintf(buf, size, "%s.%d", j->path, j->rotated - k + 1);
}

/* Reads backwards until source's tail is known or nothing is left; 0, or -1 with err. */
static int scan_until(jsonl_t *j, const char *source, char *err, size_t errlen)
{
    char name[PATH_MAX + 16];
    char chunk[65536];
    tail_t *t = find_tail(j, source, 1);
    while (!t->known && j->scan_file >= 0) {
        file_name(j, j->scan_file, name, sizeof name);
        int fd = open(name, O_RDONLY);
        if (fd < 0 && errno != ENOENT)
            return fail(err, errlen, WP_SINK_RETRY, "could not read %s: %s", name, strerror(errno));
        if (j->scan_off < 0 && fd >= 0)
            j->scan_off = lseek(fd, 0, SEEK_END);
        if (fd < 0 || j->scan_off <= 0) {
            if (j->scan_carry_len) /* the file's first line */
                scan_line(j, j->scan_carry, j->scan_carry_len);
            j->scan_carry_len = 0;
            if (fd >= 0)
                close(fd);
            j->scan_file = j->scan_file + 1 > j->rotated ? -1 : j->scan_file + 1;
            j->scan_off = -1;
            t = find_tail(j, source, 1);
            continue;
        }
        size_t want = j->scan_off < (off_t)sizeof chunk ? (size_t)j->scan_off : sizeof chunk;
        ssize_t got = pread(fd, chunk, want, j->scan_off - (off_t)want);
        close(fd);
        if (got != (ssize_t)want)
            return fail(err, errlen, WP_SINK_RETRY, "could not read %s: %s", name,
                        got < 0 ? strerror(errno) : "short read");
        j->scan_off -= (off_t)want;
        /* chunk + carry, split at newlines from the end */
        size_t total = want + j->scan_carry_len;
        char *all = malloc(total + 1);
        if (all == NULL)
            abort();
        memcpy(all, chunk, want);
        if (j->scan_carry_len)
            memcpy(all + want, j->scan_carry, j->scan_carry_len);
        size_t end = total;
        for (size_t i = total; i > 0; i--) {
            if (all[i - 1] != '\n')
                continue;
            if (end > i)
                scan_line(j, all + i, end - i);
            end = i - 1;
        }
        free(j->scan_carry);
        j->scan_carry = malloc(end + 1);
        if (j->scan_carry == NULL)
            abort();
        if (end)
            memcpy(j->scan_carry, all, end);
        j->scan_carry_len = end;
        free(all);
        t = find_tail(j, source, 1);
    }
    return WP_SINK_OK;
}

/* Opens (creating) the current file for appending; fsyncs the directory when it was created. */
static int open_current(jsonl_t *j, char *err, size_t errlen)
{
    struct stat st;
    int existed = stat(j->path, &st) == 0;
    j->fd = open(j->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (j->fd < 0) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", j->path);
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        if (errno == ENOENT)
            return fail(err, errlen, WP_SINK_RETRY, "directory %s of path %s does not exist; create it",
                        slash ? dir : ".", j->path);
        return fail(err, errlen, WP_SINK_RETRY, "could not open %s: %s", j->path, strerror(errno));
    }
    if (fstat(j->fd, &st) != 0)
        return fail(err, errlen, WP_SINK_RETRY, "could not stat %s: %s", j->path, strerror(errno));
    j->size = st.st_size;
    if (!existed && j->fsync_on) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", j->path);
        char *slash = strrchr(dir, '/');
        snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - j->path) : 1, slash ? j->path : ".");
        int dfd = open(dir[0] ? dir : "/", O_RDONLY | O_DIRECTORY);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    return WP_SINK_OK;
}

/*
 * The file's writers (`walpipe run`'s sink and a `walpipe replay` through the
 * same sink) hold an exclusive flock while they write a batch, and while one
 * looks for a torn tail: a line another process is writing is never taken
 * for a crash's torn tail and cut.
 */
static int lock_file(jsonl_t *j, int op, char *err, size_t errlen)
{
    while (flock(j->fd, op) != 0) {
        if (errno != EINTR)
            return fail(err, errlen, WP_SINK_RETRY, "could not %s %s: %s", op == LOCK_UN ? "unlock" : "lock",
                        j->path, strerror(errno));
    }
    return WP_SINK_OK;
}

/* Cuts a torn last line (a crash mid-write: never reported durable) off the current file. */
static int cut_torn_tail(jsonl_t *j, char *err, size_t errlen)
{
    char c;
    struct stat st;
    int rc = lock_file(j, LOCK_EX, err, errlen);
    if (rc != WP_SINK_OK)
        return rc;
    if (fstat(j->fd, &st) != 0) {
        rc = fail(err, errlen, WP_SINK_RETRY, "could not stat %s: %s", j->path, strerror(errno));
        goto out;
    }
    j->size = st.st_size;
    off_t end = j->size;
    int rfd = open(j->path, O_RDONLY);
    if (rfd < 0) {
        rc = fail(err, errlen, WP_SINK_RETRY, "could not read %s: %s", j->path, strerror(errno));
        goto out;
    }
    while (end > 0 && pread(rfd, &c, 1, end - 1) == 1 && c != '\n')
        end--;
    close(rfd);
    if (end == j->size)
        goto out;
    if (ftruncate(j->fd, end) != 0) {
        rc = fail(err, errlen, WP_SINK_RETRY, "could not cut the torn last line of %s: %s", j->path,
                  strerror(errno));
        goto out;
    }
    j->host->log(j->host, WP_SINK_LOG_WARN, "cut a torn last line (an unfinished write) off the file");
    j->size = end;
out:
    if (lock_file(j, LOCK_UN, err, errlen) != WP_SINK_OK && rc == WP_SINK_OK)
        rc = WP_SINK_RETRY;
    return rc;
}

static int jsonl_open(const wp_sink_host_t *host, void **state, char *err, size_t errlen)
{
    const char *path = host->config_get(host, "path");
    const char *rotate = host->config_get(host, "rotate_bytes");
    const char *fs = host->config_get(host, "fsync");
    char *end;
    int rc;

    if (path == NULL || path[0] == '\0')
        return fail(err, errlen, WP_SINK_FATAL, "[sink %s] has no path; add path = FILE (or - for stdout)",
                    host->sink_name);
    long long rb = rotate ? strtoll(rotate, &end, 10) : 0;
    if (rotate && (rotate[0] == '\0' || *end != '\0' || rb < 0))
        return fail(err, errlen, WP_SINK_FATAL, "rotate_bytes of [sink %s] must be a number of bytes, 0 = never",
                    host->sink_name);
    int fsync_on = 1;
    if (fs && (strcmp(fs, "off") == 0 || strcmp(fs, "false") == 0 || strcmp(fs, "0") == 0 || strcmp(fs, "no") == 0))
        fsync_on = 0;
    else if (fs && strcmp(fs, "on") != 0 && strcmp(fs, "true") != 0 && strcmp(fs, "1") != 0 && strcmp(fs, "yes") != 0)
        return fail(err, errlen, WP_SINK_FATAL, "fsync of [sink %s] must be on or off", host->sink_name);

    jsonl_t *j = calloc(1, sizeof *j);
    if (j == NULL)
        abort();
    j->host = host;
    j->rotate_bytes = rb;
    j->fsync_on = fsync_on;
    j->fd = -1;
    j->scan_file = -1;
    j->scan_off = -1;
    if (strcmp(path, "-") == 0) {
        j->fd = STDOUT_FILENO;
        j->rotate_bytes = 0;
        *state = j;
        return WP_SINK_OK;
    }
    j->path = strdup(path);
    if (j->path == NULL)
        abort();
    for (;;) { /* the newest rotated file */
        char name[PATH_MAX + 16];
        snprintf(name, sizeof name, "%s.%d", j->path, j->rotated + 1);
        if (access(name, F_OK) != 0)
            break;
        j->rotated++;
    }
    if ((rc = open_current(j, err, errlen)) != WP_SINK_OK || (rc = cut_torn_tail(j, err, errlen)) != WP_SINK_OK) {
        if (j->fd >= 0)
            close(j->fd);
        free(j->path);
        free(j);
        return rc;
    }
    j->scan_file = 0;
    *state = j;
    return WP_SINK_OK;
}

/* Moves the current file to path.N+1 and starts a new one. */
static int rotate(jsonl_t *j, char *err, size_t errlen)
{
    char name[PATH_MAX + 16];
    snprintf(name, sizeof name, "%s.%d", j->path, j->rotated + 1);
    if (j->fsync_on && fsync(j->fd) != 0)
        return fail(err, errlen, WP_SINK_RETRY, "could not fsync %s: %s", j->path, strerror(errno));
    close(j->fd);
    j->fd = -1;
    if (rename(j->path, name) != 0)
        return fail(err, errlen, WP_SINK_RETRY, "could not rotate %s to %s: %s", j->path, name, strerror(errno));
    j->rotated++;
    if (j->scan_file > 0 || (j->scan_file == 0 && j->scan_off >= 0))
        j->scan_file++; /* the backward pass was in a file that now has a number one further away */
    return open_current(j, err, errlen);
}

static void put_event(jsonl_t *j, const wp_sink_event_t *ev)
{
    char num[64], lsn[32], ts[64];
    put_str(j, "{\"source\":");
    put_json_string(j, ev->source);
    snprintf(lsn, sizeof lsn, "%X/%X", (unsigned)(ev->lsn >> 32), (unsigned)ev->lsn);
    put_str(j, ",\"lsn\":\"");
    put_str(j, lsn);
    snprintf(num, sizeof num, "\",\"seq\":%d,\"op\":", ev->seq);
    put_str(j, num);
    put_json_string(j, ev->op);
    put_str(j, ",\"schema\":");
    put_json_string(j, ev->schema);
    put_str(j, ",\"table\":");
    put_json_string(j, ev->table);
    if (ev->xid >= 0)
        snprintf(num, sizeof num, ",\"xid\":%" PRId64 ",\"commit_ts\":", ev->xid);
    else
        snprintf(num, sizeof num, ",\"xid\":null,\"commit_ts\":");
    put_str(j, num);
    if (ev->commit_us != 0) {
        time_t secs = (time_t)(ev->commit_us / 1000000);
        struct tm tm;
        gmtime_r(&secs, &tm);
        size_t n = strftime(ts, sizeof ts, "\"%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(ts + n, sizeof ts - n, ".%06dZ\"", (int)(ev->commit_us % 1000000));
        put_str(j, ts);
    } else {
        put_str(j, "null");
    }
    put_str(j, ",\"payload\":");
    if (ev->payload)
        put(j, ev->payload, ev->payload_len);
    else
        put_str(j, "null");
    put_str(j, ev->replay ? ",\"replay\":true}\n" : "}\n");
}

/* Writes and syncs the batch in the buffer. */
static int write_out(jsonl_t *j, char *err, size_t errlen)
{
    size_t off = 0;
    int rc = j->path ? lock_file(j, LOCK_EX, err, errlen) : WP_SINK_OK;
    if (rc != WP_SINK_OK)
        return rc;
    while (off < j->len) {
        ssize_t n = write(j->fd, j->buf + off, j->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = fail(err, errlen, WP_SINK_RETRY, "could not write %s: %s", j->path ? j->path : "stdout",
                      strerror(errno));
            goto out;
        }
        off += (size_t)n;
    }
    j->size += (off_t)j->len;
    j->len = 0;
    if (j->fsync_on && j->path && fsync(j->fd) != 0)
        rc = fail(err, errlen, WP_SINK_RETRY, "could not fsync %s: %s", j->path, strerror(errno));
out:
    if (j->path && lock_file(j, LOCK_UN, err, errlen) != WP_SINK_OK && rc == WP_SINK_OK)
        rc = WP_SINK_RETRY;
    return rc;
}

static int jsonl_deliver(void *state, const wp_sink_event_t *events, size_t n, char *err, size_t errlen)
{
    jsonl_t *j = state;
    int rc;
    for (size_t i = 0; i < n; i++) {
        const wp_sink_event_t *ev = &events[i];
        if (j->path && !ev->replay) {
            if ((rc = scan_until(j, ev->source, err, errlen)) != WP_SINK_OK)
                return rc;
            tail_t *t = find_tail(j, ev->source, 1);
            if (t->known && (ev->lsn < t->lsn || (ev->lsn == t->lsn && ev->seq <= t->seq)))
                continue; /* already in the file: written by an earlier session */
            t->known = 1;
            t->lsn = ev->lsn;
            t->seq = ev->seq;
        }
        size_t before = j->len;
        put_event(j, ev);
        if (j->rotate_bytes > 0 && j->size + (off_t)j->len > j->rotate_bytes && j->size + (off_t)before > 0) {
            /* this line would pass the limit: what came before it goes to the current file */
            size_t line = j->len - before;
            char *saved = malloc(line);
            if (saved == NULL)
                abort();
            memcpy(saved, j->buf + before, line);
            j->len = before;
            if ((rc = write_out(j, err, errlen)) != WP_SINK_OK || (rc = rotate(j, err, errlen)) != WP_SINK_OK) {
                free(saved);
                return rc;
            }
            put(j, saved, line);
            free(saved);
        }
    }
    if ((rc = write_out(j, err, errlen)) != WP_SINK_OK)
        return rc;
    if (n > 0)
        j->durable = events[n - 1].ticket;
    return WP_SINK_OK;
}

static int jsonl_poll(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen)
{
    (void)timeout_ms;
    (void)err;
    (void)errlen;
    *durable = ((jsonl_t *)state)->durable;
    return WP_SINK_OK;
}

static int jsonl_flush(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen)
{
    return jsonl_poll(state, timeout_ms, durable, err, errlen);
}

static void jsonl_close(void *state)
{
    jsonl_t *j = state;
    if (j == NULL)
        return;
    if (j->fd >= 0 && j->fd != STDOUT_FILENO)
        close(j->fd);
    for (size_t i = 0; i < j->ntails; i++)
        free(j->tails[i].source);
    free(j->tails);
    free(j->scan_carry);
    free(j->buf);
    free(j->path);
    free(j);
}

static const wp_sink_plugin_t jsonl_plugin = {
    .abi_version = WP_SINK_ABI_VERSION,
    .name = "jsonl",
    .keys = jsonl_keys,
    .open = jsonl_open,
    .deliver = jsonl_deliver,
    .poll = jsonl_poll,
    .flush = jsonl_flush,
    .close = jsonl_close,
};

WP_SINK_EXPORT const wp_sink_plugin_t *wp_sink_plugin_entry(void);

WP_SINK_EXPORT const wp_sink_plugin_t *wp_sink_plugin_entry(void)
{
    return &jsonl_plugin;
}
