//! Signed agent releases as stored (migration 0012): one `releases` row per
//! (version, platform) with the manifest's signed facts, and its artifact in `release_chunks`
//! of `RELEASE_CHUNK_BYTES`. Both backends implement `ReleaseStore` with the SQL of
//! `impl_release_store!`, which `impl_store!` expands.
//!
//! Invariants every backend keeps:
//! - a release is stored only whole: its row and every chunk in one transaction, and at most
//!   one per (version, platform) (`Error::Conflict` for a second);
//! - every chunk but the last holds exactly `RELEASE_CHUNK_BYTES`, the chunks hold exactly
//!   `size` bytes, so byte offset `o` is in chunk `o / RELEASE_CHUNK_BYTES`;
//! - a stored release never changes; deleting it removes its chunks in the same transaction.
//!
//! The store does not check signatures or digests: the admin API does before it calls
//! `create_release`, and agents check again before they install anything.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meridian_shared::releases::ReleaseManifest;
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Bytes per stored chunk (and the most one `ReleaseChunk` frame carries).
pub const RELEASE_CHUNK_BYTES: usize = 1024 * 1024;

/// A stored release: its manifest, who uploaded it and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReleaseRecord {
    pub id: Uuid,
    pub version: String,
    pub platform: String,
    pub sha256: String,
    pub size: u64,
    pub key_id: String,
    pub signature: String,
    pub notes: String,
    /// The name of the API token that uploaded it.
    pub uploaded_by: String,
    pub uploaded_at: DateTime<Utc>,
}

impl ReleaseRecord {
    /// The manifest agents verify (what `AGENT_UPGRADE` carries).
    pub fn manifest(&self) -> ReleaseManifest {
        ReleaseManifest {
            version: self.version.clone(),
            platform: self.platform.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            key_id: self.key_id.clone(),
            signature: self.signature.clone(),
            notes: self.notes.clone(),
        }
    }

    /// How many chunks hold its artifact.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(RELEASE_CHUNK_BYTES as u64)
    }
}

/// A verified release to store.
#[derive(Debug, Clone)]
pub struct NewRelease {
    pub manifest: ReleaseManifest,
    pub uploaded_by: String,
    pub uploaded_at: DateTime<Utc>,
}

#[async_trait]
pub trait ReleaseStore: Send + Sync {
    /// Stores `release` with its artifact, `chunks` (each `RELEASE_CHUNK_BYTES` but the last,
    /// `manifest.size` bytes in all; anything else is refused with `Error::Internal`, a
    /// caller's bug), in one transaction. `Error::Conflict` when the (version, platform)
    /// exists; nothing is stored then.
    async fn create_release(
        &self,
        release: &NewRelease,
        chunks: &[Vec<u8>],
    ) -> Result<ReleaseRecord>;
    /// Every release, newest version first (semantic version order), then by platform.
    async fn list_releases(&self) -> Result<Vec<ReleaseRecord>>;
    /// The releases of `version`, one per platform, by platform.
    async fn releases_of_version(&self, version: &str) -> Result<Vec<ReleaseRecord>>;
    /// The release of `version` for `platform`.
    async fn release(&self, version: &str, platform: &str) -> Result<Option<ReleaseRecord>>;
    /// Up to `limit` chunks of release `id` from chunk index `from` on, in order, with their
    /// indexes. Empty past the end (or when the release is gone).
    async fn release_chunks(&self, id: Uuid, from: u64, limit: u32) -> Result<Vec<(u64, Vec<u8>)>>;
    /// Deletes the release of `version` for `platform` with its chunks; false if there was none.
    async fn delete_release(&self, version: &str, platform: &str) -> Result<bool>;
}

/// Checks that `chunks` are laid out as the store keeps them, for `size` bytes.
pub(crate) fn check_layout(chunks: &[Vec<u8>], size: u64) -> Result<()> {
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let last = chunks.len().saturating_sub(1);
    let laid_out = chunks.iter().enumerate().all(|(i, c)| {
        if i < last {
            c.len() == RELEASE_CHUNK_BYTES
        } else {
            !c.is_empty() && c.len() <= RELEASE_CHUNK_BYTES
        }
    });
    if total != size || !laid_out || chunks.is_empty() {
        return Err(Error::Internal(format!(
            "release chunks are not laid out for {size} bytes ({} chunks, {total} bytes)",
            chunks.len()
        )));
    }
    Ok(())
}

/// The columns `ReleaseRow` reads, in order.
macro_rules! release_select {
    () => {
        "SELECT id, version, platform, sha256, size, key_id, signature, notes, uploaded_by, \
         uploaded_at FROM releases"
    };
}
pub(crate) use release_select;

pub(crate) type ReleaseRow =
    (String, String, String, String, i64, String, String, String, String, DateTime<Utc>);

pub(crate) fn record(row: ReleaseRow) -> Result<ReleaseRecord> {
    let (id, version, platform, sha256, size, key_id, signature, notes, uploaded_by, uploaded_at) =
        row;
    Ok(ReleaseRecord {
        id: id.parse().map_err(|_| Error::Internal(format!("corrupt release id {id:?}")))?,
        version,
        platform,
        sha256,
        size: u64::try_from(size)
            .map_err(|_| Error::Internal(format!("corrupt release size {size}")))?,
        key_id,
        signature,
        notes,
        uploaded_by,
        uploaded_at,
    })
}

/// Newest version first (versions that are not semantic sort last), then by platform.
pub(crate) fn sort_newest_first(releases: &mut [ReleaseRecord]) {
    releases.sort_by(|a, b| {
        let (va, vb) =
            (semver::Version::parse(&a.version).ok(), semver::Version::parse(&b.version).ok());
        vb.cmp(&va)
            .then_with(|| a.version.cmp(&b.version))
            .then_with(|| a.platform.cmp(&b.platform))
    });
}

/// Expands to `#[async_trait] impl ReleaseStore for $ty`.
macro_rules! impl_release_store {
    ($ty:ty, lock = $lock:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::releases::ReleaseStore for $ty {
            async fn create_release(
                &self,
                release: &$crate::store::releases::NewRelease,
                chunks: &[Vec<u8>],
            ) -> $crate::error::Result<$crate::store::releases::ReleaseRecord> {
                let m = &release.manifest;
                $crate::store::releases::check_layout(chunks, m.size)?;
                let size = i64::try_from(m.size)
                    .map_err(|_| $crate::error::Error::Internal("release too large".into()))?;
                let conflict = || {
                    $crate::error::Error::Conflict(format!(
                        "release {} for {} already exists; delete it first or upload another version",
                        m.version, m.platform
                    ))
                };
                let mut tx = self.tx().await?;
                let existing: Option<(String,)> =
                    sqlx::query_as("SELECT id FROM releases WHERE version = $1 AND platform = $2")
                        .bind(&m.version)
                        .bind(&m.platform)
                        .fetch_optional(&mut *tx)
                        .await?;
                if existing.is_some() {
                    return Err(conflict());
                }
                let id = uuid::Uuid::now_v7();
                let inserted = sqlx::query(
                    "INSERT INTO releases (id, version, platform, sha256, size, key_id, signature, \
                     notes, uploaded_by, uploaded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(id.to_string())
                .bind(&m.version)
                .bind(&m.platform)
                .bind(&m.sha256)
                .bind(size)
                .bind(&m.key_id)
                .bind(&m.signature)
                .bind(&m.notes)
                .bind(&release.uploaded_by)
                .bind(release.uploaded_at)
                .execute(&mut *tx)
                .await;
                match inserted {
                    Ok(_) => {}
                    // A concurrent upload of the same release committed first.
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(conflict()),
                    Err(e) => return Err(e.into()),
                }
                for (idx, data) in chunks.iter().enumerate() {
                    sqlx::query("INSERT INTO release_chunks (release_id, idx, data) VALUES ($1, $2, $3)")
                        .bind(id.to_string())
                        .bind(idx as i64)
                        .bind(data.as_slice())
                        .execute(&mut *tx)
                        .await?;
                }
                let row: $crate::store::releases::ReleaseRow = sqlx::query_as(concat!(
                    $crate::store::releases::release_select!(),
                    " WHERE id = $1"
                ))
                .bind(id.to_string())
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                $crate::store::releases::record(row)
            }

            async fn list_releases(
                &self,
            ) -> $crate::error::Result<Vec<$crate::store::releases::ReleaseRecord>> {
                let rows: Vec<$crate::store::releases::ReleaseRow> =
                    sqlx::query_as($crate::store::releases::release_select!())
                        .fetch_all(&self.pool)
                        .await?;
                let mut releases = rows
                    .into_iter()
                    .map($crate::store::releases::record)
                    .collect::<$crate::error::Result<Vec<_>>>()?;
                $crate::store::releases::sort_newest_first(&mut releases);
                Ok(releases)
            }

            async fn releases_of_version(
                &self,
                version: &str,
            ) -> $crate::error::Result<Vec<$crate::store::releases::ReleaseRecord>> {
                let rows: Vec<$crate::store::releases::ReleaseRow> = sqlx::query_as(concat!(
                    $crate::store::releases::release_select!(),
                    " WHERE version = $1 ORDER BY platform"
                ))
                .bind(version)
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map($crate::store::releases::record).collect()
            }

            async fn release(
                &self,
                version: &str,
                platform: &str,
            ) -> $crate::error::Result<Option<$crate::store::releases::ReleaseRecord>> {
                let row: Option<$crate::store::releases::ReleaseRow> = sqlx::query_as(concat!(
                    $crate::store::releases::release_select!(),
                    " WHERE version = $1 AND platform = $2"
                ))
                .bind(version)
                .bind(platform)
                .fetch_optional(&self.pool)
                .await?;
                row.map($crate::store::releases::record).transpose()
            }

            async fn release_chunks(
                &self,
                id: uuid::Uuid,
                from: u64,
                limit: u32,
            ) -> $crate::error::Result<Vec<(u64, Vec<u8>)>> {
                let from = i64::try_from(from).unwrap_or(i64::MAX);
                let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                    "SELECT idx, data FROM release_chunks WHERE release_id = $1 AND idx >= $2 \
                     ORDER BY idx LIMIT $3",
                )
                .bind(id.to_string())
                .bind(from)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(|(idx, data)| (idx.max(0) as u64, data)).collect())
            }

            async fn delete_release(
                &self,
                version: &str,
                platform: &str,
            ) -> $crate::error::Result<bool> {
                let mut tx = self.tx().await?;
                // Locked: a rollout being created for it waits, then finds it gone.
                let id: Option<(String,)> = sqlx::query_as(concat!(
                    "SELECT id FROM releases WHERE version = $1 AND platform = $2",
                    $lock
                ))
                .bind(version)
                .bind(platform)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((id,)) = id else {
                    return Ok(false);
                };
                let in_use: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM rollouts WHERE version = $1 AND platform = $2 \
                     AND state IN ('running', 'paused') ORDER BY created_at",
                )
                .bind(version)
                .bind(platform)
                .fetch_all(&mut *tx)
                .await?;
                if !in_use.is_empty() {
                    let ids: Vec<String> = in_use.into_iter().map(|(id,)| id).collect();
                    return Err($crate::error::Error::Conflict(format!(
                        "release {version} for {platform} is used by unfinished rollout(s) {}: \
                         finish or abort them first",
                        ids.join(", ")
                    )));
                }
                sqlx::query("DELETE FROM release_chunks WHERE release_id = $1")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM releases WHERE id = $1").bind(&id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(true)
            }
        }
    };
}
pub(crate) use impl_release_store;
