//! Benchmark 1 of the pool controller (ignored by default; it takes a few minutes):
//!
//!   hack/with-cluster cargo test -p kinfer-tests --test pool_bench -- --ignored --nocapture
//!
//! Time from the KPA's scale-up decision (the Deployment first asks for more replicas than it
//! had: the KPA may reach 4 in steps, and timing from the last step would count a pod that
//! the first step brought as Ready almost at once) to the first new Ready pod, 0→1 and 1→4,
//! with a warm pool and without, model load time 20 s. Each trial is its own Knative Service
//! in its own namespace; times are taken from watch events as they arrive here. `KINFER_POOL_BENCH_TRIALS` sets the trials per case (default 20, so that p95
//! is the second slowest of 20 rather than simply the slowest of 10).
//!
//! How trials are scheduled, and why: every trial is first set up at once (Service, pool,
//! settled at its starting size with every pod Ready). Then the warm trials' scale-ups run
//! one at a time, with 2 s after each for its aftermath (the ReplicaSet deleting its surplus
//! cold pod, the pool creating its refill) to land; then the cold trials' scale-ups run all
//! at once. The goal is the latency of a handoff, which is a few API writes: measured while
//! twenty cold pods turn Ready in the same instant, or while other trials scale up, it would
//! time the control plane's queue under a surge that the benchmark itself makes. The cold
//! trials wait 20 s for the model each, so running them together changes them little, and
//! running them after the warm ones keeps their surge (and their later scale-downs) out of
//! every warm trial. The load average is printed at each phase.
//!
//! Prints each trial (with the wall-clock time its pod turned Ready, to read against the
//! controller's log: `handed off … sent_ms/pass_ms`, `opened the served gate`), then p50/p95
//! per case, the cold/warm ratio and whether the goal (warm p95 under 500 ms and at least 40
//! times faster than cold) holds.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kinfer_core::warmpool::WarmPool;
use kinfer_tests::knative::{self, ready};
use kinfer_tests::pool::PoolController;
use kinfer_tests::{client, namespace, pod_ready, pods, wait_for};
use kube::api::{Api, DynamicObject, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

#[derive(Clone, Copy, Debug)]
enum Case {
    FromZero,
    OneToFour,
}

/// Polls every second (forty trials polling faster would load the control plane).
async fn settle<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    while !check().await? {
        anyhow::ensure!(start.elapsed() < timeout, "not settled within {timeout:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// A trial set up and settled at its starting size, waiting for its scale-up.
struct Trial {
    client: kube::Client,
    url: String,
    tag: String,
    ns: String,
    revision: String,
    deployment: String,
    selector: String,
    /// Replicas before the scale-up.
    from: i32,
    load: f64,
    /// The 1→4 case's load that holds the revision at one pod until the scale-up.
    hold: Option<tokio_util::sync::CancellationToken>,
    /// The pods that were there before the scale-up.
    before: BTreeSet<String>,
}

async fn set_up(
    client: kube::Client,
    url: String,
    case: Case,
    warm: bool,
    i: usize,
) -> anyhow::Result<Trial> {
    let tag = format!(
        "bench-{}-{}-{i}",
        match case {
            Case::FromZero => "zero",
            Case::OneToFour => "four",
        },
        if warm { "warm" } else { "cold" }
    );
    let ns = namespace(&client, &tag).await?;
    let svc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": { "name": "m" },
        "spec": { "template": {
            "metadata": { "annotations": {
                "test.kinfer.dev/load-time": "20s",
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "0",
            }},
            "spec": { "containers": [{ "image": "dev.local/model" }] }
        }}
    }))?;
    let services = knative::services(&client, &ns);
    services.create(&PostParams::default(), &svc).await?;
    let svc = wait_for(&services, "m", Duration::from_secs(300), ready).await?;
    let revision = knative::status_str(&svc, "latestReadyRevisionName").unwrap();
    let pools: Api<WarmPool> = Api::namespaced(client.clone(), &ns);
    // 1→4: a concurrency of 28 at target 10 (70% utilisation: 7 a pod) asks for 4 pods.
    let (pool_size, from, load) = match case {
        Case::FromZero => (1, 0, 0.0),
        Case::OneToFour => (2, 1, 28.0),
    };
    let hold = match case {
        Case::OneToFour => Some(knative::feed_kpa(url.clone(), &ns, &revision, 5.0)),
        Case::FromZero => None,
    };
    if warm {
        let pool: WarmPool = serde_json::from_value(json!({
            "apiVersion": "kinfer.dev/v1alpha1", "kind": "WarmPool",
            "metadata": { "name": "m" },
            "spec": { "configurationRef": { "name": "m" }, "minReady": pool_size }
        }))?;
        pools.create(&PostParams::default(), &pool).await?;
        wait_for(&pools, "m", Duration::from_secs(300), |p| {
            p.status.as_ref().and_then(|s| s.ready_replicas) == Some(pool_size)
        })
        .await?;
    }
    let selector =
        format!("serving.knative.dev/revision={revision},serving.knative.dev/revisionUID");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = format!("{revision}-deployment");
    // Settle at the starting size with every pod Ready.
    settle(Duration::from_secs(300), || async {
        let d = deployments.get(&deployment).await?;
        let p = pods(&client, &ns, &selector).await?;
        Ok(d.spec.replicas == Some(from) && p.len() == from as usize && p.iter().all(pod_ready))
    })
    .await?;
    let before: BTreeSet<String> = pods(&client, &ns, &selector)
        .await?
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    Ok(Trial {
        client,
        url,
        tag,
        ns,
        revision,
        deployment,
        selector,
        from,
        load,
        hold,
        before,
    })
}

/// Scales the trial up and times it: from the Deployment's first step up from the starting
/// size (as its watch delivers it) to the first new Ready pod (as the pod watch delivers it).
async fn measure(trial: Trial) -> anyhow::Result<Duration> {
    let Trial {
        client,
        url,
        tag,
        ns,
        revision,
        deployment,
        selector,
        from,
        load,
        hold,
        before,
    } = trial;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // Watch first, then ask for the scale-up.
    let mut deploy_events = watcher(
        deployments,
        watcher::Config::default().fields(&format!("metadata.name={deployment}")),
    )
    .applied_objects()
    .boxed();
    let mut pod_events = watcher(
        Api::<Pod>::namespaced(client.clone(), &ns),
        watcher::Config::default().labels(&selector),
    )
    .applied_objects()
    .boxed();
    if let Some(h) = hold {
        h.cancel();
    }
    let feeding = knative::feed_kpa(url, &ns, &revision, if load > 0.0 { load } else { 5.0 });
    let result = tokio::time::timeout(Duration::from_secs(120), async {
        let decided = loop {
            let d = deploy_events.try_next().await?.expect("watch ended");
            // The KPA's first step up (it may reach 4 in steps; the first step is the
            // decision that makes the revision wait for a new pod).
            if d.spec.replicas.unwrap_or(0) > from {
                break Instant::now();
            }
        };
        loop {
            let p: Pod = pod_events.try_next().await?.expect("watch ended");
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if pod_ready(&p) && !before.contains(&uid) && p.metadata.deletion_timestamp.is_none() {
                return anyhow::Ok(decided.elapsed());
            }
        }
    })
    .await;
    feeding.cancel();
    let elapsed = result.map_err(|_| anyhow::anyhow!("{tag}: no new Ready pod within 120 s"))??;
    // With the wall-clock time, to read against the controller's log.
    eprintln!(
        "{tag} ({ns}): {elapsed:?}, Ready at {}",
        k8s_openapi::jiff::Timestamp::now()
    );
    // Namespaces are left for post-mortems; the cluster is torn down after.
    Ok(elapsed)
}

/// The load average, to print with the results.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test]
#[ignore = "benchmark: several minutes on the local control plane"]
async fn bench_time_to_ready_with_and_without_the_pool() -> anyhow::Result<()> {
    let trials: usize = std::env::var("KINFER_POOL_BENCH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(20);
    let client = client().await?;
    let lease_ns = namespace(&client, "bench-pool-controller").await?;
    let _controller = PoolController::start_cluster_wide(&lease_ns).await?;
    let url = knative::autoscaler_url(&client).await?;
    let cases = [Case::FromZero, Case::OneToFour];
    // 1. Set every trial up at once and let it settle.
    let mut setups = Vec::new();
    for case in cases {
        for warm in [true, false] {
            for i in 0..trials {
                let (client, url) = (client.clone(), url.clone());
                setups.push(async move { (case, warm, set_up(client, url, case, warm, i).await) });
            }
        }
    }
    let mut ready = Vec::new();
    let mut results = Vec::new();
    for (case, warm, r) in futures::future::join_all(setups).await {
        match r {
            Ok(t) => ready.push((case, warm, t)),
            Err(e) => results.push((case, warm, Err(e.context("setting up")))),
        }
    }
    let (warm_trials, cold_trials): (Vec<_>, Vec<_>) =
        ready.into_iter().partition(|(_, warm, _)| *warm);
    // 2. The warm trials, one at a time, with a pause after each for its aftermath (the
    // ReplicaSet deleting its surplus cold pod, the pool's refill pods) to land.
    eprintln!(
        "warm trials, one at a time (load average {})",
        load_average()
    );
    for (case, warm, t) in warm_trials {
        results.push((case, warm, measure(t).await));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // 3. The cold trials, all at once.
    eprintln!("cold trials, all at once (load average {})", load_average());
    let cold = cold_trials
        .into_iter()
        .map(|(case, warm, t)| async move { (case, warm, measure(t).await) });
    results.extend(futures::future::join_all(cold).await);
    eprintln!("done (load average {})", load_average());
    let mut summary = Vec::new();
    for case in cases {
        let mut p95 = [Duration::ZERO; 2];
        for (k, warm) in [true, false].into_iter().enumerate() {
            let mut times: Vec<Duration> = Vec::new();
            for (c, w, r) in &results {
                if matches!(
                    (c, case),
                    (Case::FromZero, Case::FromZero) | (Case::OneToFour, Case::OneToFour)
                ) && *w == warm
                {
                    match r {
                        Ok(t) => times.push(*t),
                        Err(e) => eprintln!("trial failed: {e:#}"),
                    }
                }
            }
            times.sort();
            anyhow::ensure!(
                !times.is_empty(),
                "{case:?} warm={warm}: every trial failed"
            );
            p95[k] = percentile(&times, 0.95);
            let line = format!(
                "{case:?} {}: n={} p50={:?} p95={:?} min={:?} max={:?}",
                if warm { "warm pool" } else { "cold     " },
                times.len(),
                percentile(&times, 0.5),
                p95[k],
                times[0],
                times[times.len() - 1]
            );
            eprintln!("{line}");
            summary.push(line);
        }
        let ratio = p95[1].as_secs_f64() / p95[0].as_secs_f64();
        let goal = p95[0] < Duration::from_millis(500) && ratio >= 40.0;
        let line = format!(
            "{case:?}: cold p95 / warm p95 = {ratio:.0}x; goal (warm p95 < 500 ms, >= 40x) {}",
            if goal { "met" } else { "NOT met" }
        );
        eprintln!("{line}");
        summary.push(line);
        assert!(
            p95[0] < p95[1] / 2,
            "{case:?}: warm {:?} vs cold {:?}",
            p95[0],
            p95[1]
        );
    }
    eprintln!("\nsummary (load average {}):", load_average());
    for line in &summary {
        eprintln!("  {line}");
    }
    Ok(())
}
