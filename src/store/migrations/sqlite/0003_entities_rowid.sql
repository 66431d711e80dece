-- keywatch store schema version 3, SQLite: `entities` becomes a rowid table.
--
-- A WITHOUT ROWID table is a B-tree index: it keeps at most ~1,000 bytes of a row in its page and
-- moves the rest to overflow pages, which every update of the row frees and allocates again.
-- Key documents (~2.4 KB) and many deployment documents (~1 KB) are larger than that, so each of
-- their updates dirtied two or three pages more than the row itself. A rowid table keeps up to
-- ~4,000 bytes of a row in its leaf page; (id, kind) stays unique through the primary key's index.
CREATE TABLE entities_v3 (
    kind TEXT    NOT NULL,
    id   TEXT    NOT NULL,
    doc  TEXT    NOT NULL,
    seq  INTEGER NOT NULL,
    PRIMARY KEY (id, kind)
);
INSERT INTO entities_v3 (kind, id, doc, seq) SELECT kind, id, doc, seq FROM entities;
DROP TABLE entities;
ALTER TABLE entities_v3 RENAME TO entities;
CREATE INDEX entities_by_seq ON entities (seq);
