-- shoal tracker schema, version 2.
-- Every heartbeat rewrites peers.last_seen; an index on it doubled the cost of each of those
-- writes for a query the tracker never runs (expiry is decided in memory). Admins' "who was
-- last seen when" scans the live table, which is small enough for that.
DROP INDEX IF EXISTS peers_by_last_seen;
