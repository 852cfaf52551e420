//! Connections of the API port: the accept loop (TCP_NODELAY, the TLS handshake off the accept
//! path and bounded in time), the connection type handed to the HTTP server ([`Conn`]: plain TCP
//! or TLS, with the peer's certificate identity in its [`ConnInfo`]) and the idle-connection
//! timeout: a connection that carries no request for `--idle-timeout-secs` is closed, whatever
//! bytes trickle in meanwhile (an unfinished request, as in a slowloris attack, is no request).
//! The transport flags ([`TransportArgs`]) live here too.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;

use super::tls::{TlsReloader, certificate_identity};

/// Default of `--max-message-bytes`: a 20 MiB reference image and the rest of a request.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 24 << 20;

/// Counter: connections closed by the idle timeout.
pub const IDLE_CLOSED: &str = "stylealign_idle_connections_closed_total";
/// Counter: TLS handshakes that failed or timed out (no certificate, wrong CA, garbage).
pub const TLS_FAILED: &str = "stylealign_tls_handshake_failures_total";

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport flags of `stylealign serve` (flattened into [`super::config::ServeArgs`]).
#[derive(clap::Args, Clone, Debug)]
pub struct TransportArgs {
    /// Unary RPCs (and the HTTP/JSON routes but Generate) must answer within this many seconds,
    /// reading the request included; else DEADLINE_EXCEEDED (HTTP 504).
    #[arg(long, env = "STYLEALIGN_UNARY_TIMEOUT_SECS", default_value_t = 30)]
    pub unary_timeout_secs: u64,
    /// Unary RPCs in progress at once, over all connections; one more is RESOURCE_EXHAUSTED (HTTP 429).
    #[arg(long, env = "STYLEALIGN_MAX_CONCURRENT_UNARY", default_value_t = 1024)]
    pub max_concurrent_unary: usize,
    /// Largest request message in bytes (gRPC, decoded); larger is RESOURCE_EXHAUSTED. The HTTP/JSON
    /// body limit is its base64 size (larger is 413).
    #[arg(long, env = "STYLEALIGN_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// A connection carrying no request for this many seconds is closed.
    #[arg(long, env = "STYLEALIGN_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// HTTP/2 keepalive: PING an otherwise quiet connection this often, in seconds (0: never).
    #[arg(long, env = "STYLEALIGN_HTTP2_KEEPALIVE_INTERVAL_SECS", default_value_t = 60)]
    pub http2_keepalive_interval_secs: u64,
    /// HTTP/2 keepalive: close the connection when a PING is not answered within this many seconds.
    #[arg(long, env = "STYLEALIGN_HTTP2_KEEPALIVE_TIMEOUT_SECS", default_value_t = 20)]
    pub http2_keepalive_timeout_secs: u64,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "STYLEALIGN_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
}

impl Default for TransportArgs {
    fn default() -> Self {
        Transport::default().into()
    }
}

/// The transport settings (see [`TransportArgs`] for each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport {
    pub unary_timeout: Duration,
    pub max_concurrent_unary: usize,
    pub max_message_bytes: usize,
    pub idle_timeout: Duration,
    /// `None`: no keepalive PINGs.
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
    pub max_concurrent_streams: u32,
}

impl Default for Transport {
    fn default() -> Self {
        Self {
            unary_timeout: Duration::from_secs(30),
            max_concurrent_unary: 1024,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            idle_timeout: Duration::from_secs(300),
            http2_keepalive_interval: Some(Duration::from_secs(60)),
            http2_keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 256,
        }
    }
}

impl From<Transport> for TransportArgs {
    fn from(t: Transport) -> Self {
        Self {
            unary_timeout_secs: t.unary_timeout.as_secs(),
            max_concurrent_unary: t.max_concurrent_unary,
            max_message_bytes: t.max_message_bytes,
            idle_timeout_secs: t.idle_timeout.as_secs(),
            http2_keepalive_interval_secs: t.http2_keepalive_interval.map_or(0, |d| d.as_secs()),
            http2_keepalive_timeout_secs: t.http2_keepalive_timeout.as_secs(),
            max_concurrent_streams: t.max_concurrent_streams,
        }
    }
}

impl TransportArgs {
    /// The settings; errors name the flag.
    pub fn transport(&self) -> anyhow::Result<Transport> {
        let t = Transport {
            unary_timeout: Duration::from_secs(self.unary_timeout_secs),
            max_concurrent_unary: self.max_concurrent_unary,
            max_message_bytes: self.max_message_bytes,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            http2_keepalive_interval: (self.http2_keepalive_interval_secs > 0)
                .then(|| Duration::from_secs(self.http2_keepalive_interval_secs.min(WEEK))),
            http2_keepalive_timeout: Duration::from_secs(self.http2_keepalive_timeout_secs.min(WEEK)),
            max_concurrent_streams: self.max_concurrent_streams,
        };
        t.check().map_err(anyhow::Error::msg)?;
        Ok(t)
    }
}

/// The longest timeout accepted (seconds).
const WEEK: u64 = 7 * 86400;

impl Transport {
    /// Checks the numbers; the message names the flag.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("unary-timeout-secs", self.unary_timeout.as_secs() as usize),
            ("max-concurrent-unary", self.max_concurrent_unary),
            ("max-message-bytes", self.max_message_bytes),
            ("idle-timeout-secs", self.idle_timeout.as_secs() as usize),
            ("http2-keepalive-timeout-secs", self.http2_keepalive_timeout.as_secs() as usize),
            ("max-concurrent-streams", self.max_concurrent_streams as usize),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        // Beyond what a request needs (the body limit is 4/3 of it).
        if self.max_message_bytes > 1 << 30 {
            return Err("--max-message-bytes must be at most 1 GiB".into());
        }
        for (name, v) in [("unary-timeout-secs", self.unary_timeout), ("idle-timeout-secs", self.idle_timeout)] {
            if v > Duration::from_secs(WEEK) {
                return Err(format!("--{name} must be at most {WEEK} (7 days)"));
            }
        }
        Ok(())
    }
}

/// What the request handlers learn about a connection (in every request's extensions).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// TLS was used.
    pub tls: bool,
    /// The client certificate's identity (mTLS; see [`certificate_identity`]).
    pub peer_identity: Option<Arc<str>>,
    pub(crate) activity: Arc<Activity>,
}

/// Requests in flight on a connection, and when the last one ended.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `base` at which the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { base: Instant::now(), in_flight: AtomicUsize::new(0), idle_since_ms: AtomicU64::new(0) }
    }

    /// A request began; the guard ends it (when the response body is done or dropped).
    pub(crate) fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    /// When the connection became idle; `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.base + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst)))
    }
}

/// Ends a request on its connection when dropped.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.base.elapsed().as_millis() as u64, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection (plain or TLS) that ends itself after the idle timeout.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    closed: bool,
}

impl Conn {
    fn new(io: Io, info: ConnInfo, idle_timeout: Duration) -> Self {
        Self { io, info, idle_timeout, idle: Box::pin(tokio::time::sleep(idle_timeout)), closed: false }
    }

    /// Whether the idle timeout has passed; otherwise the timer is set for its next check.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return false;
            }
            let next = match self.info.activity.idle_since() {
                Some(since) if since.elapsed() >= self.idle_timeout => return true,
                Some(since) => since + self.idle_timeout,
                None => Instant::now() + self.idle_timeout,
            };
            self.idle.as_mut().reset(next.into());
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed || this.poll_idle(cx) {
            if !this.closed {
                this.closed = true;
                tracing::debug!(remote = ?this.info.remote, idle_s = this.idle_timeout.as_secs(), "idle connection closed");
                metrics::counter!(IDLE_CLOSED).increment(1);
            }
            // End of stream: the HTTP server closes the connection.
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts connections on `listener` until `shutdown` turns true; TLS handshakes (when `tls` is
/// set) run in tasks of their own, bounded by [`HANDSHAKE_TIMEOUT`], so that a slow or silent
/// client never holds the accept loop. The stream of ready connections feeds the HTTP server.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<TlsReloader>>,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|v| *v) => break,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Without TCP_NODELAY, a response whose message exceeds h2's 256-byte copy threshold
            // (a `Session` with its token) goes out in two writes, and Nagle's algorithm holds the
            // second until the client's delayed ACK (~40 ms per call).
            let _ = tcp.set_nodelay(true);
            let info =
                move |tls: bool, peer_identity| ConnInfo { remote: Some(remote), tls, peer_identity, activity: Arc::new(Activity::new()) };
            match &tls {
                None => {
                    if tx.send(Ok(Conn::new(Io::Plain(tcp), info(false, None), idle_timeout))).await.is_err() {
                        break;
                    }
                }
                Some(reloader) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(reloader.config());
                    let mutual = reloader.mutual();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                metrics::counter!(TLS_FAILED).increment(1);
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                metrics::counter!(TLS_FAILED).increment(1);
                                return;
                            }
                        };
                        let peer_identity = if mutual {
                            let certs = stream.get_ref().1.peer_certificates();
                            match certs.and_then(|c| c.first()).and_then(|c| certificate_identity(c)) {
                                Some(id) => Some(Arc::<str>::from(id)),
                                None => {
                                    tracing::info!(%remote, "client certificate without a SAN or CN: connection refused");
                                    metrics::counter!(TLS_FAILED).increment(1);
                                    return;
                                }
                            }
                        } else {
                            None
                        };
                        tracing::debug!(%remote, peer = ?peer_identity, elapsed_ms = t.elapsed().as_millis() as u64, "TLS handshake done");
                        let _ = tx.send(Ok(Conn::new(Io::Tls(Box::new(stream)), info(true, peer_identity), idle_timeout))).await;
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_bad_values_name_their_flag() {
        assert_eq!(TransportArgs::default().transport().unwrap(), Transport::default());
        let d = Transport::default();
        assert_eq!((d.unary_timeout, d.max_concurrent_unary, d.idle_timeout), (Duration::from_secs(30), 1024, Duration::from_secs(300)));
        assert_eq!(d.max_message_bytes, 24 << 20);
        let e = Transport { max_concurrent_unary: 0, ..d.clone() }.check().unwrap_err();
        assert!(e.contains("--max-concurrent-unary"), "{e}");
        let e = Transport { idle_timeout: Duration::from_secs(8 * 86400), ..d.clone() }.check().unwrap_err();
        assert!(e.contains("--idle-timeout-secs"), "{e}");
        let off = TransportArgs { http2_keepalive_interval_secs: 0, ..TransportArgs::default() }.transport().unwrap();
        assert_eq!(off.http2_keepalive_interval, None);
    }
}
