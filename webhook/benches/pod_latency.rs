//! Pod-creation latency through the real apiserver, with and without kinfer's webhook.
//!
//! Run inside the local control plane (not part of `make test`):
//! `webhook/bench/pod_latency.sh [N]` (= `hack/with-cluster --kinfer cargo bench -p
//! kinfer-webhook --bench pod_latency`).
//!
//! Three parts, N trials per variant each, variants interleaved (the order rotates) so that
//! load from elsewhere on the machine hits them alike; every trial meets a quiet control
//! plane (the previous Pod is gone):
//!
//! 1. **Revision Pods** (the path of every Pod of a kinfer revision): a Deployment shaped like
//!    Knative's is scaled 0 → 1 by a patch of its replicas, as the KPA does, and the real
//!    Deployment and ReplicaSet controllers make the Pod. **with kinfer**: the Deployment is
//!    in scope, `deployments.kinfer.dev` placed its template when it was created (wrapper
//!    init container, volume, command, `kinfer.dev/placed`), so neither the scale patch nor
//!    the Pod is sent to the webhook. **without**: the same Deployment with the same final
//!    template, with same-size labels in place of the revision label and `kinfer.dev/placed`,
//!    so it is outside every kinfer scope. Timed from the scale patch until the watch sees
//!    the Pod, sees it scheduled and sees it Running.
//! 2. **The revision's Deployment create call** (once per revision): with kinfer (placed by
//!    the webhook) and without (the same final object, out of scope).
//! 3. **Pods of an unplaced template** (the Pod webhook's fallback: Deployments from before
//!    kinfer was installed, Pods made by hand), created directly, timed from the create call:
//!    - **without**: no revision label (a label of the same size in its place), so the
//!      objectSelector keeps it away from the webhook; otherwise as **called**;
//!    - **called**: revision label and `kinfer.dev/accelerator: cpu`: the apiserver calls
//!      `pods.kinfer.dev` over TLS, which allows it unchanged;
//!    - **patched**: revision label and `kinfer.dev/handler`: the webhook patches in the init
//!      container (with the API-token mount the ServiceAccount plugin gave the other
//!      containers, so the apiserver does not call the webhook a second time), volume and
//!      wrapper command.
//!
//! Prints p50/p99 of each and the ratios to "without" (goal: within 1.1x).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Notify;

const REVISION_LABEL: &str = "serving.knative.dev/revision";
const PLACED_LABEL: &str = "kinfer.dev/placed";
/// Same lengths as the two above, so an out-of-scope object has the size of an in-scope one.
const NO_REVISION_LABEL: &str = "bench.kinfer.dev/no-revision";
const NOT_PLACED_LABEL: &str = "bench.dev/notplac";

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
        Variant::Without => NO_REVISION_LABEL,
        _ => REVISION_LABEL,
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

/// A revision's Deployment as Knative makes it (trimmed), at 0 replicas, its Pods labelled
/// `app=<app>`.
fn revision_deployment(name: &str, app: &str) -> Value {
    let labels = json!({ "app": app, REVISION_LABEL: "bench-00001" });
    json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "replicas": 0,
            "selector": { "matchLabels": { "app": app } },
            "template": {
                "metadata": { "labels": labels, "annotations": { "kinfer.dev/handler": "model:predict" } },
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "user-container",
                        "image": "dev.local/model",
                        "ports": [{ "containerPort": 8080 }],
                    }]
                }
            }
        }
    })
}

/// `placed` (a Deployment as the webhook stored it) moved out of every kinfer scope: the
/// revision and placed labels swapped for same-size ones, the app renamed (same length).
fn out_of_scope(placed: &Deployment, name: &str, app: &str) -> anyhow::Result<Value> {
    let mut d = serde_json::to_value(placed)?;
    let swap = |labels: &mut Value| {
        let map = labels.as_object_mut().expect("labels");
        for (from, to) in [
            (REVISION_LABEL, NO_REVISION_LABEL),
            (PLACED_LABEL, NOT_PLACED_LABEL),
        ] {
            if let Some(v) = map.remove(from) {
                map.insert(to.into(), v);
            }
        }
        map.insert("app".into(), json!(app));
    };
    swap(&mut d["metadata"]["labels"]);
    swap(&mut d["spec"]["template"]["metadata"]["labels"]);
    d["spec"]["selector"] = json!({ "matchLabels": { "app": app } });
    d["metadata"] = json!({ "name": name, "labels": d["metadata"]["labels"].clone() });
    d.as_object_mut().unwrap().remove("status");
    Ok(d)
}

fn has_wrapper(spec: Option<&k8s_openapi::api::core::v1::PodSpec>) -> bool {
    spec.and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == "kinfer-wrapper-install"))
}

/// When the watch first saw a Pod at all, scheduled, and Running.
#[derive(Debug, Default, Clone, Copy)]
struct Times {
    seen: Option<Instant>,
    scheduled: Option<Instant>,
    running: Option<Instant>,
}

/// [`Times`] and the `app` label of each Pod the watch has seen, by name.
#[derive(Default)]
struct Seen {
    pods: Mutex<HashMap<String, (String, Times)>>,
    changed: Notify,
}

impl Seen {
    fn record(&self, pod: &Pod) {
        let now = Instant::now();
        let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let app = pod.labels().get("app").cloned().unwrap_or_default();
        let mut pods = self.pods.lock().unwrap();
        let (_, t) = pods
            .entry(pod.name_any())
            .or_insert_with(|| (app, Times::default()));
        t.seen.get_or_insert(now);
        if scheduled {
            t.scheduled.get_or_insert(now);
        }
        if running {
            t.running.get_or_insert(now);
        }
        drop(pods);
        self.changed.notify_waiters();
    }

    fn gone(&self, pod: &Pod) {
        self.pods.lock().unwrap().remove(&pod.name_any());
        self.changed.notify_waiters();
    }

    /// Waits (30 s at most) until `found` finds something in the Pods seen.
    async fn until<T>(
        &self,
        what: &str,
        found: impl Fn(&HashMap<String, (String, Times)>) -> Option<T>,
    ) -> anyhow::Result<T> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if let Some(t) = found(&self.pods.lock().unwrap()) {
                    return t;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .map_err(|_| anyhow::anyhow!("{what}: not after 30 s"))
    }

    /// Waits until `name` is gone.
    async fn deleted(&self, name: &str) -> anyhow::Result<()> {
        self.until(&format!("{name} deleted"), |pods| {
            (!pods.contains_key(name)).then_some(())
        })
        .await
    }

    /// Waits until no Pod labelled `app=<app>` is left.
    async fn none_of(&self, app: &str) -> anyhow::Result<()> {
        self.until(&format!("no Pods of {app}"), |pods| {
            (!pods.values().any(|(a, _)| a == app)).then_some(())
        })
        .await
    }

    /// Waits until `name` is Running; returns its times.
    async fn running(&self, name: &str) -> anyhow::Result<Times> {
        self.until(&format!("{name} Running"), |pods| {
            pods.get(name)
                .map(|(_, t)| *t)
                .filter(|t| t.running.is_some())
        })
        .await
    }

    /// Waits until a Pod labelled `app=<app>` is Running; returns its times.
    async fn app_running(&self, app: &str) -> anyhow::Result<Times> {
        self.until(&format!("a Pod of {app} Running"), |pods| {
            pods.values()
                .find(|(a, t)| a == app && t.running.is_some())
                .map(|(_, t)| *t)
        })
        .await
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints p50/p99 of each row and their ratios to the first row's.
fn report(title: &str, rows: &mut [(&str, Vec<Duration>)]) {
    println!("{title}");
    for (_, t) in rows.iter_mut() {
        t.sort();
    }
    let p = |t: &[Duration], q: f64| ms(percentile(t, q));
    let (base50, base99) = (p(&rows[0].1, 0.5), p(&rows[0].1, 0.99));
    for (i, (label, t)) in rows.iter().enumerate() {
        let ratio = if i == 0 {
            String::new()
        } else {
            format!(
                "  ratio p50 {:.2}x p99 {:.2}x",
                p(t, 0.5) / base50,
                p(t, 0.99) / base99
            )
        };
        println!(
            "  {label:<34}: p50 {:7.2} ms  p99 {:7.2} ms{ratio}",
            p(t, 0.5),
            p(t, 0.99)
        );
    }
}

/// Part 1: revision Pods made by the ReplicaSet controller, with kinfer and without.
async fn revision_pods(
    deployments: &Api<Deployment>,
    seen: &Seen,
    n: usize,
    warmup: usize,
) -> anyhow::Result<()> {
    let placed: Deployment = deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(revision_deployment("rev-with", "rev-with"))?,
        )
        .await?;
    anyhow::ensure!(
        has_wrapper(placed.spec.template.spec.as_ref()),
        "the webhook did not place the revision's Deployment (is kinfer-webhook registered?)"
    );
    let without = out_of_scope(&placed, "rev-wout", "rev-wout")?;
    deployments
        .create(&PostParams::default(), &serde_json::from_value(without)?)
        .await?;
    let apps = ["rev-with", "rev-wout"];
    let mut seen_at: [Vec<Duration>; 2] = Default::default();
    let mut scheduled: [Vec<Duration>; 2] = Default::default();
    let mut running: [Vec<Duration>; 2] = Default::default();
    let scale = |replicas: i32| Patch::Merge(json!({ "spec": { "replicas": replicas } }));
    for i in 0..warmup + n {
        for k in 0..2 {
            let v = (i + k) % 2;
            let start = Instant::now();
            deployments
                .patch(apps[v], &PatchParams::default(), &scale(1))
                .await?;
            let t = seen.app_running(apps[v]).await?;
            if i >= warmup {
                let since = |at: Option<Instant>| at.expect("recorded") - start;
                seen_at[v].push(since(t.seen));
                scheduled[v].push(since(t.scheduled));
                running[v].push(since(t.running));
            }
            deployments
                .patch(apps[v], &PatchParams::default(), &scale(0))
                .await?;
            seen.none_of(apps[v]).await?;
        }
    }
    let labels = ["without kinfer", "with kinfer (template placed)"];
    let rows = |t: [Vec<Duration>; 2]| {
        let [a, b] = t;
        [(labels[0], a), (labels[1], b)]
    };
    println!(
        "1. Revision Pods, {n} per variant: a Deployment scaled 0 -> 1 (the KPA's patch), the Pod made by the ReplicaSet controller"
    );
    report(
        "scale patch until the watch sees the Pod:",
        &mut rows(seen_at),
    );
    report("scale patch until it is scheduled:", &mut rows(scheduled));
    report(
        "scale patch until it is Running (pod startup, no image pull; goal: within 1.1x):",
        &mut rows(running),
    );

    // Part 2: the Deployment create call, once per revision.
    let mut creates: [Vec<Duration>; 2] = Default::default();
    for i in 0..warmup + n {
        for k in 0..2 {
            let v = (i + k) % 2;
            let name = format!("create-{v}-{i}");
            let object = if v == 0 {
                out_of_scope(&placed, &name, "create-wout")?
            } else {
                revision_deployment(&name, "create-with")
            };
            let object: Deployment = serde_json::from_value(object)?;
            let start = Instant::now();
            let created = deployments.create(&PostParams::default(), &object).await?;
            let took = start.elapsed();
            anyhow::ensure!(has_wrapper(created.spec.template.spec.as_ref()));
            if i >= warmup {
                creates[v].push(took);
            }
            deployments
                .delete(&name, &DeleteParams::background())
                .await?;
        }
    }
    println!("2. The revision's Deployment create call (once per revision), {n} per variant");
    report("create call:", &mut rows(creates));
    Ok(())
}

/// Part 3: Pods of an unplaced template, created directly.
async fn direct_pods(pods: &Api<Pod>, seen: &Seen, n: usize, warmup: usize) -> anyhow::Result<()> {
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
            let injected = has_wrapper(created.spec.as_ref());
            anyhow::ensure!(
                injected == (variant == Variant::Patched),
                "{}: patched: {injected}",
                created.name_any()
            );
            if i >= warmup {
                times[v].push(took);
            }
            match seen.running(&name).await {
                Ok(t) if i >= warmup => {
                    scheduled[v].push(t.scheduled.expect("scheduled before Running") - start);
                    running[v].push(t.running.expect("Running") - start);
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
    let labels = [
        "without webhook (out of scope)",
        "webhook called, no patch",
        "webhook patches (handler)",
    ];
    let rows = |t: [Vec<Duration>; 3]| {
        let [a, b, c] = t;
        [(labels[0], a), (labels[1], b), (labels[2], c)]
    };
    println!(
        "3. Pods of an unplaced template (the Pod webhook's fallback), {n} per variant, created directly"
    );
    report("create call (API latency):", &mut rows(times));
    report(
        "create until the watch sees it scheduled:",
        &mut rows(scheduled),
    );
    report(
        "create until the watch sees it Running (pod startup, no image pull):",
        &mut rows(running),
    );
    if missed.iter().any(|&m| m > 0) {
        println!("  not Running within 30 s (left out of the startup rows): {missed:?}");
    }
    Ok(())
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
    // not hold up the timed calls.
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
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    revision_pods(&deployments, &seen, n, warmup).await?;
    direct_pods(&pods, &seen, n, warmup).await?;

    namespaces.delete(&ns, &DeleteParams::background()).await?;
    Ok(())
}
