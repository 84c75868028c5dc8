-- One row per erased conversation or business: events received before
-- `erased_at` are never stored again, whichever spool or in-flight request
-- still holds a copy (mlops/store.py, insert_sql). Kept for good: a spool
-- may replay events of any age after an outage. The id is kept, as the
-- audit log keeps it, so that erased data cannot come back.
CREATE TABLE mlops_erasures (
    erased     text        NOT NULL CHECK (erased IN ('conversation_id', 'business_id')),
    id         text        NOT NULL,
    erased_at  timestamptz NOT NULL,
    PRIMARY KEY (erased, id)
);
