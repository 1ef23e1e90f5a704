//! The admin HTTP server every binary runs: `/healthz` (the process is alive), `/readyz`
//! (every cache has synced and the component can do its job) and `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use prometheus::{Encoder, Registry, TextEncoder};
use warp::Filter;
use warp::http::StatusCode;

/// Readiness made of named parts: the binary registers one gate per cache or start-up step,
/// and `/readyz` turns green only when every gate has been opened.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    pending: Arc<AtomicUsize>,
}

/// One part of readiness; open it once, when that part is ready.
#[derive(Debug)]
pub struct ReadinessGate {
    pending: Option<Arc<AtomicUsize>>,
    name: &'static str,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn gate(&self, name: &'static str) -> ReadinessGate {
        self.pending.fetch_add(1, Ordering::SeqCst);
        ReadinessGate {
            pending: Some(self.pending.clone()),
            name,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0
    }
}

impl ReadinessGate {
    pub fn open(mut self) {
        if let Some(pending) = self.pending.take() {
            pending.fetch_sub(1, Ordering::SeqCst);
            tracing::info!(part = self.name, "ready");
        }
    }
}

/// The registry and readiness a binary exposes, and the server that exposes them.
#[derive(Clone)]
pub struct AdminServer {
    pub registry: Registry,
    pub readiness: Readiness,
}

impl AdminServer {
    /// A registry whose metric names start with `prefix` (e.g. `kinfer_webhook`), with the
    /// process collector registered.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let registry = Registry::new_custom(Some(prefix.to_string()), None)?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            readiness: Readiness::new(),
        })
    }

    /// Binds now (so a port clash fails start-up) and returns the serving future, which ends
    /// when `shutdown` resolves and open requests have finished.
    pub async fn bind<S>(
        &self,
        addr: SocketAddr,
        shutdown: S,
    ) -> anyhow::Result<(SocketAddr, impl Future<Output = ()> + use<S>)>
    where
        S: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the admin server to {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "admin server listening (/healthz, /readyz, /metrics)");
        let server = warp::serve(routes(self.registry.clone(), self.readiness.clone()))
            .incoming(listener)
            .graceful(shutdown)
            .run();
        Ok((local, server))
    }
}

fn routes(
    registry: Registry,
    readiness: Readiness,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone {
    let healthz = warp::path!("healthz").map(|| "ok");
    let readyz = warp::path!("readyz").map(move || {
        if readiness.is_ready() {
            warp::reply::with_status("ok", StatusCode::OK)
        } else {
            warp::reply::with_status("not ready", StatusCode::SERVICE_UNAVAILABLE)
        }
    });
    let metrics = warp::path!("metrics").map(move || {
        let mut body = Vec::new();
        let encoder = TextEncoder::new();
        match encoder.encode(&registry.gather(), &mut body) {
            Ok(()) => warp::http::Response::builder()
                .header("content-type", encoder.format_type())
                .body(body),
            Err(e) => warp::http::Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(e.to_string().into_bytes()),
        }
    });
    warp::get().and(healthz.or(readyz).or(metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_every_gate_opens() {
        let readiness = Readiness::new();
        assert!(readiness.is_ready(), "no gates means ready");
        let a = readiness.gate("a");
        let b = readiness.gate("b");
        assert!(!readiness.is_ready());
        a.open();
        assert!(!readiness.is_ready());
        b.open();
        assert!(readiness.is_ready());
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let admin = AdminServer::new("kinfer_test").unwrap();
        let counter = prometheus::IntCounter::new("things_total", "things").unwrap();
        admin.registry.register(Box::new(counter.clone())).unwrap();
        counter.inc();
        let gate = admin.readiness.gate("cache");
        let routes = routes(admin.registry.clone(), admin.readiness.clone());

        let res = warp::test::request().path("/healthz").reply(&routes).await;
        assert_eq!(res.status(), 200);
        let res = warp::test::request().path("/readyz").reply(&routes).await;
        assert_eq!(res.status(), 503);
        gate.open();
        let res = warp::test::request().path("/readyz").reply(&routes).await;
        assert_eq!(res.status(), 200);
        let res = warp::test::request().path("/metrics").reply(&routes).await;
        let body = String::from_utf8(res.body().to_vec()).unwrap();
        assert!(body.contains("kinfer_test_things_total 1"), "{body}");
    }
}
