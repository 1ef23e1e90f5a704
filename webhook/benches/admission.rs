//! Admission latency and throughput over TLS on loopback (a bench, not a test: `cargo bench
//! -p kinfer-webhook --bench admission`).
//!
//! The real server (rustls + hyper + warp routes) answers a GPU revision Pod's
//! AdmissionReview (parse, placement, patch). Three runs:
//! 1. closed loop, 64 HTTP/1.1 keep-alive connections, each sending back to back;
//! 2. closed loop, 64 concurrent streams on one HTTP/2 connection (what the apiserver does);
//! 3. open loop at a fixed rate (default 1000/s) from 64 workers over HTTP/2, the latency goal.
//!
//! Environment: `BENCH_SECONDS` (per run, default 5), `BENCH_RATE` (default 1000).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kinfer_webhook::admission::{self, Admission, Metrics};
use kinfer_webhook::config::KinferConfig;
use kinfer_webhook::{server, tls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio_rustls::TlsConnector;
use warp::Filter;

const CONCURRENCY: usize = 64;

fn review() -> Bytes {
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": "hello-00001-deployment-7c9d-", "namespace": "default",
                    "labels": {"serving.knative.dev/revision": "hello-00001", "serving.knative.dev/service": "hello",
                               "serving.knative.dev/revisionUID": "0b5c3b1e-6f7d-4e0c-9d0b-1c2d3e4f5a6b", "app": "hello-00001"},
                    "annotations": {"kinfer.dev/accelerator": "gpu", "kinfer.dev/model-memory": "40Gi",
                                    "kubectl.kubernetes.io/default-container": "user-container"}
                },
                "spec": {
                    "containers": [
                        {"name": "user-container", "image": "registry.local/hello@sha256:0123456789abcdef",
                         "ports": [{"name": "user-port", "containerPort": 8080, "protocol": "TCP"}],
                         "env": [{"name": "PORT", "value": "8080"}, {"name": "K_REVISION", "value": "hello-00001"}],
                         "resources": {},
                         "lifecycle": {"preStop": {"httpGet": {"path": "/wait-for-drain", "port": 8022}}}},
                        {"name": "queue-proxy", "image": "queue",
                         "ports": [{"name": "queue-port", "containerPort": 8012}],
                         "resources": {"requests": {"cpu": "25m"}},
                         "readinessProbe": {"httpGet": {"port": 8012, "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]}}}
                    ],
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 300
                }
            }
        }
    });
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(addr: SocketAddr, ca_pem: &str, h2: bool) -> Sender {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let io = TokioIo::new(tls);
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        Sender::H2(sender)
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Sender::H1(sender)
    }
}

async fn admit(sender: &mut Sender, body: Bytes) -> Duration {
    let req = hyper::Request::post("https://127.0.0.1/mutate-pods")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let start = Instant::now();
    let res = match sender {
        Sender::H1(s) => s.send_request(req).await.unwrap(),
        Sender::H2(s) => s.send_request(req).await.unwrap(),
    };
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let elapsed = start.elapsed();
    assert!(
        body.windows(9).any(|w| w == b"JSONPatch"),
        "expected a patch"
    );
    elapsed
}

fn report(name: &str, mut latencies: Vec<Duration>, wall: Duration) {
    latencies.sort();
    let q = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{name:<44} n={:>7}  {:>8.0} admissions/s  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        latencies.len(),
        latencies.len() as f64 / wall.as_secs_f64(),
        q(0.50).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
}

async fn closed_loop(
    addr: SocketAddr,
    ca: &str,
    h2: bool,
    seconds: u64,
) -> (Vec<Duration>, Duration) {
    let body = review();
    let shared = if h2 {
        Some(connect(addr, ca, true).await)
    } else {
        None
    };
    let mut senders = Vec::new();
    for _ in 0..CONCURRENCY {
        senders.push(match &shared {
            Some(Sender::H2(s)) => Sender::H2(s.clone()),
            _ => connect(addr, ca, false).await,
        });
    }
    // Warm up.
    for s in &mut senders {
        admit(s, body.clone()).await;
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut s| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < deadline {
                    out.push(admit(&mut s, body.clone()).await);
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, start.elapsed())
}

async fn open_loop(
    addr: SocketAddr,
    ca: &str,
    rate: u64,
    seconds: u64,
) -> (Vec<Duration>, Duration) {
    let body = review();
    let Sender::H2(shared) = connect(addr, ca, true).await else {
        unreachable!()
    };
    let period = Duration::from_secs_f64(CONCURRENCY as f64 / rate as f64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|i| {
            let mut s = Sender::H2(shared.clone());
            let body = body.clone();
            tokio::spawn(async move {
                // Spread the workers' phases evenly over one period.
                tokio::time::sleep(period.mul_f64(i as f64 / CONCURRENCY as f64)).await;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut out = Vec::new();
                loop {
                    tick.tick().await;
                    if Instant::now() >= deadline {
                        break out;
                    }
                    out.push(admit(&mut s, body.clone()).await);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, start.elapsed())
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rate: u64 = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sans = vec!["127.0.0.1".to_string()];
        let bundle = tls::renew(None, &sans, time::OffsetDateTime::now_utc(), tls::Lifetimes::default())
            .unwrap()
            .unwrap();
        let resolver =
            tls::CertResolver::new(tls::certified_key(&bundle.cert_pem, &bundle.key_pem).unwrap());
        let registry = prometheus::Registry::new();
        let admission = Admission::new(
            Arc::new(ArcSwap::from_pointee(KinferConfig::default())),
            Metrics::register(&registry).unwrap(),
        );
        let routes = admission::routes(admission).recover(admission::recover);
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = tls::server_config(resolver).unwrap();
        tokio::spawn(server::serve_tls(listener, config, routes, std::future::pending()));

        println!(
            "admission over TLS on {addr}, GPU revision Pod ({} bytes), {} worker threads, {seconds}s per run",
            review().len(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        let (l, w) = closed_loop(addr, &bundle.ca_pem, false, seconds).await;
        report("closed loop, 64 HTTP/1.1 connections", l, w);
        let (l, w) = closed_loop(addr, &bundle.ca_pem, true, seconds).await;
        report("closed loop, 64 streams on one HTTP/2 conn", l, w);
        let (l, w) = open_loop(addr, &bundle.ca_pem, rate, seconds).await;
        report(&format!("open loop at {rate}/s, 64 workers, HTTP/2"), l, w);
    });
}
