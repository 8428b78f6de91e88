-- shoal tracker schema, version 1. Never edit a migration after it has shipped: add a new file.
-- Times are unix seconds (UTC): read them with datetime(col, 'unixepoch').

-- Every file the tracker has seen announced.
CREATE TABLE torrents (
    info_hash  TEXT PRIMARY KEY,          -- 64 lowercase hex digits
    name       TEXT NOT NULL,
    length     INTEGER NOT NULL,          -- bytes
    first_seen INTEGER NOT NULL
) WITHOUT ROWID;

-- The live swarm: one row per (file, peer) heard from within the TTL.
CREATE TABLE peers (
    info_hash  TEXT NOT NULL,
    peer_id    TEXT NOT NULL,
    addr       TEXT NOT NULL,             -- source address of the announce (IP)
    port       INTEGER NOT NULL,          -- the peer's listening port
    have       INTEGER NOT NULL,          -- pieces held
    total      INTEGER NOT NULL,          -- pieces in the file
    role       TEXT NOT NULL CHECK (role IN ('seeder', 'leecher')),
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    PRIMARY KEY (info_hash, peer_id)
) WITHOUT ROWID;
CREATE INDEX peers_by_last_seen ON peers (last_seen);
CREATE INDEX peers_by_peer_id ON peers (peer_id);

-- History: changes of state only (a heartbeat refreshes peers.last_seen and writes nothing here).
CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    info_hash TEXT NOT NULL,
    peer_id   TEXT NOT NULL,
    addr      TEXT NOT NULL,
    port      INTEGER NOT NULL,
    event     TEXT NOT NULL CHECK (event IN ('started', 'completed', 'stopped', 'expired')),
    have      INTEGER NOT NULL,
    total     INTEGER NOT NULL
);
CREATE INDEX events_by_file_time ON events (info_hash, at);
CREATE INDEX events_by_peer_time ON events (peer_id, at);
CREATE INDEX events_by_time ON events (at);
