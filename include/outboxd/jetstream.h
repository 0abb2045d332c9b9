/*
 * jetstream.h - the JetStream API requests outboxd makes outside publishing: finding the stream
 * that captures a subject, reading its configuration and last message, and reading the
 * checkpoint. Shared by the publisher and `outboxd status`. Plain request/reply on a nats.c
 * connection; every function returns 0, or -1 with a one-line reason in err.
 */
#ifndef OUTBOXD_JETSTREAM_H
#define OUTBOXD_JETSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <nats/nats.h>

#include "outboxd/anchor.h"
#include "outboxd/checkpoint.h"
#include "outboxd/outbox.h"
#include "outboxd/util.h"

/* What outboxd needs to know of the stream it publishes to. */
typedef struct StreamInfo {
    char name[256];
    int replicas;
    int64_t duplicate_window_ms;
    uint64_t messages;
    uint64_t last_seq;
    char subjects[2048];   /* its subjects, space-separated */
    uint64_t bytes;        /* what it stores now */
    int64_t max_msgs;      /* its limits; -1 (or 0) when unlimited */
    int64_t max_bytes;
} StreamInfo;

/* Whether the stream, in the state info shows, is at its own global limits for one more
 * message of add_bytes (messages at max_msgs, or bytes past max_bytes): a full stream, whose
 * refusal ("maximum messages/bytes exceeded", 10077) passes once it has room again. */
bool jsapi_stream_at_limits(const StreamInfo *info, uint64_t add_bytes);

/* True when one of the stream's subjects captures every subject filter (a subject, or a
 * filter with wildcards) can be. */
bool jsapi_stream_covers(const StreamInfo *info, const char *filter);

/* An event of a relay's read back from its stream. */
typedef struct JsOwnEvent {
    uint64_t seq;        /* its stream sequence */
    Anchor anchor;       /* its position and commit time */
    uint64_t commit_lsn; /* Outbox-Commit-Lsn */
    char id[OUTBOX_MAX_EVENT_ID + 8]; /* its Nats-Msg-Id */
} JsOwnEvent;

/* Called for each event found, newest first; false stops the walk. */
typedef bool JsOwnVisit(void *arg, const JsOwnEvent *ev);

/*
 * The look-back: walks the stream back from sequence last_seq over the events of source (a
 * relay's "<system id>/<slot>"; what counts is anchor_from_event()'s rule), newest first,
 * handing each to visit until it says stop. Messages that are not such events (replayed
 * copies, another writer's, another relay's, deleted ones) are passed over, up to max_foreign
 * of them in a row. Returns 0, or -1 with the reason in err.
 */
int jsapi_own_events_back(natsConnection *nc, const char *stream, uint64_t last_seq,
                          const char *source, unsigned max_foreign, JsOwnVisit *visit, void *arg,
                          char *err, size_t errlen);

/* The newest event of source by that look-back: 1 with it in *last, 0 when there is none, -1
 * with the reason in err. */
int jsapi_last_own_event(natsConnection *nc, const char *stream, uint64_t last_seq,
                         const char *source, unsigned max_foreign, JsOwnEvent *last, char *err,
                         size_t errlen);

/* How outboxd authenticates to NATS and protects the connection. Every field may be NULL. */
typedef struct NatsSecurity {
    const char *user;
    const char *password;       /* the secret itself (from a file or the environment) */
    const char *token;
    const char *nkey_seed_file; /* the public key is derived from the seed */
    const char *creds_file;     /* user JWT and NKey seed */
    const char *tls_ca;         /* any TLS field turns TLS on */
    const char *tls_cert;
    const char *tls_key;
    const char *tls_server_name;
} NatsSecurity;

/* The security every NATS connection of this process uses (set once at start, before any
 * connection; NULL fields stay unused). The strings must outlive the process's connections. */
void jsapi_set_security(const NatsSecurity *sec);

/* How often every NATS connection of this process pings the server (set once at start):
 * after NATS_MAX_PINGS_OUT unanswered pings nats.c declares the connection stale and closes
 * (or, for the publisher's, replaces) it, so a silent connection lasts at most about three
 * intervals. nats.c alone pings every 2 minutes. */
#define NATS_MAX_PINGS_OUT 2
void jsapi_set_ping_interval(int64_t ms);
int64_t jsapi_ping_interval(void);

/* Applies the process's security to o. Returns 0, or -1 with the reason in err. */
int jsapi_apply_security(natsOptions *o, char *err, size_t errlen);

/* The NKey public key ("U...") of the seed in file path, into out (at least 64 bytes). */
int jsapi_nkey_public(const char *path, char *out, size_t outlen, char *err, size_t errlen);

/* Sets the server list of o from a comma-separated list of URLs. */
natsStatus jsapi_set_servers(natsOptions *o, const char *urls);

/* Connects once, without reconnecting, for commands that ask and exit. Returns the
 * connection, or NULL with "could not connect to NATS at <urls, redacted>: <reason>" in err. */
natsConnection *jsapi_connect_once(const char *urls, char *err, size_t errlen);

/* Copies urls with any "user:password@" replaced by "***@", for messages. */
void jsapi_redact_urls(const char *urls, char *out, size_t outlen);

/* A JetStream API request; the parsed reply (caller decrefs) or NULL. *no_responders tells
 * that nothing answered (JetStream not enabled, or not reachable). */
json_t *jsapi_request(natsConnection *nc, const char *subject, const char *body,
                      bool *no_responders, char *err, size_t errlen);

/* The same with a bound of timeout_ms milliseconds (jsapi_request waits 5 s). */
json_t *jsapi_request_within(natsConnection *nc, const char *subject, const char *body,
                             int64_t timeout_ms, bool *no_responders, char *err, size_t errlen);

/* A message as $JS.API.STREAM.MSG.GET returns it. */
typedef struct JsStoredMsg {
    uint64_t seq;
    int64_t time_unix_us; /* when JetStream stored it; 0 when unreadable */
    Buf hdrs;             /* the raw header block "NATS/1.0\r\nKey: value\r\n...", "" if none */
} JsStoredMsg;

/*
 * Reads the stream's message at seq or, with next_by_subj, the first message at or after seq
 * whose subject matches that filter (nats-server 2.9+). out->hdrs must be initialised; it is
 * overwritten. Returns 0, 1 when there is no such message, or -1 with the reason in err.
 */
int jsapi_msg_get(natsConnection *nc, const char *stream, uint64_t seq, const char *next_by_subj,
                  int64_t timeout_ms, JsStoredMsg *out, char *err, size_t errlen);

/* Copies the value of header name (matched exactly) out of a raw header block, trimmed;
 * false (and "") when the block has no such header. */
bool jsapi_header_value(const char *block, const char *name, char *out, size_t outlen);

/* The stream capturing subjects matching filters (space-separated), into name; *found false
 * when one of them has none; -1 with a reason when they go to different streams. */
int jsapi_find_stream(natsConnection *nc, const char *filter, char *name, size_t namelen,
                      bool *found, char *err, size_t errlen);

/* The stream's configuration and state. */
int jsapi_stream_info(natsConnection *nc, const char *name, StreamInfo *info, char *err,
                      size_t errlen);

/* The checkpoint under key in bucket, without creating anything; a zeroed *cp when absent. */
int jsapi_checkpoint_read(jsCtx *js, const char *bucket, const char *key, Checkpoint *cp,
                          char *err, size_t errlen);

#endif
