-- keywatch store schema version 1, PostgreSQL.
-- Timestamps are timestamptz (microsecond precision).
-- JSON documents are `json`, not `jsonb`: the text is kept as written (and `\u0000`, which jsonb
-- rejects, is accepted); cast to jsonb in ad-hoc queries when needed.

-- One row: the entity sequence (bumped once per transaction that writes entities)
-- and the alert sequence (one number per inserted alert, the outbox cursor).
CREATE TABLE store_meta (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    entity_seq BIGINT  NOT NULL,
    alert_seq  BIGINT  NOT NULL
);
INSERT INTO store_meta (singleton, entity_seq, alert_seq) VALUES (1, 0, 0);

-- The engine's state: one JSON document per (kind, id). The key leads with `id` so that the
-- processed-event lookup (kind = 'event' AND id IN (...)) can only be answered by probing it.
CREATE TABLE entities (
    kind TEXT   NOT NULL,
    id   TEXT   NOT NULL,
    doc  JSON   NOT NULL,
    seq  BIGINT NOT NULL,
    PRIMARY KEY (id, kind)
);
CREATE INDEX entities_by_seq ON entities (seq);

-- The transactional outbox: every alert ever raised, in the order it was stored.
CREATE TABLE alerts (
    id         TEXT        PRIMARY KEY,
    seq        BIGINT      NOT NULL UNIQUE,
    kind       TEXT        NOT NULL,
    severity   TEXT        NOT NULL,
    deployment TEXT        NOT NULL,
    key_crn    TEXT        NOT NULL,
    cause      TEXT        NOT NULL,
    event_time TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    doc        JSON        NOT NULL
);
CREATE INDEX alerts_by_kind ON alerts (kind, seq);
CREATE INDEX alerts_by_severity ON alerts (severity, seq);
CREATE INDEX alerts_by_created_at ON alerts (created_at);
CREATE INDEX alerts_by_cause ON alerts (cause);

-- Kafka progress: the next offset to read per consumer group, topic and partition.
CREATE TABLE kafka_offsets (
    group_id     TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition_id INTEGER     NOT NULL,
    next_offset  BIGINT      NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (group_id, topic, partition_id)
);

-- Notifications built from alerts, and their delivery state (filled by the delivery worker,
-- which claims due rows with FOR UPDATE SKIP LOCKED).
CREATE TABLE notifications (
    id              TEXT        PRIMARY KEY,
    route           TEXT        NOT NULL,
    channel         TEXT        NOT NULL,
    recipient       TEXT        NOT NULL,
    cause           TEXT        NOT NULL,
    alert_ids       JSON        NOT NULL,
    status          TEXT        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
-- The claim query: pending notifications whose time has come, oldest first.
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_by_status ON notifications (status, updated_at);
CREATE INDEX notifications_by_cause ON notifications (cause);
