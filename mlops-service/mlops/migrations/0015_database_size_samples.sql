-- The database's size over time: one row per sample of
-- pg_database_size(current_database()), taken by the maintenance job at most
-- once a minute across every worker and replica (mlops/storage_budget.py).
-- Kept in Postgres, so the last seven days' growth survives restarts and is
-- the same whichever instance reads it; rows older than eight days are pruned
-- as new ones come (about 11,500 rows, under 1 MB, at most).
CREATE TABLE mlops_database_size_samples (
    sampled_at timestamptz PRIMARY KEY DEFAULT now(),
    size_bytes bigint      NOT NULL CHECK (size_bytes >= 0)
);
