-- keywatch store schema version 1, SQLite.
-- Timestamps are RFC 3339 text in UTC with exactly six fractional digits
-- ('2026-08-20T14:03:11.520000Z'), so text order is time order.
-- JSON documents are TEXT holding serde_json output.

-- One row: the entity sequence (bumped once per transaction that writes entities)
-- and the alert sequence (one number per inserted alert, the outbox cursor).
CREATE TABLE store_meta (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    entity_seq INTEGER NOT NULL,
    alert_seq  INTEGER NOT NULL
);
INSERT INTO store_meta (singleton, entity_seq, alert_seq) VALUES (1, 0, 0);

-- The engine's state: one JSON document per (kind, id). The key leads with `id` so that the
-- processed-event lookup (kind = 'event' AND id IN (...)) can only be answered by probing it.
CREATE TABLE entities (
    kind TEXT    NOT NULL,
    id   TEXT    NOT NULL,
    doc  TEXT    NOT NULL,
    seq  INTEGER NOT NULL,
    PRIMARY KEY (id, kind)
) WITHOUT ROWID;
CREATE INDEX entities_by_seq ON entities (seq);

-- The transactional outbox: every alert ever raised, in the order it was stored.
CREATE TABLE alerts (
    id         TEXT    PRIMARY KEY,
    seq        INTEGER NOT NULL UNIQUE,
    kind       TEXT    NOT NULL,
    severity   TEXT    NOT NULL,
    deployment TEXT    NOT NULL,
    key_crn    TEXT    NOT NULL,
    cause      TEXT    NOT NULL,
    event_time TEXT    NOT NULL,
    created_at TEXT    NOT NULL,
    doc        TEXT    NOT NULL
);
CREATE INDEX alerts_by_kind ON alerts (kind, seq);
CREATE INDEX alerts_by_severity ON alerts (severity, seq);
CREATE INDEX alerts_by_created_at ON alerts (created_at);
CREATE INDEX alerts_by_cause ON alerts (cause);

-- Kafka progress: the next offset to read per consumer group, topic and partition.
CREATE TABLE kafka_offsets (
    group_id     TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_id INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    updated_at   TEXT    NOT NULL,
    PRIMARY KEY (group_id, topic, partition_id)
) WITHOUT ROWID;

-- Notifications built from alerts, and their delivery state (filled by the delivery worker).
CREATE TABLE notifications (
    id              TEXT    PRIMARY KEY,
    route           TEXT    NOT NULL,
    channel         TEXT    NOT NULL,
    recipient       TEXT    NOT NULL,
    cause           TEXT    NOT NULL,
    alert_ids       TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    last_error      TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL
);
-- The claim query: pending notifications whose time has come, oldest first.
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_by_status ON notifications (status, updated_at);
CREATE INDEX notifications_by_cause ON notifications (cause);
