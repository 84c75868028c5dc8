-- A counter of changes to the daily rollups of days before yesterday (UTC):
-- late inserts (spool replays, the backfill), erasure and rollup retention
-- bump it. While it and the date stay the same, a reader may keep the
-- per-business totals of those days it read before (mlops/store.py,
-- BusinessTotals) and re-read only yesterday and today.
CREATE TABLE mlops_rollup_epoch (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    changes bigint  NOT NULL
);
INSERT INTO mlops_rollup_epoch (changes) VALUES (0);
