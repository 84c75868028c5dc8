-- One row per chat message the Next.js app reported (its MetricsData),
-- plus what the service adds: an idempotency key and the receive time.
-- The app's own table `ai_metrics` is never touched.
CREATE TABLE mlops_events (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id                text        NOT NULL,
    received_at             timestamptz NOT NULL,
    stored_at               timestamptz NOT NULL DEFAULT now(),
    business_id             text        NOT NULL,
    conversation_id         text,
    session_id              text        NOT NULL,
    response_time_ms        double precision NOT NULL CHECK (response_time_ms >= 0),
    success_rate            double precision NOT NULL CHECK (success_rate BETWEEN 0 AND 1),
    user_satisfaction       double precision,
    tokens_used             bigint      NOT NULL CHECK (tokens_used >= 0),
    prompt_tokens           bigint      CHECK (prompt_tokens >= 0),
    completion_tokens       bigint      CHECK (completion_tokens >= 0),
    api_cost_usd            numeric(24, 12) NOT NULL CHECK (api_cost_usd >= 0),
    model_name              text        NOT NULL,
    intent_detected         text        NOT NULL,
    appointment_requested   boolean     NOT NULL,
    human_handoff_requested boolean     NOT NULL,
    appointment_booked      boolean,
    user_message_length     integer     NOT NULL CHECK (user_message_length >= 0),
    ai_response_length      integer     NOT NULL CHECK (ai_response_length >= 0),
    response_type           text        NOT NULL,
    extra                   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT mlops_events_event_id_key UNIQUE (event_id)
);

-- /analytics/<business_id>?days=N scans one business over a time window.
CREATE INDEX mlops_events_business_received_idx ON mlops_events (business_id, received_at);
-- The per-business 30-day gauges on /metrics scan every business over a window.
CREATE INDEX mlops_events_received_idx ON mlops_events (received_at);
