-- Rollups: what every read needs, kept in the same transaction as the events
-- they summarise (see mlops/store.py, insert_events). Grain: one UTC day.
-- Rows carry a small `shard` so concurrent writers for one business update
-- different rows instead of queueing on one row lock; readers sum the shards,
-- and the maintenance job folds the shards of past days into shard 0.

-- Counts and sums per business x UTC day x model.
CREATE TABLE mlops_rollup_daily (
    business_id           text        NOT NULL,
    day                   date        NOT NULL,
    model_name            text        NOT NULL,
    shard                 smallint    NOT NULL,
    messages              bigint      NOT NULL,
    tokens                numeric     NOT NULL,  -- sums of bigints can pass 2^63
    api_cost_usd          numeric     NOT NULL,
    response_time_ms_sum  double precision NOT NULL,
    success_rate_sum      double precision NOT NULL,
    appointment_requests  bigint      NOT NULL,
    appointments_booked   bigint      NOT NULL,
    human_handoffs        bigint      NOT NULL,
    PRIMARY KEY (business_id, day, model_name, shard)
);
-- /metrics gauges read every business over the last 30 days.
CREATE INDEX mlops_rollup_daily_day_idx ON mlops_rollup_daily (day);

-- Histogram of response_time_ms per business x UTC day: bucket 0 is [0, 1) ms,
-- bucket i >= 1 is [1.1^(i-1), 1.1^i) ms (layout in mlops/rollups.py).
CREATE TABLE mlops_rollup_latency (
    business_id text     NOT NULL,
    day         date     NOT NULL,
    bucket      smallint NOT NULL,
    shard       smallint NOT NULL,
    messages    bigint   NOT NULL,
    PRIMARY KEY (business_id, day, bucket, shard)
);

-- Each conversation's first and last UTC day of activity. Windows always end
-- today, so a conversation has a message in the window exactly when its
-- last_day falls in it: total_conversations is an exact count of index
-- entries, with no DISTINCT over per-day rows.
CREATE TABLE mlops_rollup_conversations (
    business_id     text NOT NULL,
    conversation_id text NOT NULL,
    first_day       date NOT NULL,
    last_day        date NOT NULL,
    PRIMARY KEY (business_id, conversation_id)
);
CREATE INDEX mlops_rollup_conversations_last_day_idx
    ON mlops_rollup_conversations (business_id, last_day);
-- Erasure of one conversation finds it without knowing the business.
CREATE INDEX mlops_rollup_conversations_conversation_idx
    ON mlops_rollup_conversations (conversation_id);
-- No new index on mlops_events: building one would lock the table against
-- inserts for as long as the build takes. Erasure finds a conversation's raw
-- rows through its business and days in mlops_rollup_conversations instead.

-- Backfill of events stored before this migration: rows with
-- id <= high_water are summarised by the maintenance job in bounded
-- batches (mlops/retention.py), moving done_through up to high_water; every
-- row inserted after this migration is summarised by insert_events itself.
CREATE TABLE mlops_rollup_backfill (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    high_water   bigint NOT NULL,
    done_through bigint NOT NULL
);
INSERT INTO mlops_rollup_backfill (high_water, done_through)
SELECT coalesce(max(id), 0), 0 FROM mlops_events;

-- The maintenance job folds the shards of past days into shard 0.
CREATE INDEX mlops_rollup_daily_unfolded_idx ON mlops_rollup_daily (day) WHERE shard <> 0;
CREATE INDEX mlops_rollup_latency_unfolded_idx ON mlops_rollup_latency (day) WHERE shard <> 0;
-- Rollup retention deletes by day.
CREATE INDEX mlops_rollup_latency_day_idx ON mlops_rollup_latency (day);
CREATE INDEX mlops_rollup_conversations_retention_idx ON mlops_rollup_conversations (last_day);
