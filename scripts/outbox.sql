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

-- The table-less outbox: outbox_emit() writes one event as a transactional logical decoding
-- message with the prefix outboxd reads (--message-prefix, default 'outbox'). Nothing is stored
-- in a table: the event exists in the WAL only, and only once the transaction commits. A NULL
-- argument leaves its field out. Returns the message's LSN.
CREATE OR REPLACE FUNCTION public.outbox_emit(
    event_id       text,
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT NULL,
    trace_id       text  DEFAULT NULL,
    schema_version int   DEFAULT 1,
    prefix         text  DEFAULT 'outbox'
) RETURNS pg_lsn LANGUAGE sql VOLATILE AS $$
    SELECT pg_catalog.pg_logical_emit_message(true, prefix, json_build_object(
        'event_id', event_id, 'aggregate_type', aggregate_type, 'aggregate_id', aggregate_id,
        'event_type', event_type, 'occurred_at', now(), 'schema_version', schema_version,
        'trace_id', trace_id, 'headers', headers, 'payload', payload)::text)
$$;
