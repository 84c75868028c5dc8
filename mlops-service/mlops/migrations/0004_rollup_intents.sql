-- Messages per business x UTC day x intent_detected, for /analytics's
-- by_intent; sharded and folded like mlops_rollup_daily (see 0002_rollups.sql).
-- insert_events keeps it from 0005_insert_function_intents.sql on.
CREATE TABLE mlops_rollup_intents (
    business_id     text     NOT NULL,
    day             date     NOT NULL,
    intent_detected text     NOT NULL,
    shard           smallint NOT NULL,
    messages        bigint   NOT NULL,
    PRIMARY KEY (business_id, day, intent_detected, shard)
);
-- The maintenance job folds the shards of past days into shard 0.
CREATE INDEX mlops_rollup_intents_unfolded_idx ON mlops_rollup_intents (day) WHERE shard <> 0;
-- Rollup retention deletes by day.
CREATE INDEX mlops_rollup_intents_day_idx ON mlops_rollup_intents (day);

-- Backfill of events stored before this migration, as for 0002's rollups
-- (mlops_rollup_backfill): rows with id <= high_water are summarised by the
-- maintenance job in bounded batches, moving done_through up to high_water.
CREATE TABLE mlops_rollup_intents_backfill (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    high_water   bigint NOT NULL,
    done_through bigint NOT NULL
);
INSERT INTO mlops_rollup_intents_backfill (high_water, done_through)
SELECT coalesce(max(id), 0), 0 FROM mlops_events;
