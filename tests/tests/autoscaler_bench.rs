//! Benchmark of the autoscaler plugin (ignored by default; a few minutes):
//!
//!   hack/with-cluster cargo test -p kinfer-tests --test autoscaler_bench -- --ignored --nocapture
//!
//! Reaction: time from a load step at the source (a revision's pods go from 14 to 35
//! requests in flight) to the revision's Deployment asking for the pod count the KPA computes
//! (2 → 5 at target 10 × 0.7), the way a user sees a scale-up start. Three paths, each on its
//! own Knative Service, one after another:
//!
//! - **plugin, Prometheus scraping every 1 s**: exporter → Debian's Prometheus → the plugin
//!   (default `--collect-interval 250ms`) → the KPA's stat websocket;
//! - **plugin, Prometheus scraping every 250 ms**: the same with a faster scrape;
//! - **Knative's own path**: a queue-proxy stand-in on each pod's IP, port 9090, answers the
//!   autoscaler's scrape with Knative's protobuf `Stat` (what queue-proxy serves); the real
//!   autoscaler scrapes it every second. The Service sets `target-burst-capacity: 0`, because
//!   with -1 (the local control plane's default) Knative assumes the activator is in the
//!   path and does not scrape at all. Not modelled: queue-proxy's own averaging over its
//!   reporting window and the requests' trip through it, both small next to the scrape.
//!
//! All three end in the KPA's decision tick, every 2 s (`tickInterval`, a constant in
//! Knative), which no reporter can hurry except from zero. Each trial waits a random 0–2 s
//! before its step so that steps fall uniformly over the tick. Prints p50/p95/max per path.
//! `KINFER_AUTOSCALER_BENCH_TRIALS` sets the trials per path (default 10).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use kinfer_core::kpa::Stat;
use kinfer_tests::autoscaling::{Load, bed};
use kinfer_tests::{client, knative, namespace, pods};
use kube::api::Api;
use kube::{Client, ResourceExt};
use prost::Message;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LOW: f64 = 14.0;
const HIGH: f64 = 35.0;

fn annotations(extra: serde_json::Value) -> serde_json::Value {
    let mut a = json!({
        "autoscaling.knative.dev/target": "10",
        "autoscaling.knative.dev/window": "6s",
        "autoscaling.knative.dev/min-scale": "1",
    });
    a.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    a
}

/// Deterministic jitter in [0, 2 s): xorshift over the trial number.
fn jitter(i: u64) -> Duration {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    Duration::from_secs_f64(
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64 * 2.0,
    )
}

async fn wait_replicas(
    deps: &Api<Deployment>,
    name: &str,
    n: i32,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if deps.get(name).await?.spec.replicas == Some(n) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "{name}: not at {n} replicas within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs the trials: `set(load)` changes the load at the source.
async fn trials(
    deps: &Api<Deployment>,
    dep: &str,
    n: usize,
    set: impl Fn(f64),
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for i in 0..n {
        set(LOW);
        // Down to 2 pods (the KPA leaves panic mode one stable window after it entered it).
        wait_replicas(deps, dep, 2, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(3) + jitter(i as u64)).await;
        set(HIGH);
        let t = wait_replicas(deps, dep, 5, Duration::from_secs(60)).await?;
        eprintln!("  trial {i}: {t:.2?}");
        times.push(t);
    }
    Ok(times)
}

/// Answers the autoscaler's scrape on each pod's IP:9090 as queue-proxy does, with an even
/// share of the revision's load; adds the pods' IPs to this namespace's loopback.
struct QueueProxies {
    load: Arc<Mutex<f64>>,
}

impl QueueProxies {
    fn start(client: Client, ns: String, revision: String) -> Self {
        let load = Arc::new(Mutex::new(0.0));
        let running: Arc<Mutex<usize>> = Default::default();
        let (l, r) = (load.clone(), running.clone());
        tokio::spawn(async move {
            let mut serving = BTreeSet::new();
            loop {
                let selector = format!("serving.knative.dev/revision={revision}");
                if let Ok(list) = pods(&client, &ns, &selector).await {
                    let ips: Vec<(String, String)> = list
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .filter_map(|p| Some((p.name_any(), p.status.as_ref()?.pod_ip.clone()?)))
                        .collect();
                    *r.lock().unwrap() = ips.len().max(1);
                    for (pod, ip) in ips {
                        if serving.insert(ip.clone()) {
                            let _ = std::process::Command::new("ip")
                                .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
                                .output();
                            if let Ok(listener) = TcpListener::bind((ip.as_str(), 9090)).await {
                                tokio::spawn(serve(listener, pod, l.clone(), r.clone()));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { load }
    }
}

async fn serve(
    listener: TcpListener,
    pod: String,
    load: Arc<Mutex<f64>>,
    running: Arc<Mutex<usize>>,
) {
    let started = Instant::now();
    while let Ok((mut conn, _)) = listener.accept().await {
        let (pod, load, running) = (pod.clone(), load.clone(), running.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut have = 0;
            while !buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf[have..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => have += n,
                }
            }
            let share = *load.lock().unwrap() / *running.lock().unwrap() as f64;
            let body = Stat {
                pod_name: pod,
                average_concurrent_requests: share,
                request_count: share,
                process_uptime: started.elapsed().as_secs_f64(),
                ..Stat::default()
            }
            .encode_to_vec();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(&body).await;
        });
    }
}

fn summary(label: &str, times: &mut [Duration]) -> f64 {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize].as_secs_f64();
    println!(
        "  {label}: p50 {:.2} s  p95 {:.2} s  max {:.2} s  ({} trials)",
        at(0.5),
        at(0.95),
        at(1.0),
        times.len()
    );
    at(0.5)
}

#[tokio::test]
#[ignore = "benchmark; run with --ignored (see the file's doc)"]
async fn reaction_to_a_load_step() -> anyhow::Result<()> {
    let n: usize = std::env::var("KINFER_AUTOSCALER_BENCH_TRIALS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(10);
    let mut results = Vec::new();
    for (label, scrape) in [
        ("plugin, Prometheus scrape 1 s   ", Duration::from_secs(1)),
        (
            "plugin, Prometheus scrape 250 ms",
            Duration::from_millis(250),
        ),
    ] {
        eprintln!("{label}");
        let Some(bed) = bed("as-bench", scrape).await? else {
            anyhow::bail!("prometheus is not installed");
        };
        let revision = bed
            .revision(knative::service(
                "model",
                annotations(json!({"kinfer.dev/autoscaling": "requests"})),
            ))
            .await?;
        let plugin = bed.plugin().await?;
        let set = |in_flight| bed.exporter.set(&revision, Load::requests(in_flight));
        let times = trials(&bed.deployments, &format!("{revision}-deployment"), n, set)
            .await
            .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
        results.push((label, times));
    }

    let label = "Knative's queue-proxy path      ";
    eprintln!("{label}");
    let client = client().await?;
    let ns = namespace(&client, "as-bench-qp").await?;
    let svc = knative::create_ready(
        &client,
        &ns,
        knative::service(
            "model",
            annotations(json!({"autoscaling.knative.dev/target-burst-capacity": "0"})),
        ),
    )
    .await?;
    let revision = knative::status_str(&svc, "latestReadyRevisionName").unwrap();
    let proxies = QueueProxies::start(client.clone(), ns.clone(), revision.clone());
    let deps: Api<Deployment> = Api::namespaced(client, &ns);
    let times = trials(&deps, &format!("{revision}-deployment"), n, |l| {
        *proxies.load.lock().unwrap() = l
    })
    .await?;
    results.push((label, times));

    println!(
        "reaction: load step {LOW} → {HIGH} requests at the source → Deployment replicas 2 → 5"
    );
    let mut medians = Vec::new();
    for (label, times) in &mut results {
        medians.push(summary(label, times));
    }
    println!(
        "  plugin (1 s scrape) / Knative's path at p50: {:.2}x; plugin (250 ms scrape): {:.2}x",
        medians[0] / medians[2],
        medians[1] / medians[2]
    );
    Ok(())
}
