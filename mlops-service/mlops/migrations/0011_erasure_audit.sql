-- The audit trail of erasure: one row per erasure carried out, and per
-- erasure refused for want of a key with the erase scope. Kept in Postgres
-- rather than in the rotating log, so that it outlives any amount of later
-- traffic; read through GET /erasures (mlops/routes/erasure.py).
CREATE TABLE mlops_erasure_audit (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    outcome        text        NOT NULL CHECK (outcome IN ('erased', 'refused')),
    -- mlops.auth.key_id() of the caller's X-API-Key; 'none' when none was sent
    -- (or auth is off).
    key_id         text        NOT NULL,
    target         text        NOT NULL
                   CHECK (target IN ('business_id', 'conversation_id', 'session_id')),
    target_id      text        NOT NULL,
    -- What left: raw events, spooled events (this replica's spool), rollup
    -- rows deleted or rewritten. Zero for a refusal.
    events         bigint      NOT NULL DEFAULT 0,
    spooled_events bigint      NOT NULL DEFAULT 0,
    rollup_changes bigint      NOT NULL DEFAULT 0,
    -- The erasure's full answer ("removed"), or the refusal's HTTP status and reason.
    detail         jsonb       NOT NULL DEFAULT '{}'::jsonb
);

-- Append-only: rows can be added, never changed or removed. A trigger, not
-- REVOKE: the service connects as the table's owner, and an owner keeps the
-- right to GRANT itself back whatever was revoked. The trigger stops the
-- service's own SQL (and any mistaken UPDATE, DELETE or TRUNCATE by hand);
-- a superuser or the owner can still drop it, so the trail is as strong as
-- the control over those roles.
CREATE FUNCTION mlops_erasure_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'mlops_erasure_audit is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;
CREATE TRIGGER mlops_erasure_audit_no_change
    BEFORE UPDATE OR DELETE ON mlops_erasure_audit
    FOR EACH ROW EXECUTE FUNCTION mlops_erasure_audit_append_only();
CREATE TRIGGER mlops_erasure_audit_no_truncate
    BEFORE TRUNCATE ON mlops_erasure_audit
    FOR EACH STATEMENT EXECUTE FUNCTION mlops_erasure_audit_append_only();

-- Erasure by session: the tombstones (0008) accept session ids too, and the
-- events are found by session through an index.
ALTER TABLE mlops_erasures DROP CONSTRAINT mlops_erasures_erased_check;
ALTER TABLE mlops_erasures ADD CONSTRAINT mlops_erasures_erased_check
    CHECK (erased IN ('conversation_id', 'business_id', 'session_id'));
CREATE INDEX mlops_events_session_idx ON mlops_events (session_id);
