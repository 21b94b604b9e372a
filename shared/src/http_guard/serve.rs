//! The accept loop: a connection slot before each accept, the handshake and the request head
//! under the header timeout, request bodies under the body timeout, the security headers on
//! every response, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// What one server lets a client hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// To send a request's head (and the TLS handshake before the first one); an idle
    /// keep-alive connection is closed after as long without a new request.
    pub header_read_timeout: Duration,
    /// The longest pause while a request body arrives.
    pub body_read_timeout: Duration,
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 512,
        }
    }
}

/// Turns an accepted TCP connection into the stream HTTP is spoken on: TLS, or the connection
/// itself (`Plaintext`). It runs under `Limits::header_read_timeout`.
pub trait Handshake: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// HTTP straight on the TCP connection.
#[derive(Debug, Clone, Copy)]
pub struct Plaintext;

impl Handshake for Plaintext {
    type Io = TcpStream;
    async fn handshake(&self, tcp: TcpStream) -> io::Result<TcpStream> {
        Ok(tcp)
    }
}

/// Serves `app` in plain HTTP/1.1 on `listener` until `shutdown` completes, then lets the
/// open connections finish their requests. Dropping the future closes the listener and every
/// connection at once. Handlers can extract `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_with(listener, app, limits, Plaintext, shutdown).await
}

/// `serve`, speaking HTTP/1.1 over what `handshake` makes of each connection.
pub async fn serve_with<H: Handshake>(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    handshake: H,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let app = app.layer(axum::middleware::map_response(super::security_headers));
    let service = tower::ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(limits.body_read_timeout))
        .service(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let http = Arc::new(http);
    let slots = Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        // A slot first: over the cap, new connections wait in the listen backlog.
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: the listener is fine, try again.
                    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (service, http, handshake, closing) =
            (service.clone(), http.clone(), handshake.clone(), closing.clone());
        connections.spawn(async move {
            let _slot = slot;
            let io =
                match tokio::time::timeout(limits.header_read_timeout, handshake.handshake(tcp))
                    .await
                {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "handshake timed out");
                        return;
                    }
                };
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(remote));
                let service = service.clone();
                async move {
                    Ok::<_, Infallible>(service.oneshot(req).await.unwrap_or_else(|e| match e {}))
                }
            });
            let mut connection =
                pin!(http.serve_connection(TokioIo::new(io), service).with_upgrades());
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                // Header timeouts, clients gone mid-request: theirs, not ours.
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.cancel();
    while connections.join_next().await.is_some() {}
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_head(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => head.push(byte[0]),
            }
        }
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    /// A live feed streams for longer than the header timeout: the timer runs only while a
    /// request head is awaited.
    #[tokio::test]
    async fn a_streaming_answer_outlives_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let feed = || async {
            let ticks = futures_ticks(6, Duration::from_millis(100));
            axum::body::Body::from_stream(ticks)
        };
        let app = Router::new().route("/feed", axum::routing::get(feed));
        let limits =
            Limits { header_read_timeout: Duration::from_millis(150), ..Limits::default() };
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, limits, stop.clone().cancelled_owned()));
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains("tick 5") {
            let n = c.read(&mut buf).await.expect("read");
            assert!(n > 0, "cut off mid-stream: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        stop.cancel();
        drop(c);
        server.await.expect("join").expect("served");
    }

    /// `n` chunks `tick i`, `every` apart.
    fn futures_ticks(
        n: usize,
        every: Duration,
    ) -> impl tokio_stream::Stream<Item = Result<String, Infallible>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep(every).await;
                if tx.send(Ok(format!("tick {i}\n"))).await.is_err() {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_in_the_backlog() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let limits = Limits { max_connections: 2, ..Limits::default() };
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, limits, stop.clone().cancelled_owned()));
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(request).await.expect("write");
            read_head(&mut c).await.expect("served");
            let mut body = [0u8; 2];
            c.read_exact(&mut body).await.expect("body");
            held.push(c);
        }
        let mut third = TcpStream::connect(addr).await.expect("connect");
        third.write_all(request).await.expect("write");
        let waiting = tokio::time::timeout(Duration::from_millis(300), read_head(&mut third)).await;
        assert!(waiting.is_err(), "served over the cap: {waiting:?}");
        held.pop();
        let head = read_head(&mut third).await.expect("served once a slot freed");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        stop.cancel();
        drop((held, third));
        server.await.expect("join").expect("served");
    }
}
