-- shoal tracker schema, version 3: keys and private swarms.

-- History rows name the announcer's key by its fingerprint (the first 16 hex digits of the
-- peer id when it is a key; '' for a legacy, unsigned id).
ALTER TABLE events ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';

-- Swarms proven private: private_info_hash(content, authority) = info_hash. Kept for good: a
-- private swarm never becomes public again. roster is the newest valid roster's JSON (NULL
-- until one is delivered; then only the authority is admitted).
CREATE TABLE private_swarms (
    info_hash TEXT PRIMARY KEY,           -- 64 lowercase hex digits
    authority TEXT NOT NULL,              -- the authority's Ed25519 key, 64 hex
    content   TEXT NOT NULL,              -- the content (public) info hash, 64 hex
    version   INTEGER NOT NULL,           -- the roster's version (0: none yet)
    roster    TEXT
) WITHOUT ROWID;
