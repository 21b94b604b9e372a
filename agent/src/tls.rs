//! How the agent's connections are protected: HTTPS on the branch server with a certificate
//! that is reloaded without restart, the rule for plain HTTP on the branch LAN, and the rule
//! for a plaintext link to the controller.
//!
//! - With `tls_cert` and `tls_key` the branch server speaks TLS (rustls). `keep_reloaded`
//!   reads both files every `RELOAD_EVERY`; when what they hold changes, the new pair serves
//!   every new connection; a pair that does not load (unreadable, malformed, key not matching
//!   the certificate) is logged once and the current one kept.
//! - Without them the branch server speaks plain HTTP only on loopback, in dev mode, or with
//!   `allow_plaintext_lan = true` (a warning at start-up); otherwise the agent does not start.
//! - A `http://` `controller_url` whose host is not loopback is refused the same way, unless
//!   dev mode or `allow_plaintext_controller = true` (a warning at start-up).
//!
//! Architecture invariant: the branch server never accepts a connection before its transport
//! was decided here, and a certificate reload never drops a connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::Uri;
use meridian_shared::http_guard::Handshake;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::Settings;

/// How often the certificate and key files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Why the agent's transport settings are refused (at start-up) or a certificate is not used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("tls_cert and tls_key must be set together")]
    HalfPair,
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("tls_key {} does not go with tls_cert {}: {reason}", key.display(), cert.display())]
    Pair { cert: PathBuf, key: PathBuf, reason: String },
    #[error(
        "the branch server on {addr} needs tls_cert and tls_key: plain HTTP is allowed only on \
         loopback, in dev mode or with allow_plaintext_lan = true"
    )]
    PlaintextLan { addr: SocketAddr },
    #[error(
        "controller_url {url} is plain HTTP to a host other than loopback: use https://, or set \
         allow_plaintext_controller = true"
    )]
    PlaintextController { url: String },
    #[error("controller_url {url} is not a URL: {reason}")]
    ControllerUrl { url: String, reason: String },
}

/// The branch server's certificate and key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `tls_cert` and `tls_key`: both (TLS), neither (plain HTTP), or an error.
    pub fn from_settings(settings: &Settings) -> Result<Option<TlsFiles>, TransportError> {
        match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert: cert.clone(), key: key.clone() })),
            (None, None) => Ok(None),
            _ => Err(TransportError::HalfPair),
        }
    }

    /// Reads both files.
    fn read(&self) -> Result<Pem, TransportError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TransportError::Read { path: path.into(), source })
        };
        Ok(Pem { cert: read(&self.cert)?, key: read(&self.key)? })
    }

    /// Checks the pair: the chain, the key, and that the key is the certificate's.
    fn parse(&self, pem: &Pem) -> Result<CertifiedKey, TransportError> {
        let invalid = |path: &Path, e: rustls::pki_types::pem::Error| TransportError::Pem {
            path: path.into(),
            reason: e.to_string(),
        };
        let chain = CertificateDer::pem_slice_iter(&pem.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&self.cert, e))?;
        if chain.is_empty() {
            return Err(TransportError::Pem {
                path: self.cert.clone(),
                reason: "no certificate in the file".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| invalid(&self.key, e))?;
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TransportError::Pair {
            cert: self.cert.clone(),
            key: self.key.clone(),
            reason: e.to_string(),
        })
    }
}

/// The contents of the certificate and key files.
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Pem {
    /// What the files held, to notice any change (a modification time can stay the same
    /// across two quick writes) without keeping the key's bytes.
    fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((self.cert.len() as u64).to_le_bytes());
        h.update(&self.cert);
        h.update(&self.key);
        h.finalize().into()
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The branch server's TLS: the acceptor, and the certificate it presents, swapped by
/// `reload_if_changed`.
pub struct ServerTls {
    files: TlsFiles,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    /// What the files held when last read (loaded or refused); `None`: they could not be
    /// read.
    seen: Option<[u8; 32]>,
}

impl ServerTls {
    /// Loads the pair; a pair that does not load stops the agent's start.
    pub fn load(files: TlsFiles) -> Result<ServerTls, TransportError> {
        let pem = files.read()?;
        let resolver = Arc::new(Resolver(RwLock::new(Arc::new(files.parse(&pem)?))));
        let seen = Some(pem.fingerprint());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Pair {
                cert: files.cert.clone(),
                key: files.key.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // The branch server speaks HTTP/1.1 (axum's `http1`).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        Ok(ServerTls { files, resolver, acceptor, seen })
    }

    /// The certificate presented to new connections (the end entity's, DER).
    pub fn current_certificate(&self) -> Option<CertificateDer<'static>> {
        self.resolver.current().cert.first().cloned()
    }

    /// Loads the pair again if the files changed since the last look. `Ok(true)`: new
    /// connections get the new pair; `Ok(false)`: nothing changed; `Err`: the files changed
    /// but do not load, the current pair stays (and the same files are not tried again).
    pub fn reload_if_changed(&mut self) -> Result<bool, TransportError> {
        let pem = self.files.read();
        let now = pem.as_ref().ok().map(Pem::fingerprint);
        if now == self.seen {
            return Ok(false);
        }
        self.seen = now;
        let key = self.files.parse(&pem?)?;
        self.resolver.replace(key);
        Ok(true)
    }
}

/// Reloads the certificate whenever its files change, until `shutdown`.
pub async fn keep_reloaded(mut tls: ServerTls, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Two small local files: cheap enough for a worker thread.
        match tls.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(cert = %tls.files.cert.display(), "loaded the new TLS certificate of the branch server")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the changed TLS certificate or key does not load; the branch server keeps the current one")
            }
        }
    }
}

/// Hands rustls the current certificate for every handshake.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl Resolver {
    fn current(&self) -> Arc<CertifiedKey> {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, key: CertifiedKey) {
        match self.0.write() {
            Ok(mut k) => *k = Arc::new(key),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(key),
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What the branch server makes of each accepted connection: a TLS session with the current
/// certificate, or the connection itself. It runs under the server's header timeout
/// (`http_guard::Limits`), so a client that stalls its handshake is dropped like one that
/// stalls its request.
#[derive(Clone)]
pub struct BranchHandshake(Option<TlsAcceptor>);

impl BranchHandshake {
    pub fn plaintext() -> BranchHandshake {
        BranchHandshake(None)
    }

    pub fn tls(tls: &ServerTls) -> BranchHandshake {
        BranchHandshake(Some(tls.acceptor.clone()))
    }
}

impl Handshake for BranchHandshake {
    type Io = Either<TlsStream<TcpStream>, TcpStream>;

    async fn handshake(&self, tcp: TcpStream) -> std::io::Result<Self::Io> {
        match &self.0 {
            Some(acceptor) => acceptor.accept(tcp).await.map(Either::Left),
            None => Ok(Either::Right(tcp)),
        }
    }
}

/// At start-up: checks `controller_url`, then decides the branch server's transport on
/// `addr` — TLS with the configured pair (loaded now), or plain HTTP where it is allowed.
pub fn prepare(
    settings: &Settings,
    addr: SocketAddr,
) -> Result<(BranchHandshake, Option<ServerTls>), TransportError> {
    plaintext_controller(
        &settings.controller_url,
        settings.dev_mode,
        settings.allow_plaintext_controller,
    )?;
    match TlsFiles::from_settings(settings)? {
        Some(files) => {
            let tls = ServerTls::load(files)?;
            Ok((BranchHandshake::tls(&tls), Some(tls)))
        }
        None => {
            plaintext_lan(addr, settings.dev_mode, settings.allow_plaintext_lan)?;
            Ok((BranchHandshake::plaintext(), None))
        }
    }
}

impl From<TransportError> for crate::Error {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Read { .. } => crate::Error::Internal(e.to_string()),
            _ => crate::Error::Validation(e.to_string()),
        }
    }
}

/// Whether the branch server may speak plain HTTP on `addr`; a warning when it may only
/// because of dev mode or `allow_plaintext_lan`.
pub fn plaintext_lan(
    addr: SocketAddr,
    dev_mode: bool,
    allowed: bool,
) -> Result<(), TransportError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else if dev_mode {
        tracing::warn!(%addr, "branch server is plain HTTP on a non-loopback address: allowed in dev mode only");
        Ok(())
    } else if allowed {
        tracing::warn!(%addr, "branch server is plain HTTP on the branch LAN (allow_plaintext_lan): staff passwords and session cookies cross the network readable; set tls_cert and tls_key");
        Ok(())
    } else {
        Err(TransportError::PlaintextLan { addr })
    }
}

/// Whether the agent may dial `url`: `https://` always; `http://` to a loopback host, in dev
/// mode, or with `allow_plaintext_controller` (a warning).
pub fn plaintext_controller(
    url: &str,
    dev_mode: bool,
    allowed: bool,
) -> Result<(), TransportError> {
    let uri: Uri = url.parse().map_err(|e: axum::http::uri::InvalidUri| {
        TransportError::ControllerUrl { url: url.to_owned(), reason: e.to_string() }
    })?;
    if uri.scheme_str() != Some("http") {
        return Ok(());
    }
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else if dev_mode {
        tracing::warn!(%url, "the link to the controller is plaintext to a non-loopback host: allowed in dev mode only");
        Ok(())
    } else if allowed {
        tracing::warn!(%url, "the link to the controller is plaintext (allow_plaintext_controller): the agent's credential and the branch's data cross the network readable; use https://");
        Ok(())
    } else {
        Err(TransportError::PlaintextController { url: url.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a new self-signed pair for `localhost` to `files`; returns its certificate.
    fn new_pair(files: &TlsFiles) -> CertificateDer<'static> {
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("pair");
        std::fs::write(&files.cert, pair.cert.pem()).expect("cert");
        std::fs::write(&files.key, pair.signing_key.serialize_pem()).expect("key");
        pair.cert.der().clone()
    }

    #[test]
    fn a_changed_pair_is_loaded_and_a_bad_one_keeps_the_current() {
        let dir = std::env::temp_dir().join(format!("agent-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        let first = new_pair(&files);
        let mut tls = ServerTls::load(files.clone()).expect("first pair");
        assert_eq!(tls.current_certificate(), Some(first.clone()));
        assert!(!tls.reload_if_changed().expect("unchanged"), "nothing changed");

        // A key that is not PEM, then one that belongs to another certificate: refused, the
        // current pair stays, and the same files are not tried again.
        std::fs::write(&files.key, "not a key").expect("garbage");
        let e = tls.reload_if_changed().expect_err("garbage key");
        assert!(matches!(e, TransportError::Pem { .. }), "{e}");
        assert_eq!(tls.current_certificate(), Some(first.clone()));
        assert!(!tls.reload_if_changed().expect("same bad files"));
        let other = rcgen::KeyPair::generate().expect("key");
        std::fs::write(&files.key, other.serialize_pem()).expect("other key");
        let e = tls.reload_if_changed().expect_err("mismatched key");
        assert!(matches!(e, TransportError::Pair { .. }), "{e}");
        assert_eq!(tls.current_certificate(), Some(first.clone()));

        let second = new_pair(&files);
        assert!(tls.reload_if_changed().expect("second pair"));
        assert_eq!(tls.current_certificate(), Some(second));

        // At start-up a pair that does not load, or half of one, stops the agent.
        std::fs::write(&files.cert, "").expect("empty cert");
        assert!(matches!(ServerTls::load(files.clone()), Err(TransportError::Pem { .. })));
        let half = Settings { tls_cert: Some(files.cert.clone()), ..Settings::default() };
        assert!(matches!(TlsFiles::from_settings(&half), Err(TransportError::HalfPair)));
        assert_eq!(TlsFiles::from_settings(&Settings::default()).expect("none"), None);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn plain_http_on_the_branch_lan_only_on_loopback_in_dev_mode_or_when_allowed() {
        let check = |addr: &str, dev: bool, allowed: bool, ok: bool| {
            let addr: SocketAddr = addr.parse().expect("addr");
            let r = plaintext_lan(addr, dev, allowed);
            assert_eq!(r.is_ok(), ok, "{addr} dev={dev} allowed={allowed}: {r:?}");
        };
        check("127.0.0.1:8101", false, false, true);
        check("[::1]:8101", false, false, true);
        check("0.0.0.0:8101", false, false, false);
        check("[::]:8101", false, false, false);
        check("10.1.2.3:8101", false, false, false);
        check("0.0.0.0:8101", true, false, true);
        check("10.1.2.3:8101", false, true, true);
        let e = plaintext_lan("10.1.2.3:8101".parse().expect("addr"), false, false);
        assert!(e.expect_err("refused").to_string().contains("allow_plaintext_lan"));
    }

    #[test]
    fn a_plaintext_controller_url_only_to_loopback_in_dev_mode_or_when_allowed() {
        let check = |url: &str, dev: bool, allowed: bool, ok: bool| {
            let r = plaintext_controller(url, dev, allowed);
            assert_eq!(r.is_ok(), ok, "{url} dev={dev} allowed={allowed}: {r:?}");
        };
        check("https://controller.example.com:8081", false, false, true);
        check("https://10.0.0.5:8081", false, false, true);
        check("http://127.0.0.1:8081", false, false, true);
        check("http://127.8.9.10:8081", false, false, true);
        check("http://localhost:8081", false, false, true);
        check("http://LOCALHOST", false, false, true);
        check("http://[::1]:8081", false, false, true);
        check("http://controller.example.com:8081", false, false, false);
        check("http://10.0.0.5:8081", false, false, false);
        check("http://localhost.example.com:8081", false, false, false);
        check("http://[::ffff:10.0.0.5]:8081", false, false, false);
        check("http://10.0.0.5:8081", true, false, true);
        check("http://10.0.0.5:8081", false, true, true);
        check("not a url", false, false, false);
        let e = plaintext_controller("http://10.0.0.5:8081", false, false);
        assert!(e.expect_err("refused").to_string().contains("allow_plaintext_controller"));
    }
}
