-- Database side for outboxd with least privilege (deploy/compose.yaml runs it after
-- scripts/outbox.sql, as the owner of the outbox table). By hand: psql -d DB -f this file.
--
-- The relay's role needs LOGIN, REPLICATION and SELECT on the outbox table. The publication is
-- created here, by the table's owner: CREATE PUBLICATION ... FOR TABLE needs CREATE on the
-- database *and* ownership of the table, which the relay's role should not have. outboxd then
-- only creates its replication slot (REPLICATION suffices). The server needs wal_level=logical.
-- Change the password: it is the compose demo's.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outboxd') THEN
        CREATE ROLE outboxd LOGIN REPLICATION PASSWORD 'outboxd';
    END IF;
END
$$;
GRANT SELECT ON public.outbox TO outboxd;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'outboxd') THEN
        CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');
    END IF;
END
$$;
