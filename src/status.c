/*
 * status.c - `outboxd status`.
 *
 * Reads what an operator needs to judge a relay without asking the relay itself, so it works
 * whether or not one runs: the slot (held by which PID, confirmed position, lag, WAL retained)
 * from PostgreSQL, the checkpoint and the stream from JetStream, and how far behind each durable
 * consumer of the stream is (consumers.c, the same numbers /metrics serves). A part that cannot
 * be reached is reported as such; only the slot decides the exit code (a missing or lost slot,
 * or a lag over --max-lag, is a problem).
 */
#include "outboxd/status.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <nats/nats.h>

#include "outboxd/consumers.h"
#include "outboxd/jetstream.h"
#include "outboxd/pgstream.h"
#include "outboxd/relay.h"
#include "outboxd/slot.h"
#include "outboxd/util.h"

typedef struct Report {
    char pg_error[512];
    char system_id[32];
    PgSlotInfo slot;
    char nats_error[1024];
    bool have_stream;
    StreamInfo stream;
    bool have_checkpoint;
    uint64_t checkpoint;
    Checkpoint cp;
    char checkpoint_key[128];
    bool have_consumers;
    ConsumerLag *consumers;
    size_t nconsumers;
    int64_t read_at_us; /* when the consumers were read, for their ages */
} Report;

static void read_postgres(const Config *cfg, Report *rep)
{
    PgStream *pg = NULL;
    char err[512];
    PgSystem sys;
    if (pgstream_connect(&pg, cfg->pg_url, err, sizeof(err)) != 0 ||
        pgstream_identify(pg, &sys, err, sizeof(err)) < 0 ||
        pgstream_slot_info(pg, cfg->slot, &rep->slot, err, sizeof(err)) < 0) {
        snprintf(rep->pg_error, sizeof(rep->pg_error), "%s", err);
    } else {
        snprintf(rep->system_id, sizeof(rep->system_id), "%s", sys.system_id);
    }
    pgstream_free(pg);
}

static void read_nats(const Config *cfg, Report *rep)
{
    jsCtx *js = NULL;
    char err[512] = "";
    natsConnection *nc = jsapi_connect_once(cfg->nats_url, rep->nats_error,
                                            sizeof(rep->nats_error));
    if (!nc)
        goto done;
    Buf filter;
    buf_init(&filter);
    relay_subject_filter(cfg, &filter);
    bool found = false;
    int rc = jsapi_find_stream(nc, filter.data, rep->stream.name, sizeof(rep->stream.name), &found,
                               err, sizeof(err));
    if (rc == 0 && !found)
        snprintf(err, sizeof(err), "no stream captures %s", filter.data);
    else if (rc == 0)
        rep->have_stream =
            jsapi_stream_info(nc, rep->stream.name, &rep->stream, err, sizeof(err)) == 0;
    buf_deinit(&filter);
    if (rep->have_stream && strcmp(cfg->consumers, "off") != 0) {
        char cerr[512];
        rep->have_consumers = consumers_collect(nc, rep->stream.name, cfg->consumers, 5000, NULL,
                                                &rep->consumers, &rep->nconsumers, cerr,
                                                sizeof(cerr)) == 0;
        rep->read_at_us = now_unix_us();
        if (!rep->have_consumers && !err[0])
            snprintf(err, sizeof(err), "%s", cerr);
    }
    if (rep->system_id[0] && natsConnection_JetStream(&js, nc, NULL) == NATS_OK) {
        snprintf(rep->checkpoint_key, sizeof(rep->checkpoint_key), "%s.%s", rep->system_id,
                 cfg->slot);
        char cerr[512];
        if (jsapi_checkpoint_read(js, cfg->checkpoint_bucket, rep->checkpoint_key,
                                  &rep->cp, cerr, sizeof(cerr)) == 0) {
            rep->checkpoint = rep->cp.lsn;
            rep->have_checkpoint = rep->checkpoint != 0;
        }
        else if (!err[0])
            snprintf(err, sizeof(err), "%s", cerr);
    }
    if (err[0])
        snprintf(rep->nats_error, sizeof(rep->nats_error), "%s", err);
done:
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
}

static uint64_t lag_of(const Report *rep)
{
    return rep->slot.wal > rep->slot.confirmed ? rep->slot.wal - rep->slot.confirmed : 0;
}

/* A lost slot: PostgreSQL removed WAL it needed; it retains nothing and can never stream. */
static bool lost(const Report *rep)
{
    return rep->slot.exists && strcmp(rep->slot.wal_status, "lost") == 0;
}

static uint64_t retained_of(const Report *rep)
{
    /* A lost slot has no restart_lsn (read as 0/0) and holds no WAL. */
    if (lost(rep) || rep->slot.restart == 0)
        return 0;
    return rep->slot.wal > rep->slot.restart ? rep->slot.wal - rep->slot.restart : 0;
}


static void print_text(const Config *cfg, const Report *rep, const char *verdict)
{
    char lsn[18], a[32], b[32];
    if (rep->pg_error[0]) {
        printf("postgres:   %s\n", rep->pg_error);
    } else if (!rep->slot.exists) {
        printf("slot:       \"%s\" does not exist\n", cfg->slot);
    } else {
        format_bytes_human(lag_of(rep), a, sizeof(a));
        format_bytes_human(retained_of(rep), b, sizeof(b));
        printf("slot:       \"%s\" (%s), %s", cfg->slot, rep->slot.plugin,
               rep->slot.active_pid ? "held by PID " : "not held by any relay");
        if (rep->slot.active_pid)
            printf("%d", rep->slot.active_pid);
        if (lost(rep)) {
            char detail[512], fix[1024];
            slot_lost_detail(cfg->slot, detail, sizeof(detail));
            slot_lost_fix(cfg->slot, fix, sizeof(fix));
            printf("\n            LOST: confirmed %s, retains no WAL\n            %s\n"
                   "            fix: %s",
                   lsn_format(rep->slot.confirmed, lsn), detail, fix);
        } else {
            printf("\n            confirmed %s, lag %s, WAL retained %s",
                   lsn_format(rep->slot.confirmed, lsn), a, b);
            if (rep->slot.wal_status[0])
                printf(" (%s)", rep->slot.wal_status);
        }
        printf("\n            system %s, server WAL at %s\n", rep->system_id,
               lsn_format(rep->slot.wal, lsn));
    }
    if (rep->have_checkpoint)
        printf("checkpoint: %s (bucket \"%s\", key %s)\n", lsn_format(rep->checkpoint, lsn),
               cfg->checkpoint_bucket, rep->checkpoint_key);
    else if (!rep->nats_error[0])
        printf("checkpoint: none yet (bucket \"%s\")\n", cfg->checkpoint_bucket);
    if (rep->have_stream)
        printf("stream:     \"%s\", %" PRIu64 " messages, last sequence %" PRIu64
               ", duplicate window %" PRId64 " s, %d replicas\n",
               rep->stream.name, rep->stream.messages, rep->stream.last_seq,
               rep->stream.duplicate_window_ms / 1000, rep->stream.replicas);
    for (size_t i = 0; i < rep->nconsumers; i++) {
        const ConsumerLag *c = &rep->consumers[i];
        int64_t age = consumers_age_us(c, rep->read_at_us);
        printf("consumer:   \"%s\": ", c->name);
        if (c->num_pending + c->num_ack_pending == 0) {
            printf("caught up\n");
            continue;
        }
        printf("%" PRIu64 " pending (%" PRIu64 " unacknowledged)",
               c->num_pending + c->num_ack_pending, c->num_ack_pending);
        if (age >= 0)
            printf(", oldest unprocessed committed %.1f s ago", (double)age / 1e6);
        if (c->num_redelivered)
            printf(", %" PRIu64 " redelivered", c->num_redelivered);
        printf("\n");
    }
    if (rep->have_consumers && rep->nconsumers == 0)
        printf("consumers:  none (durable consumers of \"%s\" show here)\n", rep->stream.name);
    if (rep->nats_error[0])
        printf("nats:       %s\n", rep->nats_error);
    printf("status:     %s\n", verdict);
}

static void print_json(const Config *cfg, const Report *rep, const char *verdict, bool healthy)
{
    char lsn[18];
    json_t *o = json_object();
    json_t *slot = json_object();
    json_object_set_new(slot, "name", json_string(cfg->slot));
    json_object_set_new(slot, "exists", json_boolean(rep->slot.exists));
    if (rep->slot.exists) {
        json_object_set_new(slot, "active", json_boolean(rep->slot.active_pid != 0));
        json_object_set_new(slot, "active_pid",
                            rep->slot.active_pid ? json_integer(rep->slot.active_pid) : json_null());
        json_object_set_new(slot, "confirmed_lsn",
                            json_string(lsn_format(rep->slot.confirmed, lsn)));
        json_object_set_new(slot, "restart_lsn",
                            lost(rep) || !rep->slot.restart
                                ? json_null()
                                : json_string(lsn_format(rep->slot.restart, lsn)));
        json_object_set_new(slot, "server_wal_lsn", json_string(lsn_format(rep->slot.wal, lsn)));
        json_object_set_new(slot, "lag_bytes", json_integer((json_int_t)lag_of(rep)));
        json_object_set_new(slot, "wal_retained_bytes",
                            json_integer((json_int_t)retained_of(rep)));
        json_object_set_new(slot, "wal_status", json_string(rep->slot.wal_status));
        json_object_set_new(slot, "lost", json_boolean(lost(rep)));
    }
    json_object_set_new(o, "slot", slot);
    json_object_set_new(o, "system_id",
                        rep->system_id[0] ? json_string(rep->system_id) : json_null());
    json_object_set_new(o, "postgres_error",
                        rep->pg_error[0] ? json_string(rep->pg_error) : json_null());
    json_t *ck = json_null();
    if (rep->have_checkpoint) {
        ck = json_object();
        json_object_set_new(ck, "lsn", json_string(lsn_format(rep->checkpoint, lsn)));
        json_object_set_new(ck, "bucket", json_string(cfg->checkpoint_bucket));
        json_object_set_new(ck, "key", json_string(rep->checkpoint_key));
    }
    json_object_set_new(o, "checkpoint", ck);
    json_t *st = json_null();
    if (rep->have_stream) {
        st = json_object();
        json_object_set_new(st, "name", json_string(rep->stream.name));
        json_object_set_new(st, "messages", json_integer((json_int_t)rep->stream.messages));
        json_object_set_new(st, "last_seq", json_integer((json_int_t)rep->stream.last_seq));
        json_object_set_new(st, "duplicate_window_seconds",
                            json_integer(rep->stream.duplicate_window_ms / 1000));
        json_object_set_new(st, "replicas", json_integer(rep->stream.replicas));
    }
    json_object_set_new(o, "stream", st);
    json_t *cs = rep->have_consumers ? json_array() : json_null();
    for (size_t i = 0; i < rep->nconsumers; i++) {
        const ConsumerLag *c = &rep->consumers[i];
        int64_t age = consumers_age_us(c, rep->read_at_us);
        json_t *j = json_object();
        json_object_set_new(j, "name", json_string(c->name));
        json_object_set_new(j, "stream", json_string(c->stream));
        json_object_set_new(j, "filter", json_string(c->filter));
        json_object_set_new(j, "pending_events",
                            json_integer((json_int_t)(c->num_pending + c->num_ack_pending)));
        json_object_set_new(j, "ack_pending_events", json_integer((json_int_t)c->num_ack_pending));
        json_object_set_new(j, "redelivered_events", json_integer((json_int_t)c->num_redelivered));
        json_object_set_new(j, "waiting_pulls", json_integer((json_int_t)c->num_waiting));
        json_object_set_new(j, "oldest_unprocessed_age_seconds",
                            age >= 0 ? json_real((double)age / 1e6) : json_null());
        json_object_set_new(j, "oldest_unprocessed_seq",
                            c->oldest_seq ? json_integer((json_int_t)c->oldest_seq) : json_null());
        json_array_append_new(cs, j);
    }
    json_object_set_new(o, "consumers", cs);
    json_object_set_new(o, "nats_error",
                        rep->nats_error[0] ? json_string(rep->nats_error) : json_null());
    json_object_set_new(o, "healthy", json_boolean(healthy));
    json_object_set_new(o, "status", json_string(verdict));
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    printf("%s\n", text ? text : "{}");
    free(text);
    json_decref(o);
}

int status_run(const Config *cfg, bool as_json, int64_t max_lag)
{
    Report rep;
    memset(&rep, 0, sizeof(rep));
    read_postgres(cfg, &rep);
    read_nats(cfg, &rep);

    int code = 0;
    char verdict[160] = "ok";
    if (rep.pg_error[0]) {
        code = EXIT_OUTBOXD_CHECK;
        snprintf(verdict, sizeof(verdict), "unknown: PostgreSQL cannot be reached");
    } else if (!rep.slot.exists) {
        code = 1;
        snprintf(verdict, sizeof(verdict), "slot \"%s\" is missing", cfg->slot);
    } else if (lost(&rep)) {
        code = 1;
        snprintf(verdict, sizeof(verdict),
                 "slot lost: \"%s\" can never stream again (outboxd slot drop --yes, then start "
                 "outboxd)",
                 cfg->slot);
    } else if (max_lag >= 0 && lag_of(&rep) > (uint64_t)max_lag) {
        code = 1;
        snprintf(verdict, sizeof(verdict), "lag %" PRIu64 " bytes exceeds --max-lag %" PRId64,
                 lag_of(&rep), max_lag);
    } else if (!rep.slot.active_pid) {
        snprintf(verdict, sizeof(verdict), "ok, but no relay holds the slot");
    }
    if (as_json)
        print_json(cfg, &rep, verdict, code == 0);
    else
        print_text(cfg, &rep, verdict);
    free(rep.consumers);
    return code;
}
