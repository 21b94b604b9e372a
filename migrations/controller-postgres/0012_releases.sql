-- Signed agent releases (issue 7): one row per (version, platform) with the manifest's signed
-- facts and signature (meridian_shared::releases::ReleaseManifest), and the artifact in chunks
-- of 1 MiB (every chunk but the last is exactly 1 MiB, so a byte offset names its chunk).
-- A release and its chunks are written in one transaction, after the signature and the digest
-- were checked; they are never changed afterwards, only deleted together.
CREATE TABLE releases (
    id           TEXT PRIMARY KEY,          -- UUIDv7
    version      TEXT NOT NULL,             -- semver
    platform     TEXT NOT NULL,             -- ARCH-OS, e.g. x86_64-linux
    sha256       TEXT NOT NULL,             -- 64 lowercase hex
    size         BIGINT NOT NULL,
    key_id       TEXT NOT NULL,             -- the release key that signed it
    signature    TEXT NOT NULL,             -- base64 of the ed25519 signature
    notes        TEXT NOT NULL,
    uploaded_by  TEXT NOT NULL,             -- the API token's name
    uploaded_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (version, platform)
);

CREATE TABLE release_chunks (
    release_id  TEXT NOT NULL REFERENCES releases (id) ON DELETE CASCADE,
    idx         BIGINT NOT NULL,
    data        BYTEA NOT NULL,
    PRIMARY KEY (release_id, idx)
);
