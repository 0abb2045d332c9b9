/*
 * run.c - the relay's run loop, the top of its layers: starts the HTTP listener and NATS,
 * drives the PostgreSQL sessions (session.c) and the streaming between them (relay.c), and
 * stops, confirming what is stored. It calls only down:
 *
 *   run.c       the run loop                                             (relay.h)
 *   session.c   PostgreSQL sessions: connect, slot, standby, where streaming starts,
 *               reconnect, a lost or missing slot
 *   backfill.c  rows read from the table: the first-start backfill and a recovery
 *   relay.c     the relay's state and the pipeline's primitives: decode -> map -> publish ->
 *               the confirm rule, the streaming loop                     (relay_internal.h)
 */
#include "outboxd/relay.h"

#include <inttypes.h>
#include <string.h>

#include "outboxd/consumers.h"
#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/monitor.h"
#include "outboxd/notify.h"
#include "relay_internal.h"

void relay_template_filter(const char *tmpl, Buf *out)
{
    const char *p = tmpl;
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        if (memchr(p, '{', n))
            buf_putc(out, '*');
        else
            buf_append(out, p, n);
        if (!dot)
            break;
        buf_putc(out, '.');
        p = dot + 1;
    }
}

/* Appends tmpl's filter to the space-separated list in out unless it is there already. */
static void add_filter(const char *tmpl, Buf *out)
{
    Buf f;
    buf_init(&f);
    relay_template_filter(tmpl, &f);
    bool seen = false;
    for (const char *p = out->data; p && *p && !seen;) {
        size_t n = strcspn(p, " ");
        seen = n == f.len && memcmp(p, f.data, n) == 0;
        p += n + (p[n] == ' ');
    }
    if (!seen) {
        if (out->len > 0)
            buf_putc(out, ' ');
        buf_append(out, f.data, f.len);
    }
    buf_deinit(&f);
}

void relay_subject_filter(const Config *cfg, Buf *out)
{
    for (size_t i = 0; i < cfg->ntables; i++)
        add_filter(cfg->tables[i].subject, out);
    if (cfg->messages)
        add_filter(cfg->t.subject, out);
}

/* ---- start and stop ----------------------------------------------------------------------------- */

static int start_http(Relay *r)
{
    if (strcmp(r->cfg->http_addr, "off") == 0)
        return 0;
    if (http_start(&r->http, r->cfg->http_addr, &metrics, r->err, sizeof(r->err)) < 0) {
        log_error("%s (set --http-addr, or --http-addr=off)", r->err);
        return -1;
    }
    log_info("serving /metrics, /healthz and /readyz on %s", r->cfg->http_addr);
    return 0;
}

static int start_nats(Relay *r)
{
    const Config *cfg = r->cfg;
    PublisherOptions po = {
        .urls = cfg->nats_url,
        .max_inflight = cfg->max_inflight,
        .max_inflight_bytes = cfg->max_inflight_bytes,
        .ack_timeout_ms = cfg->ack_timeout_ms,
        .strict_order = cfg->strict_order,
        .retry_min_ms = cfg->retry_min_ms,
        .retry_max_ms = cfg->retry_max_ms,
        .dead_letter_subject =
            strcmp(cfg->on_poison, "dead-letter") == 0 ? cfg->dead_letter_subject : NULL,
        .table = r->tables,
    };
    int rc = publisher_new(&r->pub, &po, r->err, sizeof(r->err));
    if (rc == 0) {
        Buf filter;
        buf_init(&filter);
        relay_subject_filter(cfg, &filter);
        rc = publisher_bind_stream(r->pub, filter.data, &r->stream, r->err, sizeof(r->err));
        if (rc == 0)
            log_info("connected to NATS; stream \"%s\" (%d replicas) captures %s", r->stream.name,
                     r->stream.replicas, filter.data);
        buf_deinit(&filter);
    }
    if (rc == 0)
        rc = publisher_checkpoint_open(r->pub, cfg->checkpoint_bucket, r->stream.replicas, r->err,
                                       sizeof(r->err));
    if (rc != 0) {
        log_error("%s", r->err);
        return rc == PUBLISH_CHECK_FAILED ? EXIT_OUTBOXD_CHECK : EXIT_OUTBOXD_FAILURE;
    }
    /* After a crash, events after the last checkpoint are sent again: they must still be in the
     * stream's duplicate window then, or JetStream stores them twice. */
    int64_t need = cfg->checkpoint_interval_ms + cfg->ack_timeout_ms + 60000;
    if (r->stream.duplicate_window_ms < need)
        log_warn("stream \"%s\" drops duplicates only within %" PRId64 " ms; events resent after "
                 "a crash may be stored twice: make its duplicate window at least %" PRId64
                 " ms (checkpoint interval + ack timeout + a minute for the restart)",
                 r->stream.name, r->stream.duplicate_window_ms, need);
    return 0;
}

int relay_run(const Config *cfg, volatile sig_atomic_t *stop)
{
    Relay r = {.cfg = cfg, .stop = stop};
    ConsumerWatch *consumers = NULL;
    Monitor *monitor = NULL;
    Bookmarks *bookmarks = NULL;
    int code = EXIT_OUTBOXD_FAILURE;
    outbox_event_init(&r.ev);
    outbox_event_init(&r.dlq);
    r.msg = xmalloc(sizeof(PgoMessage));
    r.next_summary = now_mono_us() + SUMMARY_US;
    pgstream_set_receive_timeout(cfg->pg_receive_timeout_ms);

    if (outbox_mapper_from_config(&r.mapper, cfg, r.err, sizeof(r.err)) < 0) {
        log_error("%s", r.err);
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }
    outbox_mapper_describe_tables(r.mapper, r.tables, sizeof(r.tables));
    if (cfg->bookmark_every_ms > 0 &&
        bookmarks_new(&bookmarks, cfg->slot, cfg->bookmark_every_ms, cfg->bookmark_keep_ms,
                      r.err, sizeof(r.err)) < 0) {
        log_error("%s", r.err);
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }
    if (start_http(&r) < 0) {
        code = EXIT_OUTBOXD_CHECK;
        goto done;
    }
    /* NATS first: its checks change nothing, while the PostgreSQL set-up may create a slot
     * that holds WAL from then on. */
    if ((code = start_nats(&r)) != 0)
        goto done;
    consumers_start(&consumers, cfg, r.stream.name);
    monitor_start(&monitor, cfg->pg_url, &bookmarks, MONITOR_US);
    code = EXIT_OUTBOXD_FAILURE;
    int rc = session_connect(&r);
    if (rc != 0) {
        code = rc == PGSTREAM_CHECK_FAILED ? EXIT_OUTBOXD_CHECK
               : *stop                     ? EXIT_OUTBOXD_OK /* stopped while standing by */
                                           : EXIT_OUTBOXD_FAILURE;
        goto done;
    }

    StreamEnd end = STREAM_STOPPED;
    for (;;) {
        const char *why = "lost the replication connection";
        rc = session_acquire_slot(&r);
        if (rc == SESSION_SLOT_LOST) {
            if (session_recover_lost(&r) < 0) {
                end = STREAM_SLOT_LOST;
                break;
            }
            why = "recovering the lost slot";
        } else if (rc == SESSION_FATAL) {
            end = STREAM_FATAL;
            break;
        } else if (rc == SESSION_BACKFILL_UNFINISHED) {
            why = "a backfill is unfinished";
        } else if (rc == 1) { /* stopped */
            break;
        } else if (rc == 0) {
            atomic_store(&metrics.pg_connected, 1);
            if (r.confirmed > r.reported)
                relay_send_status(&r, false);
            monitor_set_streaming(monitor, true);
            end = relay_stream(&r);
            publisher_hold(r.pub, false); /* what a transaction left held goes out */
            monitor_set_streaming(monitor, false);
            if (end == STREAM_ANCHOR_FALSE) {
                /* Start from the slot again, publishing what the false anchor skipped; the
                 * checkpoint no longer names its transaction. */
                session_distrust_anchors(&r);
                why = "ending the session";
                end = STREAM_PG_LOST;
            }
            if (end != STREAM_PG_LOST)
                break;
            /* PostgreSQL ends the session of a slot it invalidates: stop now rather than wait
             * for every event in flight (NATS may be what held the slot back). */
            if (session_slot_lost(&r)) {
                r.streaming = false;
                if (session_recover_lost(&r) < 0) {
                    end = STREAM_SLOT_LOST;
                    break;
                }
                why = "recovering the lost slot";
            }
        }
        log_warn("%s; letting outstanding events be acknowledged, then reconnecting", why);
        notify_systemd("STATUS=reconnecting to PostgreSQL");
        session_end(&r);
        if (*stop) {
            end = STREAM_STOPPED;
            break;
        }
        rc = session_reconnect(&r);
        if (rc > 0) {
            end = STREAM_STOPPED;
            break;
        }
        if (rc < 0) {
            end = STREAM_FATAL;
            break;
        }
    }

    notify_systemd("STOPPING=1");
    if (end == STREAM_STOPPED) {
        log_info("stopping: waiting up to %" PRId64 " ms for outstanding acknowledgements",
                 cfg->shutdown_timeout_ms);
        size_t left = relay_drain(&r, now_mono_us() + cfg->shutdown_timeout_ms * 1000, false);
        if (left)
            log_warn("%zu events still unacknowledged; they are sent again at the next start",
                     left);
    } else {
        /* Let what was published before the failure be acknowledged (bounded), so the slot is
         * confirmed right up to it: a restart then repeats nothing before the failure. */
        relay_drain(&r, now_mono_us() + cfg->shutdown_timeout_ms * 1000, false);
    }
    if (r.pg && r.streaming) {
        if (relay_send_status(&r, false) == 0 && pgstream_finish(r.pg, r.err, sizeof(r.err)) < 0)
            log_warn("%s", r.err);
    }
    if (r.confirmed > r.checkpointed && r.have_sys)
        relay_checkpoint_put(&r);
    log_info("published %" PRIu64 " events this run (%" PRIu64 " acknowledged as duplicates)",
             atomic_load(&metrics.events_published), atomic_load(&metrics.events_duplicate));
    if (end == STREAM_STOPPED) {
        log_info("shutting down: confirmed " LSN_FMT, LSN_ARGS(r.confirmed));
        code = EXIT_OUTBOXD_OK;
    } else if (end == STREAM_SLOT_LOST) {
        log_error("stopped: replication slot \"%s\" is lost (see above for how to recover)",
                  cfg->slot);
        code = EXIT_OUTBOXD_FAILURE;
    } else {
        log_error("stopped after a failure: confirmed " LSN_FMT
                  "; a restart resends everything after it",
                  LSN_ARGS(r.confirmed));
        code = EXIT_OUTBOXD_FAILURE;
    }
done:
    http_stop(r.http);
    consumers_stop(consumers);
    monitor_stop(monitor);
    publisher_free(r.pub);
    pgstream_free(r.pg);
    pgstream_free(r.monitor);
    bookmarks_free(bookmarks); /* when the monitor did not take them */
    outbox_mapper_free(r.mapper);
    outbox_event_deinit(&r.ev);
    outbox_event_deinit(&r.dlq);
    ring_free(&r.marks);
    backfill_free(&r);
    free(r.msg);
    return code;
}

