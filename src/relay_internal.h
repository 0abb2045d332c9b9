/*
 * relay_internal.h - the relay's rooms, in layers that call only down (see run.c):
 * run.c -> session.c -> backfill.c -> relay.c. This header holds the relay's state and each
 * room's interface to the ones above it. Not an interface for any other module.
 */
#ifndef OUTBOXD_RELAY_INTERNAL_H
#define OUTBOXD_RELAY_INTERNAL_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "outboxd/anchor.h"
#include "outboxd/bookmark.h"
#include "outboxd/checkpoint.h"
#include "outboxd/config.h"
#include "outboxd/http.h"
#include "outboxd/jetstream.h"
#include "outboxd/outbox.h"
#include "outboxd/pgoutput.h"
#include "outboxd/pgstream.h"
#include "outboxd/publisher.h"

#define BATCH 512
/* How often a standby looks whether the slot became free. */
#define STANDBY_POLL_US INT64_C(1000000)
/* How often the server's WAL position is read for the lag gauge (by monitor.c's thread). */
#define MONITOR_US INT64_C(5000000)
/* Inside a transaction, events wait for the rest of it at most this long after the last data
 * from PostgreSQL before they are written to NATS (see stream()). */
#define TXN_HOLD_US INT64_C(200)
/* How often the summary line is logged. */
#define SUMMARY_US INT64_C(60000000)
/* A session that streamed this long was real progress: the reconnect backoff starts afresh.
 * One that failed sooner (START_REPLICATION refused, an error on the first change) keeps it
 * growing, so a failure that comes back after every connect never becomes a hot loop. */
#define STABLE_SESSION_US INT64_C(10000000)

typedef struct Mark {
    uint64_t lsn;
    uint64_t seq_limit;
    int64_t commit_time; /* of the newest transaction it covers; 0 for a keepalive's */
    uint64_t commit_lsn; /* that transaction's commit LSN */
} Mark;


typedef enum StreamEnd {
    STREAM_STOPPED,
    STREAM_PG_LOST,
    STREAM_FATAL,
    STREAM_SLOT_LOST,
    STREAM_ANCHOR_FALSE, /* the WAL is not the history the anchor came from (anchor.c, rule 4) */
} StreamEnd;

typedef struct BackfillRun BackfillRun;

typedef struct Relay {
    const Config *cfg;
    volatile sig_atomic_t *stop;
    PgStream *pg;
    PgStream *monitor; /* an ordinary session for checks between sessions (the monitoring
                        * thread, monitor.c, has its own) */
    Publisher *pub;
    OutboxMapper *mapper;
    HttpServer *http;
    PgoMessage *msg; /* decoder scratch (large: reused for every message) */
    OutboxEvent ev;
    OutboxEvent dlq;
    Ring marks; /* of Mark, in WAL order */
    PgSystem sys;
    bool have_sys;
    StreamInfo stream;
    /* the transaction being received */
    bool in_txn;
    OutboxTxn txn;
    uint32_t txn_rows; /* outbox rows seen in it so far */
    char source[ANCHOR_SOURCE_MAX]; /* "<system id>/<slot>": this relay's Outbox-Source */
    /* the skip rule (anchor.h): every event at or before the anchor is stored */
    Anchor anchor;
    bool have_anchor;
    bool proving;  /* the anchor's transaction is still ahead: skips are tentative and nothing
                    * is confirmed until it is met */
    bool distrust; /* an anchor proved false in this run: from now on only anchors this run
                    * made itself (run_stored) are used */
    Anchor run_stored; /* this run's own: the newest event it saw stored */
    bool have_run_stored;
    Anchor last_sent; /* the newest event handed to the publisher */
    bool have_last_sent;
    bool backfilling; /* backfilled rows flow: they are not skipped by position */
    uint32_t confirmed_timeline; /* the server's timeline when confirmed was reached */
    /* positions */
    uint64_t received;  /* newest WAL position received */
    uint64_t confirmed; /* newest position confirmable (and confirmed at the next update) */
    uint64_t reported;  /* flush position last sent */
    uint64_t checkpointed;
    char checkpoint_key[128];
    Checkpoint cp; /* the durable progress, as last read or written (see checkpoint.h) */
    BackfillRun *backfill; /* while a backfill is prepared or runs (backfill.c); its durable
                            * progress is cp.backfill */
    char tables[512];      /* the outbox tables, "public.a, public.b", for messages */
    bool streaming; /* a START_REPLICATION session is open (status updates may be sent) */
    int64_t streaming_since;     /* when the open session started streaming */
    /* silent connections (see stream() in relay.c) */
    int64_t last_received;       /* when the replication connection last brought a message */
    int64_t reply_asked;         /* when a reply was last asked for (0: not this session) */
    int stream_pid;              /* the server process of this run's last streaming session */
    char stream_started[64];     /* ... its backend_start, and the system it ran on: a slot */
    char stream_system[32];      /* held by exactly that process is this relay's own */
    unsigned reconnect_attempt;  /* failed sessions since the last stable one (the backoff) */
    /* timers */
    int64_t status_interval_us;
    int64_t next_status;
    int64_t next_checkpoint;
    int64_t next_summary;
    uint64_t summary_events;
    char err[1024];
} Relay;


static inline int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* relay.c: the pipeline */

/* Takes in acknowledgements and moves the confirmable position; -1 when an event can never be
 * published and the relay must stop (logged). */
int relay_poll_acks(Relay *r, int64_t now, PublisherStatus *st);
/* Sends a status update with the confirmed position; -1 when the connection failed (logged). */
int relay_send_status(Relay *r, bool reply);
/* Writes the checkpoint (r->cp with the confirmed position) and waits for JetStream to store
 * it; -1 when it could not (logged). */
int relay_checkpoint_put(Relay *r);
/* This run saw every event up to a stored: an anchor of its own (anchor.h). */
void relay_stored_at_least(Relay *r, const Anchor *a);
/* Handles a decoded Insert (or a backfilled row dressed as one): maps and publishes it. */
int relay_handle_insert(Relay *r, const PgoMessage *m);
/* Waits for the PostgreSQL socket (when want_pg), a change of the NATS connection or the
 * deadline; *pg_ready tells whether the socket has data. */
int relay_wait_for_work(Relay *r, bool want_pg, int64_t deadline, bool *pg_ready);
/* Waits until every published event is acknowledged (or the deadline), keeping status updates
 * flowing; returns the number still in flight. */
size_t relay_drain(Relay *r, int64_t deadline, bool until_stop);
/* Sleeps up to us, taking in acknowledgements, waking early for a stop request. */
void relay_nap(Relay *r, int64_t us);
/* Reads the stored checkpoint into *saved and takes its backfill state and later commit time
 * into r->cp: the relay that held the slot before may have moved both on. -1 when it cannot
 * be read (err says why). */
int relay_load_checkpoint(Relay *r, Checkpoint *saved);
/* Streams until stop, a lost connection, an anchor proved false or a fatal failure. */
StreamEnd relay_stream(Relay *r);

/* session.c: connecting, taking the slot, standing by, reconnecting */

/* Connects, identifies the system and runs the start-up checks and set-up (with the backfill
 * when the slot is new). Returns 0, or the error code of the failure (PGSTREAM_CHECK_FAILED
 * for a failed check), logged. */
int session_connect(Relay *r);
/* session_acquire_slot's answer when the slot is lost (wal_status lost). */
#define SESSION_SLOT_LOST 2
/* session_connect() / session_acquire_slot(): a state outboxd must not go past by itself
 * (logged with what to do); the relay exits 1 rather than retry. */
#define SESSION_FATAL 4
/* session_acquire_slot's answer when the checkpoint says a backfill is unfinished (another
 * relay's, or an interrupted one): reconnect, and session_connect takes it over. */
#define SESSION_BACKFILL_UNFINISHED 5
/* Takes the slot, standing by while another session holds it, and starts streaming. Returns 0
 * when streaming, 1 on stop, -1 when the connection failed, SESSION_SLOT_LOST when the slot
 * can never stream again, SESSION_BACKFILL_UNFINISHED. */
int session_acquire_slot(Relay *r);
/* After a lost connection: whether PostgreSQL invalidated the slot (it terminates the session
 * holding a slot it invalidates). Asked over the monitoring session; false when unknown. */
bool session_slot_lost(Relay *r);
/* Marks the relay not ready with a lost slot and logs the diagnosis and how to recover. */
void session_report_slot_lost(Relay *r);
/* With --slot-recovery=auto: drops the lost slot and records a recovery (backfill_recover);
 * the relay then reconnects and recovers. -1 when it cannot or must not (logged): the relay
 * stops with the runbook. */
int session_recover_lost(Relay *r);
/* Reconnects after a lost connection, with backoff. Returns 0, 1 on stop, -1 when it must not
 * go on (logged). */
int session_reconnect(Relay *r);
/* After a lost connection: lets every published event be acknowledged, so the session that
 * follows starts exactly after what is stored. */
void session_end(Relay *r);
/* After an anchor proved false (anchor.c, rule 4): trusts no anchor from the stream or the
 * checkpoint again in this run, and takes the false transaction out of the checkpoint. */
void session_distrust_anchors(Relay *r);

/* backfill.c: publishing the rows that were in the outbox before the slot existed */

/* Before the set-up: decides whether the set-up that follows backfills (setup->backfill). */
int backfill_prepare(Relay *r, PgSetup *setup);
/* After the set-up: runs or finishes the backfill the set-up started or an earlier run left
 * unfinished. */
int backfill_finish(Relay *r, PgSetup *setup, bool created);
/* Before streaming: true (logged) when the checkpoint says a backfill is unfinished, which
 * streaming must not overtake: reconnect, and session_connect takes the backfill over. */
bool backfill_unfinished(Relay *r);
/* The slot is lost, or missing after a failover (why says which), and --slot-recovery=auto:
 * records a recovery from the last transaction relayed in the checkpoint (recovery.h), so
 * that the next session_connect makes the slot and publishes what the stream lacks. -1 when
 * it cannot (logged). */
int backfill_recover(Relay *r, const char *why);
/* Frees what a backfill that did not get to backfill_finish left. */
void backfill_free(Relay *r);

#endif
