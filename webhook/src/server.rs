//! Serves a warp filter over rustls: warp 0.4 has no TLS of its own, so connections are
//! accepted here, handshaken with tokio-rustls and handed to hyper-util's HTTP/1.1 + HTTP/2
//! builder running `warp::service(filter)`. There is no plaintext listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use warp::Filter;
use warp::reply::Reply;

/// A client that does not finish its TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open requests get this long to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Accepts TLS connections on `listener` until `shutdown` resolves, then lets open
/// connections finish (up to [`DRAIN_TIMEOUT`]).
pub async fn serve_tls<F, R>(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    filter: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Filter<Extract = (R,), Error = Infallible> + Clone + Send + Sync + 'static,
    F::Future: Send,
    R: Reply,
{
    let acceptor = TlsAcceptor::from(tls);
    let service = warp::service(filter);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            // Which protocol the client chose, and how often it connects (the apiserver keeps
            // its connections and speaks h2): `--log info,kinfer_webhook::server=debug`.
            let alpn = tls.get_ref().1.alpn_protocol().map(String::from_utf8_lossy);
            tracing::debug!(%peer, alpn = alpn.as_deref().unwrap_or("none"), "TLS connection");
            let conn = builder
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service))
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("admission server drained"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("admission server: connections still open after {DRAIN_TIMEOUT:?}, closing"),
    }
}

/// Binds now, so a port clash fails start-up rather than the first admission.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admission server to {addr}"))
}
