-- The default outbox table for outboxd. Write one row per event in the same transaction as the
-- business change; outboxd reads committed INSERTs from the WAL, so rows may be deleted at any
-- time after commit (even in the same transaction) without losing the event.
CREATE TABLE IF NOT EXISTS public.outbox (
    event_id       uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    schema_version int         NOT NULL DEFAULT 1,
    trace_id       text
);
