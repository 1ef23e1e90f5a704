//! Pod-creation latency through the real apiserver, with and without kinfer's webhook.
//!
//! Run inside the local control plane (not part of `make test`):
//! `webhook/bench/pod_latency.sh [N]` (= `hack/with-cluster --kinfer cargo bench -p
//! kinfer-webhook --bench pod_latency`).
//!
//! Creates N Pods one after another in each of three variants, interleaved (the order
//! rotates) so that load from elsewhere on the machine hits them alike, and times each create
//! call (the apiserver's whole admission chain, storage included):
//! - **without**: no Knative revision label, so the objectSelector keeps it away from the
//!   webhook; otherwise the same Pod as **called** (a label of the same size in its place, the
//!   same kinfer annotation), so the ratio measures only the webhook;
//! - **called**: revision label and `kinfer.dev/accelerator: cpu`: the apiserver calls
//!   `pods.kinfer.dev` over TLS, which allows it unchanged;
//! - **patched**: revision label and `kinfer.dev/handler`: the webhook patches in the init
//!   container (with the API-token mount the ServiceAccount plugin gave the other
//!   containers, so the apiserver does not call the webhook a second time), volume and
//!   wrapper command.
//!
//! After each create it waits until a watch on the namespace sees the Pod scheduled
//! (`spec.nodeName`) and Running (KWOK starts the containers at once), then deletes it and
//! waits until it is gone, so each create runs on a quiet control plane and the Pod-startup latency (the Kubernetes pod-startup SLI:
//! creation until the containers are reported started, as observed by a watch) is measured
//! from the start of the create call, next to the API-call latency.
//!
//! Prints p50/p99 of each and the ratios to "without" (goal: within 1.1x).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Without,
    Called,
    Patched,
}

const VARIANTS: [Variant; 3] = [Variant::Without, Variant::Called, Variant::Patched];

fn pod(name: &str, variant: Variant) -> Pod {
    let mut labels = json!({ "app": "bench" });
    // Same length as the revision label, so "without" differs from "called" only in scope.
    let key = match variant {
        Variant::Without => "bench.kinfer.dev/no-revision",
        _ => "serving.knative.dev/revision",
    };
    labels[key] = json!("bench-00001");
    let annotations = match variant {
        Variant::Patched => json!({ "kinfer.dev/handler": "model:predict" }),
        _ => json!({ "kinfer.dev/accelerator": "cpu" }),
    };
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels, "annotations": annotations },
        "spec": { "containers": [{
            "name": "user-container",
            "image": "dev.local/model",
            "ports": [{ "containerPort": 8080 }],
        }]}
    }))
    .unwrap()
}

/// When the watch first saw a Pod scheduled and Running.
type Times = (Option<Instant>, Option<Instant>);

/// [`Times`] of each Pod the watch has seen, by name.
#[derive(Default)]
struct Seen {
    pods: Mutex<HashMap<String, Times>>,
    changed: Notify,
}

impl Seen {
    fn record(&self, pod: &Pod) {
        let now = Instant::now();
        let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let mut pods = self.pods.lock().unwrap();
        let entry = pods.entry(pod.name_any()).or_default();
        if scheduled && entry.0.is_none() {
            entry.0 = Some(now);
        }
        if running && entry.1.is_none() {
            entry.1 = Some(now);
        }
        drop(pods);
        self.changed.notify_waiters();
    }

    fn gone(&self, pod: &Pod) {
        self.pods.lock().unwrap().remove(&pod.name_any());
        self.changed.notify_waiters();
    }

    /// Waits until the watch has seen `name` deleted.
    async fn deleted(&self, name: &str) -> anyhow::Result<()> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if !self.pods.lock().unwrap().contains_key(name) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .map_err(|_| anyhow::anyhow!("{name}: not deleted after 30 s"))
    }

    /// Waits until `name` is Running; returns when it was seen scheduled and Running.
    async fn running(&self, name: &str) -> anyhow::Result<(Instant, Instant)> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if let Some((Some(s), Some(r))) = self.pods.lock().unwrap().get(name).copied() {
                    return (s, r);
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .map_err(|_| anyhow::anyhow!("{name}: not Running after 30 s"))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .or_else(|| std::env::var("KINFER_BENCH_PODS").ok())
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    if std::env::var_os("KUBECONFIG").is_none() {
        anyhow::bail!("KUBECONFIG is not set: run through webhook/bench/pod_latency.sh");
    }
    let client = Client::try_default().await?;
    let ns = format!(
        "bench-pods-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos()
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Pods need the namespace's default ServiceAccount.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    while sas.get_opt("default").await?.is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The watch is a task of its own on a two-worker runtime, so decoding its events does
    // not hold up the timed create calls.
    let seen = Arc::new(Seen::default());
    let (listed_tx, listed) = tokio::sync::oneshot::channel();
    tokio::spawn({
        let seen = seen.clone();
        let pods = pods.clone();
        async move {
            let mut listed_tx = Some(listed_tx);
            let mut events = std::pin::pin!(watcher(pods, watcher::Config::default()));
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => seen.record(&p),
                    Ok(watcher::Event::Delete(p)) => seen.gone(&p),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = listed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("watch: {e}"),
                }
            }
        }
    });
    listed.await?;

    let warmup = 20.min(n);
    let mut times: [Vec<Duration>; 3] = Default::default();
    let mut scheduled: [Vec<Duration>; 3] = Default::default();
    let mut running: [Vec<Duration>; 3] = Default::default();
    let mut missed = [0usize; 3];
    for i in 0..warmup + n {
        for k in 0..VARIANTS.len() {
            let v = (i + k) % VARIANTS.len();
            let variant = VARIANTS[v];
            let name = format!("{}-{i}", format!("{variant:?}").to_lowercase());
            let p = pod(&name, variant);
            let start = Instant::now();
            let created = pods.create(&PostParams::default(), &p).await?;
            let took = start.elapsed();
            let injected = created
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.name == "kinfer-wrapper-install"));
            anyhow::ensure!(
                injected == (variant == Variant::Patched),
                "{}: patched: {injected}",
                created.name_any()
            );
            if i >= warmup {
                times[v].push(took);
            }
            match seen.running(&name).await {
                Ok((s, r)) if i >= warmup => {
                    scheduled[v].push(s - start);
                    running[v].push(r - start);
                }
                Ok(_) => {}
                Err(e) => {
                    // Counted and reported, not dropped silently.
                    let now = pods.get(&name).await?;
                    eprintln!(
                        "{e} (now: node {:?}, phase {:?})",
                        now.spec.and_then(|s| s.node_name),
                        now.status.and_then(|s| s.phase)
                    );
                    missed[v] += 1;
                }
            }
            // The two CPU nodes hold 110 Pods each: delete this one (KWOK removes it) and wait
            // until it is gone, so the next create again meets a quiet control plane.
            pods.delete(&name, &DeleteParams::default().grace_period(0))
                .await?;
            seen.deleted(&name).await?;
        }
    }
    for t in times.iter_mut().chain(&mut scheduled).chain(&mut running) {
        t.sort();
    }
    let labels = [
        "without webhook (out of scope)",
        "webhook called, no patch     ",
        "webhook patches (handler)    ",
    ];
    let report = |title: &str, times: &[Vec<Duration>; 3]| {
        println!("{title}");
        let p = |v: usize, q: f64| ms(percentile(&times[v], q));
        for (v, label) in labels.iter().enumerate() {
            let ratio = if v == 0 {
                String::new()
            } else {
                format!(
                    "  ratio p50 {:.2}x p99 {:.2}x",
                    p(v, 0.5) / p(0, 0.5),
                    p(v, 0.99) / p(0, 0.99)
                )
            };
            println!(
                "  {label}: p50 {:7.2} ms  p99 {:7.2} ms{ratio}",
                p(v, 0.5),
                p(v, 0.99)
            );
        }
    };
    println!("{n} Pods per variant, one at a time (after {warmup} warm-up), interleaved:");
    report("create call (API latency; goal: within 1.1x):", &times);
    report("create until the watch sees it scheduled:", &scheduled);
    report(
        "create until the watch sees it Running (pod startup, no image pull):",
        &running,
    );
    if missed.iter().any(|&m| m > 0) {
        println!("  not Running within 30 s (left out of the startup rows): {missed:?}");
    }

    namespaces.delete(&ns, &DeleteParams::background()).await?;
    Ok(())
}
