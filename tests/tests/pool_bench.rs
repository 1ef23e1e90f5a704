//! Benchmark 1 of the pool controller (ignored by default; it takes a few minutes):
//!
//!   hack/with-cluster cargo test -p kinfer-tests --test pool_bench -- --ignored --nocapture
//!
//! Time from the KPA's scale-up decision (the Deployment asks for more replicas) to the first
//! new Ready pod, 0→1 and 1→4, with a warm pool and without, model load time 20 s. Each trial
//! is its own Knative Service in its own namespace; trials are set up at once, the warm
//! trials' scale-ups then run one at a time (so they time the handoff, not a control plane
//! busy with forty scale-ups) while the cold ones run together; times are taken from watch
//! events as they arrive here. `KINFER_POOL_BENCH_TRIALS` sets the trials per case
//! (default 10). Prints each trial (with the wall-clock time its pod turned Ready, to read
//! against the controller's log: `handed off … sent_ms/pass_ms`, `opened the served gate`),
//! then p50/p95 per case and the cold/warm ratio.

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

async fn trial(
    serial: std::sync::Arc<tokio::sync::Mutex<()>>,
    client: kube::Client,
    url: String,
    case: Case,
    warm: bool,
    i: usize,
) -> anyhow::Result<Duration> {
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
    let (pool_size, from, to, load) = match case {
        Case::FromZero => (1, 0, 1, 0.0),
        Case::OneToFour => (2, 1, 4, 28.0),
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

    let _turn = if warm {
        Some(serial.lock().await)
    } else {
        None
    };
    // Watch first, then ask for the scale-up.
    let mut deploy_events = watcher(
        deployments.clone(),
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
            if d.spec.replicas.unwrap_or(0) >= to {
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
    let _ = client; // namespaces are left for post-mortems; the cluster is torn down after
    Ok(elapsed)
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
        .unwrap_or(10);
    let client = client().await?;
    let lease_ns = namespace(&client, "bench-pool-controller").await?;
    let _controller = PoolController::start_cluster_wide(&lease_ns).await?;
    let url = knative::autoscaler_url(&client).await?;
    let serial = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let mut runs = Vec::new();
    for case in [Case::FromZero, Case::OneToFour] {
        for warm in [true, false] {
            for i in 0..trials {
                let (client, url, serial) = (client.clone(), url.clone(), serial.clone());
                runs.push(
                    async move { (case, warm, trial(serial, client, url, case, warm, i).await) },
                );
            }
        }
    }
    let results = futures::future::join_all(runs).await;
    let mut summary = Vec::new();
    for case in [Case::FromZero, Case::OneToFour] {
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
        eprintln!(
            "{case:?}: cold p95 / warm p95 = {:.0}x",
            p95[1].as_secs_f64() / p95[0].as_secs_f64()
        );
        assert!(
            p95[0] < p95[1] / 2,
            "{case:?}: warm {:?} vs cold {:?}",
            p95[0],
            p95[1]
        );
    }
    Ok(())
}
