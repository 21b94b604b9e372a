//! Signed agent releases: the manifest that names an artifact, how it is signed and
//! verified, the key formats, version order and the platform names. Pure: no I/O beyond reading
//! an artifact from a reader the caller supplies.
//!
//! A release is one artifact (an agent binary) for one `(version, platform)`. Its manifest
//! carries the artifact's SHA-256 and size and an ed25519 signature over the canonical message
//!
//! ```text
//! meridian-release-v1\n{version}\n{platform}\n{sha256}\n{size}\n
//! ```
//!
//! made with a release key held outside the controller (`meridianctl release sign`). The
//! controller (at upload) and every agent (before it installs anything) check the signature
//! against the public keys they trust (`verify_manifest`) and the artifact against the manifest
//! (`verify_artifact`, `ArtifactDigest`). Notes are not signed: they are shown, never acted on.
//!
//! Key texts: public `ed25519:<base64 of 32 bytes>`, private `ed25519-private:<base64 of 32
//! bytes>` (the seed). A key's id is the first 16 hex characters of the SHA-256 of the 32
//! public key bytes; a manifest names the key that signed it by this id.

use std::cmp::Ordering;
use std::fmt;
use std::io::Read;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use semver::Version;

/// The first line of every signed message: the format's name and version.
pub const SIGNING_DOMAIN: &str = "meridian-release-v1";
/// Prefix of a public key text.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";
/// Prefix of a private key text (the file `meridianctl release keygen` writes).
pub const PRIVATE_KEY_PREFIX: &str = "ed25519-private:";
/// Longest version string accepted (the length the session's Hello allows).
pub const MAX_VERSION_LEN: usize = 64;
/// Longest release notes accepted, in characters.
pub const MAX_NOTES_CHARS: usize = 10_000;
/// Architectures a platform may name (values of `std::env::consts::ARCH` an agent can run on).
pub const ARCHES: [&str; 12] = [
    "x86",
    "x86_64",
    "arm",
    "aarch64",
    "loongarch64",
    "mips",
    "mips64",
    "powerpc",
    "powerpc64",
    "riscv64",
    "s390x",
    "sparc64",
];
/// Operating systems a platform may name (values of `std::env::consts::OS`).
pub const OSES: [&str; 10] = [
    "linux",
    "macos",
    "windows",
    "freebsd",
    "netbsd",
    "openbsd",
    "dragonfly",
    "illumos",
    "solaris",
    "android",
];

/// What names, and vouches for, one release artifact. Unknown fields are ignored when
/// decoding, so an older reader accepts a newer manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    /// Semantic version, e.g. `1.4.0`.
    pub version: String,
    /// `{ARCH}-{OS}`, e.g. `x86_64-linux` (see `current_platform`).
    pub platform: String,
    /// SHA-256 of the artifact, 64 lowercase hex characters.
    pub sha256: String,
    /// The artifact's size in bytes.
    pub size: u64,
    /// Id of the key that signed (`PublicKey::key_id`); empty when unsigned.
    #[serde(default)]
    pub key_id: String,
    /// Base64 of the 64-byte ed25519 signature of `signed_message`; empty when unsigned.
    #[serde(default)]
    pub signature: String,
    /// Release notes (not signed).
    #[serde(default)]
    pub notes: String,
}

/// Why a manifest, an artifact or a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// A field of the manifest is not what the format requires.
    #[error("{0} is malformed: {1}")]
    Malformed(&'static str, String),
    /// The manifest carries no signature.
    #[error("the release is not signed (the manifest has no signature)")]
    Unsigned,
    /// The manifest was signed by a key that is not trusted here.
    #[error("the release is signed by key {key_id}, which is not a trusted release key")]
    UnknownKey { key_id: String },
    /// The signature does not match the manifest under the key it names: the manifest was
    /// altered after signing, or signed by another key.
    #[error(
        "the signature does not match the manifest: it was altered after signing or signed by \
         another key"
    )]
    BadSignature,
    /// The artifact's SHA-256 is not the manifest's.
    #[error("the artifact's SHA-256 is {actual}, the manifest says {expected}")]
    DigestMismatch { expected: String, actual: String },
    /// The artifact's size is not the manifest's.
    #[error("the artifact is {actual} bytes, the manifest says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    /// A key text could not be used.
    #[error("invalid release key: {0}")]
    BadKey(String),
    /// The artifact could not be read.
    #[error("reading the artifact failed: {0}")]
    Read(String),
}

/// The platform this build runs on: `{ARCH}-{OS}` from `std::env::consts`, e.g. `x86_64-linux`.
pub fn current_platform() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Checks a platform string: `{ARCH}-{OS}` with a known architecture and operating system.
pub fn parse_platform(platform: &str) -> Result<(&str, &str), ReleaseError> {
    let bad = |why: String| ReleaseError::Malformed("platform", why);
    let Some((arch, os)) = platform.split_once('-') else {
        return Err(bad(format!(
            "{:?} is not of the form ARCH-OS (e.g. x86_64-linux)",
            shorten(platform)
        )));
    };
    if !ARCHES.contains(&arch) {
        return Err(bad(format!(
            "unknown architecture {:?} (known: {})",
            shorten(arch),
            ARCHES.join(", ")
        )));
    }
    if !OSES.contains(&os) {
        return Err(bad(format!(
            "unknown operating system {:?} (known: {})",
            shorten(os),
            OSES.join(", ")
        )));
    }
    Ok((arch, os))
}

/// A release version: a semantic version (`1.4.0`, `2.0.0-rc.1`), at most 64 characters.
pub fn parse_version(version: &str) -> Result<Version, ReleaseError> {
    if version.len() > MAX_VERSION_LEN {
        return Err(ReleaseError::Malformed(
            "version",
            format!("longer than {MAX_VERSION_LEN} characters"),
        ));
    }
    Version::parse(version).map_err(|e| {
        ReleaseError::Malformed(
            "version",
            format!("{:?} is not a semantic version (like 1.4.0): {e}", shorten(version)),
        )
    })
}

/// Semantic version order of two version strings (build metadata ignored, as semver says).
pub fn compare_versions(a: &str, b: &str) -> Result<Ordering, ReleaseError> {
    Ok(parse_version(a)?.cmp_precedence(&parse_version(b)?))
}

/// The exact bytes a release signature covers.
pub fn signed_message(version: &str, platform: &str, sha256: &str, size: u64) -> Vec<u8> {
    format!("{SIGNING_DOMAIN}\n{version}\n{platform}\n{sha256}\n{size}\n").into_bytes()
}

impl ReleaseManifest {
    /// The bytes its signature covers.
    pub fn signed_message(&self) -> Vec<u8> {
        signed_message(&self.version, &self.platform, &self.sha256, self.size)
    }

    /// Checks the form of every field (not the signature): semver version, known platform,
    /// 64 lowercase hex digest, non-empty size, key id and signature well formed when present,
    /// notes within bounds. The first problem found is returned.
    pub fn validate(&self) -> Result<(), ReleaseError> {
        self.unsigned_part().validate()?;
        if !self.key_id.is_empty() && !is_lower_hex(&self.key_id, 16) {
            return Err(ReleaseError::Malformed(
                "key_id",
                "must be 16 lowercase hex characters".into(),
            ));
        }
        if !self.signature.is_empty() {
            decode_signature(&self.signature)?;
        }
        Ok(())
    }

    fn unsigned_part(&self) -> UnsignedRelease {
        UnsignedRelease {
            version: self.version.clone(),
            platform: self.platform.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            notes: self.notes.clone(),
        }
    }
}

/// Checks `manifest`'s form and its signature against the `trusted` keys: `Malformed` for a bad
/// field, `Unsigned` without a signature, `UnknownKey` when no trusted key has its `key_id`,
/// `BadSignature` when the signature does not verify (strict ed25519 verification).
pub fn verify_manifest(
    manifest: &ReleaseManifest,
    trusted: &[PublicKey],
) -> Result<(), ReleaseError> {
    manifest.validate()?;
    if manifest.signature.is_empty() || manifest.key_id.is_empty() {
        return Err(ReleaseError::Unsigned);
    }
    let key = trusted
        .iter()
        .find(|k| k.key_id() == manifest.key_id)
        .ok_or_else(|| ReleaseError::UnknownKey { key_id: manifest.key_id.clone() })?;
    let signature = decode_signature(&manifest.signature)?;
    key.0
        .verify_strict(&manifest.signed_message(), &signature)
        .map_err(|_| ReleaseError::BadSignature)
}

/// Reads the whole artifact from `reader` and checks its size and SHA-256 against `manifest`.
pub fn verify_artifact(manifest: &ReleaseManifest, reader: impl Read) -> Result<(), ReleaseError> {
    ArtifactDigest::of_reader(reader)?.check(manifest)
}

/// SHA-256 and length of an artifact, fed piece by piece (for artifacts that arrive in chunks).
#[derive(Clone, Default)]
pub struct ArtifactDigest {
    hasher: Sha256,
    len: u64,
}

impl fmt::Debug for ArtifactDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactDigest").field("len", &self.len).finish_non_exhaustive()
    }
}

impl ArtifactDigest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes everything `reader` yields, 64 KiB at a time.
    pub fn of_reader(mut reader: impl Read) -> Result<Self, ReleaseError> {
        let mut digest = Self::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(digest),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReleaseError::Read(e.to_string())),
            };
            digest.update(&buf[..n]);
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lowercase hex SHA-256 and the length.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.len)
    }

    /// `SizeMismatch` or `DigestMismatch` unless the bytes fed are the manifest's artifact.
    pub fn check(self, manifest: &ReleaseManifest) -> Result<(), ReleaseError> {
        let (sha256, size) = self.finish();
        if size != manifest.size {
            return Err(ReleaseError::SizeMismatch { expected: manifest.size, actual: size });
        }
        if !sha256.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(ReleaseError::DigestMismatch {
                expected: manifest.sha256.clone(),
                actual: sha256,
            });
        }
        Ok(())
    }
}

/// The signed facts of a release before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsignedRelease {
    pub version: String,
    pub platform: String,
    pub sha256: String,
    pub size: u64,
    pub notes: String,
}

impl UnsignedRelease {
    /// The release of the artifact `reader` yields (its digest and size are computed).
    pub fn of_artifact(
        version: &str,
        platform: &str,
        notes: &str,
        reader: impl Read,
    ) -> Result<Self, ReleaseError> {
        let (sha256, size) = ArtifactDigest::of_reader(reader)?.finish();
        Ok(Self {
            version: version.to_owned(),
            platform: platform.to_owned(),
            sha256,
            size,
            notes: notes.to_owned(),
        })
    }

    /// Checks every field's form (see `ReleaseManifest::validate`).
    pub fn validate(&self) -> Result<(), ReleaseError> {
        parse_version(&self.version)?;
        parse_platform(&self.platform)?;
        if !is_lower_hex(&self.sha256, 64) {
            return Err(ReleaseError::Malformed(
                "sha256",
                "must be 64 lowercase hex characters (the artifact's SHA-256)".into(),
            ));
        }
        if self.size == 0 {
            return Err(ReleaseError::Malformed("size", "the artifact is empty".into()));
        }
        if self.notes.chars().count() > MAX_NOTES_CHARS {
            return Err(ReleaseError::Malformed(
                "notes",
                format!("longer than {MAX_NOTES_CHARS} characters"),
            ));
        }
        Ok(())
    }
}

/// Signs `release` with `key` (for `meridianctl release sign`); refuses a malformed release.
pub fn sign(key: &PrivateKey, release: UnsignedRelease) -> Result<ReleaseManifest, ReleaseError> {
    release.validate()?;
    let message =
        signed_message(&release.version, &release.platform, &release.sha256, release.size);
    let signature = key.0.sign(&message);
    Ok(ReleaseManifest {
        version: release.version,
        platform: release.platform,
        sha256: release.sha256,
        size: release.size,
        key_id: key.public_key().key_id(),
        signature: BASE64.encode(signature.to_bytes()),
        notes: release.notes,
    })
}

/// A trusted release key (`ed25519:<base64>`).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses `ed25519:<base64 of 32 bytes>` (surrounding whitespace ignored). A weak
    /// (small-order) key is refused.
    pub fn parse(text: &str) -> Result<Self, ReleaseError> {
        let text = text.trim();
        if text.starts_with(PRIVATE_KEY_PREFIX) {
            return Err(ReleaseError::BadKey(
                "this is a private key; trust the public key (`ed25519:…`) that keygen printed"
                    .into(),
            ));
        }
        let encoded = text.strip_prefix(PUBLIC_KEY_PREFIX).ok_or_else(|| {
            ReleaseError::BadKey(format!("a public key starts with {PUBLIC_KEY_PREFIX:?}"))
        })?;
        let bytes = decode_key_bytes(encoded)?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| ReleaseError::BadKey("not a valid ed25519 public key".into()))?;
        if key.is_weak() {
            return Err(ReleaseError::BadKey("a weak (small-order) ed25519 key".into()));
        }
        Ok(Self(key))
    }

    /// First 16 hex characters of the SHA-256 of the 32 key bytes.
    pub fn key_id(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        hex::encode(&digest[..8])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", BASE64.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = ReleaseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A release signing key (`ed25519-private:<base64 of the 32-byte seed>`). Its `Debug` shows
/// only the key id; the secret is zeroed when dropped.
pub struct PrivateKey(SigningKey);

impl PrivateKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    /// Parses `ed25519-private:<base64 of 32 bytes>` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, ReleaseError> {
        let encoded = text.trim().strip_prefix(PRIVATE_KEY_PREFIX).ok_or_else(|| {
            ReleaseError::BadKey(format!("a private key starts with {PRIVATE_KEY_PREFIX:?}"))
        })?;
        Ok(Self(SigningKey::from_bytes(&decode_key_bytes(encoded)?)))
    }

    /// The text to store (mode 0600): `ed25519-private:<base64>`.
    pub fn to_text(&self) -> String {
        format!("{PRIVATE_KEY_PREFIX}{}", BASE64.encode(self.0.as_bytes()))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, secret redacted)", self.public_key().key_id())
    }
}

fn decode_key_bytes(encoded: &str) -> Result<[u8; 32], ReleaseError> {
    let bytes = BASE64
        .decode(encoded)
        .map_err(|_| ReleaseError::BadKey("the key is not valid base64".into()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        ReleaseError::BadKey(format!("the key has {} bytes, an ed25519 key has 32", bytes.len()))
    })
}

fn decode_signature(encoded: &str) -> Result<Signature, ReleaseError> {
    let bad = |why: &str| ReleaseError::Malformed("signature", why.to_owned());
    let bytes = BASE64.decode(encoded).map_err(|_| bad("not valid base64"))?;
    let bytes = <[u8; 64]>::try_from(bytes.as_slice())
        .map_err(|_| bad("an ed25519 signature has 64 bytes"))?;
    Ok(Signature::from_bytes(&bytes))
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// At most 40 characters of untrusted text, for error messages.
fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTIFACT: &[u8] = b"#!/bin/sh\necho meridian agent 1.4.0\n";

    fn key(seed: u8) -> PrivateKey {
        PrivateKey(SigningKey::from_bytes(&[seed; 32]))
    }

    fn signed(key: &PrivateKey) -> ReleaseManifest {
        let release =
            UnsignedRelease::of_artifact("1.4.0", "x86_64-linux", "Faster kiosk", ARTIFACT)
                .expect("digest");
        sign(key, release).expect("sign")
    }

    #[test]
    fn a_signed_release_verifies_with_its_artifact() {
        let k = key(1);
        let m = signed(&k);
        assert_eq!(m.size, ARTIFACT.len() as u64);
        assert_eq!(m.sha256, hex::encode(Sha256::digest(ARTIFACT)));
        assert_eq!(m.key_id, k.public_key().key_id());
        verify_manifest(&m, &[key(9).public_key(), k.public_key()]).expect("verifies");
        verify_artifact(&m, ARTIFACT).expect("artifact matches");
        // Through JSON, as it travels.
        let back: ReleaseManifest =
            serde_json::from_str(&serde_json::to_string(&m).expect("json")).expect("decode");
        assert_eq!(back, m);
        verify_manifest(&back, &[k.public_key()]).expect("verifies after a round trip");
    }

    #[test]
    fn the_signed_message_is_canonical() {
        assert_eq!(
            signed_message("1.4.0", "x86_64-linux", "ab", 12),
            b"meridian-release-v1\n1.4.0\nx86_64-linux\nab\n12\n".to_vec()
        );
    }

    #[test]
    fn notes_are_not_signed_but_everything_else_is() {
        let k = key(1);
        let trusted = [k.public_key()];
        let mut m = signed(&k);
        m.notes = "other notes".into();
        verify_manifest(&m, &trusted).expect("notes are not signed");
        let tampered: [fn(&mut ReleaseManifest); 4] = [
            |m| m.version = "1.4.1".into(),
            |m| m.platform = "aarch64-linux".into(),
            |m| m.sha256 = "0".repeat(64),
            |m| m.size += 1,
        ];
        for tamper in tampered {
            let mut t = signed(&k);
            tamper(&mut t);
            assert_eq!(verify_manifest(&t, &trusted), Err(ReleaseError::BadSignature), "{t:?}");
        }
    }

    #[test]
    fn a_tampered_artifact_is_refused() {
        let m = signed(&key(1));
        let mut bytes = ARTIFACT.to_vec();
        bytes[3] ^= 1;
        assert!(matches!(
            verify_artifact(&m, bytes.as_slice()),
            Err(ReleaseError::DigestMismatch { .. })
        ));
        bytes.push(b'\n');
        assert_eq!(
            verify_artifact(&m, bytes.as_slice()),
            Err(ReleaseError::SizeMismatch { expected: m.size, actual: m.size + 1 })
        );
        assert!(matches!(
            verify_artifact(&m, &ARTIFACT[..10]),
            Err(ReleaseError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn a_wrong_or_unknown_key_is_refused() {
        let (right, wrong) = (key(1), key(2));
        // Signed by another key than the trusted one it claims.
        let mut m = signed(&wrong);
        m.key_id = right.public_key().key_id();
        assert_eq!(verify_manifest(&m, &[right.public_key()]), Err(ReleaseError::BadSignature));
        // Signed by a key nobody trusts.
        let m = signed(&wrong);
        assert_eq!(
            verify_manifest(&m, &[right.public_key()]),
            Err(ReleaseError::UnknownKey { key_id: wrong.public_key().key_id() })
        );
        assert_eq!(
            verify_manifest(&m, &[]),
            Err(ReleaseError::UnknownKey { key_id: wrong.public_key().key_id() })
        );
    }

    #[test]
    fn an_unsigned_manifest_is_refused() {
        let k = key(1);
        let mut m = signed(&k);
        m.signature.clear();
        assert_eq!(verify_manifest(&m, &[k.public_key()]), Err(ReleaseError::Unsigned));
        let json = format!(
            r#"{{"version":"1.4.0","platform":"x86_64-linux","sha256":"{}","size":3}}"#,
            "a".repeat(64)
        );
        let m: ReleaseManifest = serde_json::from_str(&json).expect("decodes");
        assert_eq!(verify_manifest(&m, &[k.public_key()]), Err(ReleaseError::Unsigned));
    }

    #[test]
    fn newer_fields_are_ignored() {
        let m = signed(&key(1));
        let mut v = serde_json::to_value(&m).expect("json");
        v["min_agent_version"] = "1.0.0".into();
        let back: ReleaseManifest = serde_json::from_value(v).expect("decodes");
        assert_eq!(back, m);
    }

    /// `tamper` makes the manifest malformed in `field`.
    fn check_malformed(field: &str, tamper: impl Fn(&mut ReleaseManifest)) {
        let k = key(1);
        let mut m = signed(&k);
        tamper(&mut m);
        match verify_manifest(&m, &[k.public_key()]) {
            Err(ReleaseError::Malformed(f, why)) => {
                assert_eq!(f, field, "{why}");
                assert!(!why.is_empty());
            }
            other => panic!("{field}: expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        check_malformed("version", |m| m.version = "1.4".into());
        check_malformed("version", |m| m.version = "v1.4.0".into());
        check_malformed("version", |m| m.version = String::new());
        check_malformed("version", |m| m.version = format!("1.0.0-{}", "a".repeat(70)));
        check_malformed("platform", |m| m.platform = "x86_64".into());
        check_malformed("platform", |m| m.platform = "x86_64-plan9".into());
        check_malformed("platform", |m| m.platform = "z80-linux".into());
        check_malformed("platform", |m| m.platform = "x86_64-linux-gnu".into());
        check_malformed("platform", |m| m.platform = String::new());
        check_malformed("sha256", |m| m.sha256 = "abc".into());
        check_malformed("sha256", |m| m.sha256 = m.sha256.to_uppercase());
        check_malformed("sha256", |m| m.sha256 = "g".repeat(64));
        check_malformed("size", |m| m.size = 0);
        check_malformed("key_id", |m| m.key_id = "xyz".into());
        check_malformed("signature", |m| m.signature = "not base64!".into());
        check_malformed("signature", |m| m.signature = BASE64.encode([0u8; 10]));
        check_malformed("notes", |m| m.notes = "x".repeat(MAX_NOTES_CHARS + 1));
    }

    #[test]
    fn sign_refuses_a_malformed_release() {
        let bad = UnsignedRelease {
            version: "latest".into(),
            platform: "x86_64-linux".into(),
            sha256: "a".repeat(64),
            size: 1,
            notes: String::new(),
        };
        assert!(matches!(sign(&key(1), bad), Err(ReleaseError::Malformed("version", _))));
    }

    #[test]
    fn keys_round_trip_through_their_texts() {
        let k = PrivateKey::generate();
        let text = k.to_text();
        assert!(text.starts_with(PRIVATE_KEY_PREFIX));
        let again = PrivateKey::parse(&format!("{text}\n")).expect("private key");
        assert_eq!(again.public_key(), k.public_key());
        let public = k.public_key().to_string();
        assert!(public.starts_with(PUBLIC_KEY_PREFIX));
        assert_eq!(PublicKey::parse(&public).expect("public key"), k.public_key());
        assert_eq!(k.public_key().key_id().len(), 16);
        assert!(!format!("{k:?}").contains(&text[PRIVATE_KEY_PREFIX.len()..]));
        assert_ne!(PrivateKey::generate().public_key(), k.public_key());
    }

    #[test]
    fn bad_key_texts_are_refused() {
        let private = key(1).to_text();
        for text in [
            "",
            "ed25519:",
            "ed25519:!!!",
            "ed25519:AAAA",
            "rsa:AAAA",
            private.as_str(),
            // The identity point: a weak key.
            "ed25519:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            assert!(matches!(PublicKey::parse(text), Err(ReleaseError::BadKey(_))), "{text:?}");
        }
        assert!(matches!(PrivateKey::parse("ed25519:AAAA"), Err(ReleaseError::BadKey(_))));
        assert!(matches!(PrivateKey::parse("ed25519-private:AAAA"), Err(ReleaseError::BadKey(_))));
    }

    #[test]
    fn versions_order_by_semver() {
        assert_eq!(compare_versions("1.10.0", "1.9.3"), Ok(Ordering::Greater));
        assert_eq!(compare_versions("2.0.0-rc.1", "2.0.0"), Ok(Ordering::Less));
        assert_eq!(compare_versions("1.4.0+build.7", "1.4.0"), Ok(Ordering::Equal));
        assert!(compare_versions("1.4", "1.4.0").is_err());
    }

    #[test]
    fn this_build_has_a_valid_platform() {
        let p = current_platform();
        parse_platform(&p).expect("the current platform is known");
        assert_eq!(parse_platform("aarch64-macos"), Ok(("aarch64", "macos")));
    }
}
