-- keywatch store schema version 2, SQLite: what the delivery worker needs beyond version 1.

-- The planner's outbox cursor: every alert with seq <= planned_seq has been turned into
-- notifications. Planners take this row (BEGIN IMMEDIATE here) while they plan.
CREATE TABLE delivery_cursor (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    planned_seq INTEGER NOT NULL
);
-- Alerts stored before this version existed were never meant to be delivered: start at the
-- current end of the outbox (0 in a new database).
INSERT INTO delivery_cursor (singleton, planned_seq) SELECT 1, alert_seq FROM store_meta;

-- A group (route, channel, recipient, cause) whose notification was already attempted starts a
-- new notification for alerts that arrive later: generation 0, 1, 2, ...
ALTER TABLE notifications ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
-- The rendered message, frozen at the first attempt so that every retry sends the same content.
ALTER TABLE notifications ADD COLUMN payload TEXT;
CREATE INDEX notifications_group ON notifications (cause, route, channel, recipient);
