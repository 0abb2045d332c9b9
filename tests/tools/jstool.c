/*
 * jstool - a small JetStream command line tool for the outboxd integration tests.
 *
 * Debian ships no NATS CLI, so the tests (and the demo script) look into JetStream with this.
 * Every subcommand takes --url URL (default nats://127.0.0.1:4222); options are given as
 * "--opt VALUE" or "--opt=VALUE".
 *
 *   jstool add-stream --name N --subjects SUBJ [--subjects SUBJ...] [--dupe-window SECONDS]
 *                     [--replicas N] [--storage file|memory] [--max-msg-size BYTES]
 *       Creates the stream. If a stream of that name exists (JetStream error 10058) with the same
 *       subjects, duplicate window, storage, replicas and max message size, this succeeds
 *       silently; with a different configuration it fails.
 *       Defaults: --dupe-window 120, --replicas 1, --storage file, no max message size.
 *
 *   jstool dump --stream N
 *       Prints every message in the stream, in sequence order, one JSON object per line:
 *         {"seq":1,"subject":"...","headers":{"Nats-Msg-Id":"...",...},"data_b64":"..."}
 *       A header with one value is a JSON string; a header with several values is a JSON array
 *       of strings in the order they were added, so a test can notice a repeated header. Values
 *       are trimmed of surrounding spaces and tabs; an empty value is "". Bytes in header values
 *       that are not valid UTF-8 are replaced by U+FFFD; bodies are base64 (RFC 4648, with
 *       padding) and may be binary. Messages stored after the dump started are not printed,
 *       deleted ones are skipped. Headers are parsed here from the raw block, not by libnats
 *       (see "Reading messages" below); 50,000 messages take about a second.
 *
 *   jstool info --stream N
 *       Prints {"messages":N,"first_seq":N,"last_seq":N,"duplicate_window_s":N,"subjects":[...]}.
 *
 *   jstool publish --subject S [--msg-id ID] --data TEXT
 *       A synchronous JetStream publish; prints the ack as
 *       {"stream":"...","seq":N,"duplicate":true|false}.
 *
 *   jstool delete-stream --name N
 *
 *   jstool request --subject S --data TEXT
 *       A core NATS request (e.g. to the JetStream API: $JS.API.STREAM.UPDATE.<name> with a
 *       stream configuration); prints the reply's body.
 *   jstool add-consumer --stream N --consumer C [--filter SUBJ] [--deliver all|new]
 *       Creates the durable pull consumer C (explicit acks, ack wait 10 minutes so nothing is
 *       redelivered during a test). Prints its info as JetStream returns it.
 *
 *   jstool delete-consumer --stream N --consumer C
 *
 *   jstool fetch --stream N --consumer C [--batch N] [--ack]
 *       Pulls up to N (default 1) messages without waiting for more than there are, and prints
 *       each as one JSON object: {"seq":N,"subject":"...","headers":{...},"data_b64":"...",
 *       "reply":"$JS.ACK..."}. Header values come from libnats (empty values may be misread).
 *       With --ack each is acknowledged (and the ack confirmed) before it is printed; without,
 *       "jstool ack --reply R" acknowledges it later.
 *
 *   jstool ack --reply R [--nak]
 *       Acknowledges the message whose reply subject is R, and waits for JetStream's answer;
 *       with --nak refuses it instead, so that JetStream delivers it again at once.
 *
 * Exit status 0 on success, 1 with a one-line message on stderr otherwise.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* asprintf, strndup */
#endif
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <nats/nats.h>

#define DEFAULT_URL "nats://127.0.0.1:4222"
#define MAX_SUBJECTS 32
#define API_WAIT_MS 10000

typedef struct Args {
    const char *cmd;
    const char *url;
    const char *name;
    const char *subjects[MAX_SUBJECTS];
    int nsubjects;
    int64_t dupe_window_s;
    int64_t replicas;
    const char *storage;
    int64_t max_msg_size;
    const char *subject;
    const char *msg_id;
    const char *data;
    const char *consumer;
    const char *filter;
    const char *deliver;
    int64_t batch;
    bool ack;
    bool nak;
    const char *reply;
} Args;

typedef struct Client {
    natsOptions *opts;
    natsConnection *nc;
    jsCtx *js;
} Client;

static void fail_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail_usage(const char *fmt, ...)
{
    va_list ap;

    fputs("jstool: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs(" (see jstool --help)\n", stderr);
    exit(1);
}

static void usage(void)
{
    fputs("usage:\n"
          "  jstool add-stream --name N --subjects S [--subjects S...] [--dupe-window SECONDS]\n"
          "                    [--replicas N] [--storage file|memory] [--max-msg-size BYTES]\n"
          "  jstool dump --stream N\n"
          "  jstool info --stream N\n"
          "  jstool publish --subject S [--msg-id ID] --data TEXT\n"
          "  jstool delete-stream --name N\n"
          "  jstool add-consumer --stream N --consumer C [--filter SUBJ] [--deliver all|new]\n"
          "  jstool delete-consumer --stream N --consumer C\n"
          "  jstool fetch --stream N --consumer C [--batch N] [--ack]\n"
          "  jstool ack --reply R [--nak]\n"
          "every subcommand takes --url URL (default " DEFAULT_URL ")\n",
          stdout);
}

static int64_t parse_int(const char *opt, const char *v, int64_t min)
{
    char *end = NULL;
    long long n;

    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || n < min) {
        fprintf(stderr, "jstool: invalid value for %s: \"%s\"\n", opt, v);
        exit(1);
    }
    return (int64_t)n;
}

static void parse_args(Args *a, int argc, char **argv)
{
    memset(a, 0, sizeof(*a));
    a->url = DEFAULT_URL;
    a->dupe_window_s = 120;
    a->replicas = 1;
    a->storage = "file";
    a->batch = 1;
    a->deliver = "all";

    if (argc < 2)
        fail_usage("missing subcommand");
    a->cmd = argv[1];
    if (strcmp(a->cmd, "--help") == 0 || strcmp(a->cmd, "-h") == 0) {
        usage();
        exit(0);
    }

    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i];
        const char *val = NULL;
        char key[64];
        const char *eq;

        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            usage();
            exit(0);
        }
        if (strcmp(arg, "--ack") == 0 || strcmp(arg, "--nak") == 0) {
            *(arg[2] == 'a' ? &a->ack : &a->nak) = true;
            continue;
        }
        if (strncmp(arg, "--", 2) != 0)
            fail_usage("unexpected argument \"%s\"", arg);
        eq = strchr(arg, '=');
        if (eq != NULL) {
            size_t n = (size_t)(eq - arg);
            if (n >= sizeof(key))
                fail_usage("unknown option \"%s\"", arg);
            memcpy(key, arg, n);
            key[n] = '\0';
            val = eq + 1;
        } else {
            if (strlen(arg) >= sizeof(key))
                fail_usage("unknown option \"%s\"", arg);
            strcpy(key, arg);
            if (i + 1 >= argc)
                fail_usage("option %s needs a value", key);
            val = argv[++i];
        }

        if (strcmp(key, "--url") == 0)
            a->url = val;
        else if (strcmp(key, "--name") == 0 || strcmp(key, "--stream") == 0)
            a->name = val;
        else if (strcmp(key, "--subjects") == 0) {
            if (a->nsubjects >= MAX_SUBJECTS)
                fail_usage("too many --subjects");
            a->subjects[a->nsubjects++] = val;
        } else if (strcmp(key, "--dupe-window") == 0)
            a->dupe_window_s = parse_int(key, val, 0);
        else if (strcmp(key, "--replicas") == 0)
            a->replicas = parse_int(key, val, 1);
        else if (strcmp(key, "--storage") == 0) {
            if (strcmp(val, "file") != 0 && strcmp(val, "memory") != 0)
                fail_usage("--storage must be file or memory, not \"%s\"", val);
            a->storage = val;
        } else if (strcmp(key, "--max-msg-size") == 0)
            a->max_msg_size = parse_int(key, val, 0);
        else if (strcmp(key, "--subject") == 0)
            a->subject = val;
        else if (strcmp(key, "--msg-id") == 0)
            a->msg_id = val;
        else if (strcmp(key, "--data") == 0)
            a->data = val;
        else if (strcmp(key, "--consumer") == 0)
            a->consumer = val;
        else if (strcmp(key, "--filter") == 0)
            a->filter = val;
        else if (strcmp(key, "--deliver") == 0) {
            if (strcmp(val, "all") != 0 && strcmp(val, "new") != 0)
                fail_usage("--deliver must be all or new, not \"%s\"", val);
            a->deliver = val;
        } else if (strcmp(key, "--batch") == 0)
            a->batch = parse_int(key, val, 1);
        else if (strcmp(key, "--reply") == 0)
            a->reply = val;
        else
            fail_usage("unknown option \"%s\"", key);
    }
}

/* Prints "jstool: WHAT: <status text> (<last error>)" plus the JetStream error code if any. */
static void report(const char *what, natsStatus s, jsErrCode jerr)
{
    const char *last = nats_GetLastError(NULL);

    fprintf(stderr, "jstool: %s: %s", what, natsStatus_GetText(s));
    if (last != NULL && last[0] != '\0' && strstr(last, natsStatus_GetText(s)) == NULL)
        fprintf(stderr, " (%s)", last);
    if (jerr != 0)
        fprintf(stderr, " [JetStream error %d]", (int)jerr);
    fputc('\n', stderr);
}

static void client_close(Client *c)
{
    jsCtx_Destroy(c->js);
    if (c->nc != NULL) {
        natsConnection_Close(c->nc);
        natsConnection_Destroy(c->nc);
    }
    natsOptions_Destroy(c->opts);
    memset(c, 0, sizeof(*c));
    nats_CloseAndWait(2000);
}

/* Connects and makes a JetStream context; on failure reports and returns false. */
static bool client_open(Client *c, const char *url)
{
    natsStatus s;
    jsOptions jo;
    char what[512];

    memset(c, 0, sizeof(*c));
    /* A comma-separated list goes in as a server list, as outboxd does it. */
    char copy[2048];
    const char *servers[16];
    int nservers = 0;
    snprintf(copy, sizeof(copy), "%s", url);
    for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok && nservers < 16;
         tok = strtok_r(NULL, ",", &save))
        servers[nservers++] = tok;
    s = natsOptions_Create(&c->opts);
    if (s == NATS_OK)
        s = natsOptions_SetServers(c->opts, servers, nservers);
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(c->opts, 5000);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(c->opts, 1);
    if (s == NATS_OK)
        s = natsOptions_SetName(c->opts, "jstool");
    if (s == NATS_OK)
        s = natsConnection_Connect(&c->nc, c->opts);
    if (s != NATS_OK) {
        snprintf(what, sizeof(what), "could not connect to NATS at %s", url);
        report(what, s, 0);
        client_close(c);
        return false;
    }
    jsOptions_Init(&jo);
    jo.Wait = API_WAIT_MS;
    s = natsConnection_JetStream(&c->js, c->nc, &jo);
    if (s != NATS_OK) {
        report("could not create a JetStream context", s, 0);
        client_close(c);
        return false;
    }
    return true;
}

static void need(const char *v, const char *opt, const char *cmd)
{
    if (v == NULL || v[0] == '\0') {
        fprintf(stderr, "jstool: %s needs %s\n", cmd, opt);
        exit(1);
    }
}

/* ---- JSON helpers ---------------------------------------------------------------------------- */

/* A JSON string from arbitrary bytes: invalid UTF-8 sequences become U+FFFD. */
static json_t *json_bytes(const char *s, size_t len)
{
    json_t *j = json_stringn(s, len);
    char *buf;
    size_t o = 0;

    if (j != NULL)
        return j;
    buf = malloc(len * 3 + 1);
    if (buf == NULL)
        abort();
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x80 && ch != 0) {
            buf[o++] = (char)ch;
        } else {
            buf[o++] = (char)0xEF;
            buf[o++] = (char)0xBF;
            buf[o++] = (char)0xBD;
        }
    }
    j = json_stringn(buf, o);
    free(buf);
    return j;
}

static void json_print(json_t *j)
{
    char *txt = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);

    if (txt == NULL)
        abort();
    fputs(txt, stdout);
    fputc('\n', stdout);
    free(txt);
}

/* ---- subcommands ----------------------------------------------------------------------------- */

static bool same_config(const jsStreamConfig *have, const jsStreamConfig *want)
{
    if (have->SubjectsLen != want->SubjectsLen)
        return false;
    for (int i = 0; i < want->SubjectsLen; i++) {
        bool found = false;
        for (int k = 0; k < have->SubjectsLen; k++)
            if (strcmp(have->Subjects[k], want->Subjects[i]) == 0)
                found = true;
        if (!found)
            return false;
    }
    if (have->Duplicates != want->Duplicates || have->Storage != want->Storage ||
        have->Replicas != want->Replicas)
        return false;
    if (want->MaxMsgSize > 0 && have->MaxMsgSize != want->MaxMsgSize)
        return false;
    if (want->MaxMsgSize <= 0 && have->MaxMsgSize > 0)
        return false;
    return true;
}

static int cmd_add_stream(Client *c, const Args *a)
{
    jsStreamConfig cfg;
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s;
    char what[512];
    int rc = 1;

    jsStreamConfig_Init(&cfg);
    cfg.Name = a->name;
    cfg.Subjects = (const char **)a->subjects;
    cfg.SubjectsLen = a->nsubjects;
    cfg.Duplicates = a->dupe_window_s * INT64_C(1000000000);
    cfg.Replicas = a->replicas;
    cfg.Storage = strcmp(a->storage, "memory") == 0 ? js_MemoryStorage : js_FileStorage;
    if (a->max_msg_size > 0) {
        if (a->max_msg_size > INT32_MAX) {
            fprintf(stderr, "jstool: --max-msg-size too large\n");
            return 1;
        }
        cfg.MaxMsgSize = (int32_t)a->max_msg_size;
    }

    s = js_AddStream(NULL, c->js, &cfg, NULL, &jerr);
    if (s == NATS_OK)
        return 0;
    if (jerr != JSStreamNameExistErr) {
        snprintf(what, sizeof(what), "could not add stream \"%s\"", a->name);
        report(what, s, jerr);
        return 1;
    }
    /* It exists: fine if its configuration matches what was asked. */
    jerr = 0;
    s = js_GetStreamInfo(&si, c->js, a->name, NULL, &jerr);
    if (s != NATS_OK) {
        snprintf(what, sizeof(what), "could not read existing stream \"%s\"", a->name);
        report(what, s, jerr);
        return 1;
    }
    if (si->Config != NULL && same_config(si->Config, &cfg))
        rc = 0;
    else
        fprintf(stderr, "jstool: stream \"%s\" exists with a different configuration\n", a->name);
    jsStreamInfo_Destroy(si);
    return rc;
}

static int cmd_info(Client *c, const Args *a)
{
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s;
    json_t *o, *subs;
    char what[512];

    s = js_GetStreamInfo(&si, c->js, a->name, NULL, &jerr);
    if (s != NATS_OK) {
        snprintf(what, sizeof(what), "could not get info of stream \"%s\"", a->name);
        report(what, s, jerr);
        return 1;
    }
    o = json_object();
    json_object_set_new(o, "messages", json_integer((json_int_t)si->State.Msgs));
    json_object_set_new(o, "first_seq", json_integer((json_int_t)si->State.FirstSeq));
    json_object_set_new(o, "last_seq", json_integer((json_int_t)si->State.LastSeq));
    json_object_set_new(o, "duplicate_window_s",
                        json_integer(si->Config ? si->Config->Duplicates / 1000000000 : 0));
    subs = json_array();
    for (int i = 0; si->Config != NULL && i < si->Config->SubjectsLen; i++)
        json_array_append_new(subs, json_string(si->Config->Subjects[i]));
    json_object_set_new(o, "subjects", subs);
    json_print(o);
    json_decref(o);
    jsStreamInfo_Destroy(si);
    return 0;
}

/*
 * Reading messages. libnats 3.4.1 misparses a header whose value is empty: "Key: \r\n" swallows
 * the next header line as its value (nats.c fixed this much later). The relay does send empty
 * values (an empty aggregate_type, say), so the dump never lets nats.c parse headers: it asks the
 * stream for each message through the JetStream API ($JS.API.STREAM.MSG.GET.<stream> with
 * {"seq":N}), whose JSON answer carries the raw header block and the body in base64, and parses the
 * header block itself. Requests are pipelined, DUMP_WINDOW at a time, on one inbox subscription,
 * and answers are printed in sequence order as soon as they are contiguous.
 */

#define DUMP_WINDOW 1024
#define DUMP_WAIT_MS 10000

enum { SLOT_PENDING = 0, SLOT_READY, SLOT_GONE };

static int b64val(unsigned char ch)
{
    if (ch >= 'A' && ch <= 'Z')
        return ch - 'A';
    if (ch >= 'a' && ch <= 'z')
        return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9')
        return ch - '0' + 52;
    if (ch == '+')
        return 62;
    if (ch == '/')
        return 63;
    return -1;
}

/* Decodes standard base64 (padding optional); returns a malloc'd buffer or NULL if malformed. */
static unsigned char *unbase64(const char *s, size_t *outlen)
{
    size_t len = strlen(s), o = 0;
    unsigned char *out = malloc(len / 4 * 3 + 3);
    uint32_t acc = 0;
    int bits = 0;

    if (out == NULL)
        abort();
    for (size_t i = 0; i < len; i++) {
        int v;
        if (s[i] == '=')
            break;
        v = b64val((unsigned char)s[i]);
        if (v < 0) {
            free(out);
            return NULL;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    *outlen = o;
    return out;
}

/* Adds key: value to hdrs; a repeated key turns its value into an array in arrival order. */
static void hdr_add(json_t *hdrs, const char *key, json_t *val)
{
    json_t *old = json_object_get(hdrs, key);

    if (old == NULL) {
        json_object_set_new(hdrs, key, val);
    } else if (json_is_array(old)) {
        json_array_append_new(old, val);
    } else {
        json_t *arr = json_array();
        json_array_append(arr, old);
        json_array_append_new(arr, val);
        json_object_set_new(hdrs, key, arr);
    }
}

/*
 * Parses a raw NATS header block ("NATS/1.0\r\nKey: value\r\n...\r\n\r\n") into hdrs. Values are
 * trimmed of surrounding spaces and tabs, as the Go client does. Returns false if it is not a
 * header block.
 */
static bool parse_headers(const unsigned char *p, size_t len, json_t *hdrs)
{
    size_t i = 0;

    if (len < 8 || memcmp(p, "NATS/1.0", 8) != 0)
        return false;
    while (i < len && p[i] != '\n')
        i++;
    i++; /* past the status line */
    while (i < len) {
        size_t start = i, end, colon, vs, ve;
        char *key;

        while (i < len && p[i] != '\n')
            i++;
        end = i; /* p[end] is '\n' or end of block */
        i++;
        if (end > start && p[end - 1] == '\r')
            end--;
        if (end == start)
            break; /* the empty line that ends the block */
        for (colon = start; colon < end && p[colon] != ':'; colon++)
            ;
        if (colon == end || colon == start)
            return false;
        vs = colon + 1;
        ve = end;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t'))
            vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t'))
            ve--;
        key = strndup((const char *)p + start, colon - start);
        if (key == NULL)
            abort();
        hdr_add(hdrs, key, json_bytes((const char *)p + vs, ve - vs));
        free(key);
    }
    return true;
}

/*
 * Turns one STREAM.MSG.GET answer into the output line for sequence seq. Returns SLOT_READY with
 * *line set, SLOT_GONE for a deleted message, or -1 (reported) on an error answer.
 */
static int dump_answer(const char *body, int bodylen, uint64_t seq, char **line)
{
    json_error_t jerr;
    json_t *root = json_loadb(body, (size_t)bodylen, 0, &jerr);
    json_t *msg, *err, *out = NULL, *hdrs;
    const char *hb64, *data, *subj;
    int rc = -1;

    if (root == NULL) {
        fprintf(stderr, "jstool: bad answer for sequence %" PRIu64 ": %s\n", seq, jerr.text);
        return -1;
    }
    err = json_object_get(root, "error");
    if (err != NULL) {
        json_int_t code = json_integer_value(json_object_get(err, "err_code"));
        if (code == 10037 || json_integer_value(json_object_get(err, "code")) == 404) {
            rc = SLOT_GONE; /* deleted or expired since the info was read */
        } else {
            const char *d = json_string_value(json_object_get(err, "description"));
            fprintf(stderr, "jstool: could not get message %" PRIu64 ": %s [JetStream error %d]\n", seq,
                    d ? d : "unknown error", (int)code);
        }
        goto done;
    }
    msg = json_object_get(root, "message");
    subj = json_string_value(json_object_get(msg, "subject"));
    if (msg == NULL || subj == NULL) {
        fprintf(stderr, "jstool: answer for sequence %" PRIu64 " has no message\n", seq);
        goto done;
    }
    out = json_object();
    hdrs = json_object();
    json_object_set_new(out, "seq", json_integer((json_int_t)seq));
    json_object_set_new(out, "subject", json_string(subj));
    json_object_set_new(out, "headers", hdrs);
    hb64 = json_string_value(json_object_get(msg, "hdrs"));
    if (hb64 != NULL && hb64[0] != '\0') {
        size_t hlen = 0;
        unsigned char *raw = unbase64(hb64, &hlen);
        bool ok = raw != NULL && parse_headers(raw, hlen, hdrs);
        free(raw);
        if (!ok) {
            fprintf(stderr, "jstool: message %" PRIu64 " has a malformed header block\n", seq);
            goto done;
        }
    }
    data = json_string_value(json_object_get(msg, "data"));
    json_object_set_new(out, "data_b64", json_string(data ? data : ""));
    *line = json_dumps(out, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (*line == NULL)
        abort();
    rc = SLOT_READY;
done:
    json_decref(out);
    json_decref(root);
    return rc;
}

static int cmd_dump(Client *c, const Args *a)
{
    jsStreamInfo *si = NULL;
    natsSubscription *sub = NULL;
    natsInbox *inbox = NULL;
    jsErrCode jerr = 0;
    natsStatus s;
    uint64_t first, last, n, next_req, next_print;
    size_t outstanding = 0;
    char **lines = NULL;
    unsigned char *state = NULL;
    char *api = NULL, *wild = NULL;
    char what[512];
    int rc = 1;

    s = js_GetStreamInfo(&si, c->js, a->name, NULL, &jerr);
    if (s != NATS_OK) {
        snprintf(what, sizeof(what), "could not get info of stream \"%s\"", a->name);
        report(what, s, jerr);
        return 1;
    }
    first = si->State.FirstSeq;
    last = si->State.LastSeq;
    jsStreamInfo_Destroy(si);
    if (last < first || last == 0)
        return 0;
    n = last - first + 1;
    lines = calloc((size_t)n, sizeof(*lines));
    state = calloc((size_t)n, 1);
    if (lines == NULL || state == NULL || asprintf(&api, "$JS.API.STREAM.MSG.GET.%s", a->name) < 0)
        abort();

    s = natsInbox_Create(&inbox);
    if (s == NATS_OK && asprintf(&wild, "%s.*", inbox) < 0)
        abort();
    if (s == NATS_OK)
        s = natsConnection_SubscribeSync(&sub, c->nc, wild);
    if (s != NATS_OK) {
        report("could not subscribe for answers", s, 0);
        goto done;
    }

    next_req = next_print = first;
    while (next_print <= last) {
        natsMsg *m = NULL;
        const char *subj, *dot;
        uint64_t seq;
        int st;

        while (outstanding < DUMP_WINDOW && next_req <= last) {
            char reply[256], req[64];
            int rl = snprintf(req, sizeof(req), "{\"seq\":%" PRIu64 "}", next_req);
            snprintf(reply, sizeof(reply), "%s.%" PRIu64, inbox, next_req);
            s = natsConnection_PublishRequest(c->nc, api, reply, req, rl);
            if (s != NATS_OK) {
                report("could not send a message request", s, 0);
                goto done;
            }
            next_req++;
            outstanding++;
        }
        s = natsSubscription_NextMsg(&m, sub, DUMP_WAIT_MS);
        if (s != NATS_OK) {
            snprintf(what, sizeof(what), "no answer for message %" PRIu64 " of stream \"%s\"", next_print,
                     a->name);
            report(what, s, 0);
            goto done;
        }
        subj = natsMsg_GetSubject(m);
        dot = strrchr(subj, '.');
        seq = dot ? strtoull(dot + 1, NULL, 10) : 0;
        if (seq < first || seq > last || state[seq - first] != SLOT_PENDING) {
            natsMsg_Destroy(m);
            continue;
        }
        outstanding--;
        st = dump_answer(natsMsg_GetData(m), natsMsg_GetDataLength(m), seq, &lines[seq - first]);
        natsMsg_Destroy(m);
        if (st < 0)
            goto done;
        state[seq - first] = (unsigned char)st;
        while (next_print <= last && state[next_print - first] != SLOT_PENDING) {
            size_t k = (size_t)(next_print - first);
            if (lines[k] != NULL) {
                fputs(lines[k], stdout);
                fputc('\n', stdout);
                free(lines[k]);
                lines[k] = NULL;
            }
            next_print++;
        }
    }
    rc = 0;

done:
    if (sub != NULL) {
        natsSubscription_Unsubscribe(sub);
        natsSubscription_Destroy(sub);
    }
    for (uint64_t k = 0; lines != NULL && k < n; k++)
        free(lines[k]);
    free(lines);
    free(state);
    free(api);
    free(wild);
    natsInbox_Destroy(inbox);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "jstool: could not write output: %s\n", strerror(errno));
        rc = 1;
    }
    return rc;
}

static int cmd_publish(Client *c, const Args *a)
{
    jsPubOptions po;
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    natsStatus s;
    json_t *o;
    char what[512];

    jsPubOptions_Init(&po);
    po.MsgId = a->msg_id;
    s = js_Publish(&pa, c->js, a->subject, a->data, (int)strlen(a->data), &po, &jerr);
    if (s != NATS_OK) {
        snprintf(what, sizeof(what), "could not publish to \"%s\"", a->subject);
        report(what, s, jerr);
        return 1;
    }
    o = json_object();
    json_object_set_new(o, "stream", json_string(pa->Stream ? pa->Stream : ""));
    json_object_set_new(o, "seq", json_integer((json_int_t)pa->Sequence));
    json_object_set_new(o, "duplicate", json_boolean(pa->Duplicate));
    json_print(o);
    json_decref(o);
    jsPubAck_Destroy(pa);
    return 0;
}

static int cmd_delete_stream(Client *c, const Args *a)
{
    jsErrCode jerr = 0;
    natsStatus s;
    char what[512];

    s = js_DeleteStream(c->js, a->name, NULL, &jerr);
    if (s != NATS_OK) {
        snprintf(what, sizeof(what), "could not delete stream \"%s\"", a->name);
        report(what, s, jerr);
        return 1;
    }
    return 0;
}

static int cmd_request(Client *c, const Args *a)
{
    natsMsg *reply = NULL;
    natsStatus s = natsConnection_RequestString(&reply, c->nc, a->subject, a->data, API_WAIT_MS);
    if (s != NATS_OK) {
        char what[512];
        snprintf(what, sizeof(what), "could not request \"%s\"", a->subject);
        report(what, s, 0);
        return 1;
    }
    printf("%.*s\n", natsMsg_GetDataLength(reply), natsMsg_GetData(reply));
    natsMsg_Destroy(reply);
    return 0;
}

/* ---- consumers ------------------------------------------------------------------------------ */

/* A JetStream API request with a JSON body; prints the reply and fails on an "error" in it. */
static int api_print(Client *c, const char *subject, const char *body, const char *what)
{
    natsMsg *reply = NULL;
    natsStatus s = natsConnection_RequestString(&reply, c->nc, subject, body, API_WAIT_MS);
    if (s != NATS_OK) {
        report(what, s, 0);
        return 1;
    }
    json_error_t jerr;
    json_t *o = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, &jerr);
    natsMsg_Destroy(reply);
    if (o == NULL) {
        fprintf(stderr, "jstool: %s: unreadable reply: %s\n", what, jerr.text);
        return 1;
    }
    json_t *err = json_object_get(o, "error");
    int rc = 0;
    if (err != NULL) {
        fprintf(stderr, "jstool: %s: %s [JetStream error %d]\n", what,
                json_string_value(json_object_get(err, "description")),
                (int)json_integer_value(json_object_get(err, "err_code")));
        rc = 1;
    } else {
        json_print(o);
    }
    json_decref(o);
    return rc;
}

static int cmd_add_consumer(Client *c, const Args *a)
{
    char subject[600], what[600];
    json_t *config = json_pack("{s:s,s:s,s:s,s:I}", "durable_name", a->consumer, "deliver_policy",
                               a->deliver, "ack_policy", "explicit", "ack_wait",
                               (json_int_t)600 * 1000000000);
    if (a->filter != NULL)
        json_object_set_new(config, "filter_subject", json_string(a->filter));
    json_t *req = json_pack("{s:s,s:o}", "stream_name", a->name, "config", config);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.DURABLE.CREATE.%s.%s", a->name,
             a->consumer);
    snprintf(what, sizeof(what), "could not create consumer \"%s\"", a->consumer);
    int rc = api_print(c, subject, body, what);
    free(body);
    return rc;
}

static int cmd_delete_consumer(Client *c, const Args *a)
{
    char subject[600], what[600];
    snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.DELETE.%s.%s", a->name, a->consumer);
    snprintf(what, sizeof(what), "could not delete consumer \"%s\"", a->consumer);
    return api_print(c, subject, "", what);
}

/* Acknowledges through the reply subject, waiting for the server's answer to the ack. */
static int ack_reply(Client *c, const char *reply_subject, const char *verb)
{
    natsMsg *answer = NULL;
    natsStatus s = natsConnection_RequestString(&answer, c->nc, reply_subject, verb, API_WAIT_MS);
    natsMsg_Destroy(answer);
    if (s != NATS_OK) {
        report("could not acknowledge", s, 0);
        return 1;
    }
    return 0;
}

static int cmd_ack(Client *c, const Args *a)
{
    return ack_reply(c, a->reply, a->nak ? "-NAK" : "+ACK");
}

/* RFC 4648 base64 with padding, in a new string. */
static char *base64(const char *data, size_t n)
{
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *p = (const unsigned char *)data;
    char *out = malloc(n / 3 * 4 + 5), *o = out;
    if (out == NULL)
        abort();
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)p[i] << 16 | (i + 1 < n ? (unsigned)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        *o++ = abc[v >> 18 & 63];
        *o++ = abc[v >> 12 & 63];
        *o++ = i + 1 < n ? abc[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? abc[v & 63] : '=';
    }
    *o = '\0';
    return out;
}

static int cmd_fetch(Client *c, const Args *a)
{
    char subject[600], body[128];
    natsInbox *inbox = NULL;
    natsSubscription *sub = NULL;
    natsStatus s = natsInbox_Create(&inbox);
    if (s == NATS_OK)
        s = natsConnection_SubscribeSync(&sub, c->nc, inbox);
    snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.MSG.NEXT.%s.%s", a->name, a->consumer);
    /* no_wait: answer at once with what there is, then a 404 status message. */
    snprintf(body, sizeof(body), "{\"batch\":%lld,\"no_wait\":true}", (long long)a->batch);
    if (s == NATS_OK)
        s = natsConnection_PublishRequestString(c->nc, subject, inbox, body);
    int rc = 0;
    for (int64_t got = 0; s == NATS_OK && got < a->batch;) {
        natsMsg *m = NULL;
        s = natsSubscription_NextMsg(&m, sub, API_WAIT_MS);
        if (s != NATS_OK)
            break;
        const char *reply = natsMsg_GetReply(m);
        if (reply == NULL || strncmp(reply, "$JS.ACK.", 8) != 0) {
            natsMsg_Destroy(m); /* a status message: no (more) messages */
            break;
        }
        got++;
        json_t *o = json_object();
        /* $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending> */
        unsigned long long seq = 0;
        const char *p = reply;
        for (int dots = 0; *p && dots < 5; p++)
            dots += *p == '.';
        seq = strtoull(p, NULL, 10);
        json_object_set_new(o, "seq", json_integer((json_int_t)seq));
        json_object_set_new(o, "subject", json_string(natsMsg_GetSubject(m)));
        json_t *hdrs = json_object();
        const char **keys = NULL;
        int nkeys = 0;
        if (natsMsgHeader_Keys(m, &keys, &nkeys) == NATS_OK) {
            for (int i = 0; i < nkeys; i++) {
                const char *v = NULL;
                if (natsMsgHeader_Get(m, keys[i], &v) == NATS_OK)
                    json_object_set_new(hdrs, keys[i], json_bytes(v, strlen(v)));
            }
            free((void *)keys);
        }
        json_object_set_new(o, "headers", hdrs);
        char *b64 = base64(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m));
        json_object_set_new(o, "data_b64", json_string(b64));
        free(b64);
        json_object_set_new(o, "reply", json_string(reply));
        if (a->ack)
            rc |= ack_reply(c, reply, "+ACK");
        json_print(o);
        json_decref(o);
        natsMsg_Destroy(m);
    }
    if (s != NATS_OK && s != NATS_TIMEOUT) {
        report("could not fetch", s, 0);
        rc = 1;
    }
    natsSubscription_Destroy(sub);
    natsInbox_Destroy(inbox);
    return rc;
}

int main(int argc, char **argv)
{
    Args a;
    Client c;
    int rc;
    int (*fn)(Client *, const Args *) = NULL;

    parse_args(&a, argc, argv);
    if (strcmp(a.cmd, "add-stream") == 0) {
        need(a.name, "--name", a.cmd);
        if (a.nsubjects == 0)
            need(NULL, "--subjects", a.cmd);
        fn = cmd_add_stream;
    } else if (strcmp(a.cmd, "dump") == 0) {
        need(a.name, "--stream", a.cmd);
        fn = cmd_dump;
    } else if (strcmp(a.cmd, "info") == 0) {
        need(a.name, "--stream", a.cmd);
        fn = cmd_info;
    } else if (strcmp(a.cmd, "publish") == 0) {
        need(a.subject, "--subject", a.cmd);
        if (a.data == NULL)
            need(NULL, "--data", a.cmd);
        fn = cmd_publish;
    } else if (strcmp(a.cmd, "add-consumer") == 0 || strcmp(a.cmd, "delete-consumer") == 0 ||
               strcmp(a.cmd, "fetch") == 0) {
        need(a.name, "--stream", a.cmd);
        need(a.consumer, "--consumer", a.cmd);
        fn = strcmp(a.cmd, "fetch") == 0          ? cmd_fetch
             : strcmp(a.cmd, "add-consumer") == 0 ? cmd_add_consumer
                                                  : cmd_delete_consumer;
    } else if (strcmp(a.cmd, "ack") == 0) {
        need(a.reply, "--reply", a.cmd);
        fn = cmd_ack;
    } else if (strcmp(a.cmd, "delete-stream") == 0) {
        need(a.name, "--name", a.cmd);
        fn = cmd_delete_stream;
    } else if (strcmp(a.cmd, "request") == 0) {
        need(a.subject, "--subject", a.cmd);
        if (a.data == NULL)
            need(NULL, "--data", a.cmd);
        fn = cmd_request;
    } else {
        fail_usage("unknown subcommand \"%s\"", a.cmd);
    }

    if (!client_open(&c, a.url))
        return 1;
    rc = fn(&c, &a);
    client_close(&c);
    return rc;
}
