//! The pool controller on the local control plane with Knative: a scale-from-zero through
//! the KPA takes the warm pod (same UID) and is Ready long before a cold pod would have
//! loaded its model; the cold pod the ReplicaSet made goes, the pool refills, and deleting
//! the pool removes its warm pods but not the revision's.
//!
//! Prints the headline numbers: time from the KPA's scale-up decision to the first Ready
//! pod, with the pool and without (load time 20 s).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kinfer_core::warmpool::WarmPool;
use kinfer_tests::knative::{self, ready};
use kinfer_tests::pool::PoolController;
use kinfer_tests::{client, namespace, pod_ready, pods, poll, wait_for};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LOAD_TIME: &str = "20s";

async fn create_service(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<String> {
    create_service_with(client, ns, name, "0").await
}

async fn create_service_with(
    client: &kube::Client,
    ns: &str,
    name: &str,
    min_scale: &str,
) -> anyhow::Result<String> {
    let svc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": { "name": name },
        "spec": { "template": {
            "metadata": { "annotations": {
                "test.kinfer.dev/load-time": LOAD_TIME,
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": min_scale,
            }},
            "spec": { "containers": [{ "image": "dev.local/model" }] }
        }}
    }))?;
    let services = knative::services(client, ns);
    services.create(&PostParams::default(), &svc).await?;
    let svc = wait_for(&services, name, Duration::from_secs(120), ready).await?;
    Ok(knative::status_str(&svc, "latestReadyRevisionName").unwrap())
}

fn warm_pool(name: &str, configuration: &str, min_ready: i32) -> WarmPool {
    serde_json::from_value(json!({
        "apiVersion": "kinfer.dev/v1alpha1",
        "kind": "WarmPool",
        "metadata": { "name": name },
        "spec": { "configurationRef": { "name": configuration }, "minReady": min_ready }
    }))
    .unwrap()
}

fn live(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
}

async fn revision_pods(
    client: &kube::Client,
    ns: &str,
    revision: &str,
) -> anyhow::Result<Vec<Pod>> {
    Ok(pods(
        client,
        ns,
        &format!("serving.knative.dev/revision={revision},serving.knative.dev/revisionUID"),
    )
    .await?
    .into_iter()
    .filter(live)
    .collect())
}

async fn wait_scaled_to_zero(
    client: &kube::Client,
    ns: &str,
    revision: &str,
) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for(
        &deployments,
        &format!("{revision}-deployment"),
        Duration::from_secs(240),
        |d| d.spec.replicas == Some(0),
    )
    .await?;
    poll(Duration::from_secs(60), || async {
        Ok(revision_pods(client, ns, revision).await?.is_empty())
    })
    .await?;
    Ok(())
}

/// Scales the revision from zero through the KPA; returns the time from the scale-up
/// decision (the Deployment asks for a replica) to the first Ready revision pod, and that pod.
async fn scale_from_zero(
    client: &kube::Client,
    ns: &str,
    revision: &str,
) -> anyhow::Result<(Duration, Pod, CancellationToken)> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment = format!("{revision}-deployment");
    let feeding = knative::feed_kpa(knative::autoscaler_url(client).await?, ns, revision, 5.0);
    let start = Instant::now();
    let decided = loop {
        let d = deployments.get(&deployment).await?;
        if d.spec.replicas.unwrap_or(0) >= 1 {
            break Instant::now();
        }
        if start.elapsed() > Duration::from_secs(60) {
            feeding.cancel();
            anyhow::bail!("the KPA did not scale {revision} up within 60s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    loop {
        let ready: Vec<Pod> = revision_pods(client, ns, revision)
            .await?
            .into_iter()
            .filter(pod_ready)
            .collect();
        if let Some(pod) = ready.into_iter().next() {
            return Ok((decided.elapsed(), pod, feeding));
        }
        if decided.elapsed() > Duration::from_secs(120) {
            feeding.cancel();
            anyhow::bail!("no Ready pod of {revision} within 120s of the scale-up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn scale_from_zero_takes_the_warm_pod_then_the_pool_refills() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "pool-warm").await?;
    let controller = PoolController::start(&ns).await?;
    let revision = create_service(&client, &ns, "model").await?;
    let pools: Api<WarmPool> = Api::namespaced(client.clone(), &ns);
    pools
        .create(&PostParams::default(), &warm_pool("model", "model", 1))
        .await?;

    // The pool warms a pod of the revision while the KPA scales the revision to zero.
    let warmed = wait_for(&pools, "model", Duration::from_secs(120), |p| {
        p.status.as_ref().is_some_and(|s| {
            s.ready_replicas == Some(1) && s.revision.as_deref() == Some(revision.as_str())
        })
    })
    .await?;
    assert_eq!(warmed.status.as_ref().unwrap().desired_replicas, Some(1));
    wait_scaled_to_zero(&client, &ns, &revision).await?;
    let warm = pods(
        &client,
        &ns,
        "kinfer.dev/warmpool=model,kinfer.dev/pool-state=warm",
    )
    .await?;
    assert_eq!(warm.len(), 1, "one warm pod");
    let warm_uid = warm[0].metadata.uid.clone().unwrap();
    assert!(
        !pod_ready(&warm[0]),
        "a warm pod takes no traffic before its handoff"
    );
    let warm_labels = warm[0].metadata.labels.clone().unwrap();
    assert!(!warm_labels.contains_key("serving.knative.dev/revisionUID"));
    assert!(
        warm[0]
            .metadata
            .owner_references
            .as_ref()
            .unwrap()
            .iter()
            .all(|o| o.controller != Some(true))
    );

    // Warm: scale from zero through the KPA.
    let (warm_time, pod, feeding) = scale_from_zero(&client, &ns, &revision).await?;
    assert_eq!(
        pod.metadata.uid.as_deref(),
        Some(warm_uid.as_str()),
        "the Ready pod is the warm one"
    );
    let owner = &pod.metadata.owner_references.as_ref();
    // Exactly the desired number of pods remain: the cold pod the ReplicaSet made goes.
    poll(Duration::from_secs(30), || async {
        let p = revision_pods(&client, &ns, &revision).await?;
        Ok(p.len() == 1
            && p[0]
                .metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|o| o.kind == "ReplicaSet")))
    })
    .await?;
    let adopted = revision_pods(&client, &ns, &revision).await?;
    assert_eq!(
        adopted[0].metadata.uid.as_deref(),
        Some(warm_uid.as_str()),
        "owner before: {owner:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        revision_pods(&client, &ns, &revision).await?.len(),
        1,
        "the count holds"
    );
    // The pool refills.
    let refilled = wait_for(&pools, "model", Duration::from_secs(90), |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.ready_replicas == Some(1) && s.handoffs == Some(1))
    })
    .await?;
    assert_eq!(refilled.status.unwrap().misses, Some(0));
    let metrics = controller.metrics().await?;
    assert!(
        metrics.contains("kinfer_pool_controller_handoffs_total{namespace="),
        "{metrics}"
    );

    // Cold: the same scale-from-zero without a pool.
    feeding.cancel();
    wait_scaled_to_zero(&client, &ns, &revision).await?;
    pools.delete("model", &DeleteParams::default()).await?;
    poll(Duration::from_secs(60), || async {
        Ok(pods(&client, &ns, "kinfer.dev/pool-state=warm")
            .await?
            .iter()
            .all(|p| !live(p)))
    })
    .await?;
    let (cold_time, _, feeding) = scale_from_zero(&client, &ns, &revision).await?;
    feeding.cancel();

    eprintln!(
        "time to Ready after the scale-up decision, load time {LOAD_TIME}: warm pool {warm_time:?}, cold {cold_time:?}, {:.0}x faster",
        cold_time.as_secs_f64() / warm_time.as_secs_f64()
    );
    assert!(
        cold_time >= Duration::from_secs(15),
        "cold start must wait for the load: {cold_time:?}"
    );
    assert!(
        warm_time < cold_time / 2,
        "warm {warm_time:?} vs cold {cold_time:?}"
    );
    Ok(())
}

fn pod_uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

async fn warm_pods(client: &kube::Client, ns: &str, pool: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(pods(
        client,
        ns,
        &format!("kinfer.dev/warmpool={pool},kinfer.dev/pool-state=warm"),
    )
    .await?
    .into_iter()
    .filter(live)
    .collect())
}

async fn wait_pool(
    pools: &Api<WarmPool>,
    name: &str,
    cond: impl Fn(&kinfer_core::warmpool::WarmPoolStatus) -> bool,
) -> anyhow::Result<WarmPool> {
    wait_for(pools, name, Duration::from_secs(120), |p| {
        p.status.as_ref().is_some_and(&cond)
    })
    .await
}

/// No pod is half handed off: a pool pod is either warm (no revision selector labels, owned
/// by the pool) or handed off (every selector label, no pool owner).
fn assert_no_half_handoffs(all: &[Pod]) {
    for p in all.iter().filter(|p| live(p)) {
        let labels = p.metadata.labels.clone().unwrap_or_default();
        let owners = p.metadata.owner_references.clone().unwrap_or_default();
        match labels.get("kinfer.dev/pool-state").map(String::as_str) {
            Some("warm") => {
                assert!(
                    !labels.contains_key("serving.knative.dev/revisionUID"),
                    "{labels:?}"
                );
                assert!(!labels.contains_key("pod-template-hash"), "{labels:?}");
                assert!(owners.iter().any(|o| o.kind == "WarmPool"), "{owners:?}");
            }
            Some("handed-off") => {
                assert!(
                    labels.contains_key("serving.knative.dev/revisionUID"),
                    "{labels:?}"
                );
                assert!(labels.contains_key("pod-template-hash"), "{labels:?}");
                assert!(!owners.iter().any(|o| o.kind == "WarmPool"), "{owners:?}");
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn scale_one_to_four_with_a_pool_of_two_takes_two_warm_pods() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "pool-burst").await?;
    let _controller = PoolController::start(&ns).await?;
    let revision = create_service(&client, &ns, "burst").await?;
    // Hold the revision at one pod (concurrency 5, target 10 × 0.7).
    let url = knative::autoscaler_url(&client).await?;
    let one = knative::feed_kpa(url.clone(), &ns, &revision, 5.0);
    let pools: Api<WarmPool> = Api::namespaced(client.clone(), &ns);
    pools
        .create(&PostParams::default(), &warm_pool("burst", "burst", 2))
        .await?;
    wait_pool(&pools, "burst", |s| s.ready_replicas == Some(2)).await?;
    let warm: Vec<String> = warm_pods(&client, &ns, "burst")
        .await?
        .iter()
        .map(pod_uid)
        .collect();
    assert_eq!(warm.len(), 2);
    assert_eq!(revision_pods(&client, &ns, &revision).await?.len(), 1);

    // Concurrency 28 → ceil(28 / 7) = 4 pods.
    one.cancel();
    let four = knative::feed_kpa(url, &ns, &revision, 28.0);
    // Two warm pods serve at once; the third new pod starts cold.
    poll(Duration::from_secs(60), || async {
        let ready: Vec<String> = revision_pods(&client, &ns, &revision)
            .await?
            .iter()
            .filter(|p| pod_ready(p))
            .map(pod_uid)
            .collect();
        Ok(ready.len() >= 3 && warm.iter().all(|w| ready.contains(w)))
    })
    .await?;
    // The counts settle exactly: four revision pods, all Ready once the cold one loads.
    poll(Duration::from_secs(90), || async {
        let p = revision_pods(&client, &ns, &revision).await?;
        Ok(p.len() == 4 && p.iter().all(pod_ready))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(revision_pods(&client, &ns, &revision).await?.len(), 4);
    let status = wait_pool(&pools, "burst", |s| s.ready_replicas == Some(2))
        .await?
        .status
        .unwrap();
    assert_eq!(status.handoffs, Some(2));
    // The KPA may reach 4 in steps; a pass cut off before its status write recounts its
    // scale-up, so misses are at least the one cold pod (see the README).
    assert!(
        status.misses.is_some_and(|m| m >= 1),
        "one of the three new pods started cold: {status:?}"
    );
    assert_no_half_handoffs(&pods(&client, &ns, "kinfer.dev/warmpool").await?);
    four.cancel();
    Ok(())
}

#[tokio::test]
async fn a_new_revision_moves_the_pool_and_deleting_the_pool_leaves_revision_pods()
-> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "pool-rollout").await?;
    let _controller = PoolController::start(&ns).await?;
    let first = create_service_with(&client, &ns, "roll", "1").await?;
    let pools: Api<WarmPool> = Api::namespaced(client.clone(), &ns);
    pools
        .create(&PostParams::default(), &warm_pool("roll", "roll", 1))
        .await?;
    wait_pool(&pools, "roll", |s| {
        s.ready_replicas == Some(1) && s.revision.as_deref() == Some(first.as_str())
    })
    .await?;
    let old_warm = pod_uid(&warm_pods(&client, &ns, "roll").await?[0]);

    let services = knative::services(&client, &ns);
    let patch = json!({ "spec": { "template": { "spec": { "containers": [
        { "image": "dev.local/model", "env": [{ "name": "VERSION", "value": "2" }] }
    ]}}}});
    services
        .patch(
            "roll",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    let second = format!("{}-00002", "roll");
    let moved = wait_pool(&pools, "roll", |s| {
        s.ready_replicas == Some(1) && s.revision.as_deref() == Some(second.as_str())
    })
    .await?;
    assert_ne!(moved.status.unwrap().pod_template_hash, None);
    let warm = warm_pods(&client, &ns, "roll").await?;
    assert_eq!(warm.len(), 1);
    assert_ne!(
        pod_uid(&warm[0]),
        old_warm,
        "the old revision's warm pod went"
    );
    assert_eq!(
        warm[0].metadata.labels.as_ref().unwrap()["serving.knative.dev/revision"],
        second
    );

    let serving = revision_pods(&client, &ns, &second).await?;
    assert!(!serving.is_empty());
    pools.delete("roll", &DeleteParams::default()).await?;
    poll(Duration::from_secs(60), || async {
        Ok(pods(&client, &ns, "kinfer.dev/warmpool")
            .await?
            .iter()
            .all(|p| !live(p)))
    })
    .await?;
    let after = revision_pods(&client, &ns, &second).await?;
    assert_eq!(
        after.iter().map(pod_uid).collect::<Vec<_>>(),
        serving.iter().map(pod_uid).collect::<Vec<_>>(),
        "the revision's pods stay"
    );
    Ok(())
}

/// Kills the controller right after each step of a handoff; after a restart the adopted pod
/// is the warm one, no pod is half handed off or handed off twice, the counts settle and the
/// pool refills. Deleting the pool then leaves the handed-off pod with its revision.
#[tokio::test]
async fn a_controller_killed_between_handoff_steps_recovers() -> anyhow::Result<()> {
    let client = client().await?;
    for step in ["handoff", "gate", "create"] {
        let ns = namespace(&client, &format!("pool-crash-{step}")).await?;
        let controller = PoolController::start(&ns).await?;
        let revision = create_service(&client, &ns, "crash").await?;
        let pools: Api<WarmPool> = Api::namespaced(client.clone(), &ns);
        pools
            .create(&PostParams::default(), &warm_pool("crash", "crash", 1))
            .await?;
        wait_pool(&pools, "crash", |s| s.ready_replicas == Some(1)).await?;
        wait_scaled_to_zero(&client, &ns, &revision).await?;
        let warm = pod_uid(&warm_pods(&client, &ns, "crash").await?[0]);
        controller.kill().await?;
        let crashing =
            PoolController::start_with_env(&ns, &[("KINFER_POOL_CRASH_AFTER", step)]).await?;

        let feeding =
            knative::feed_kpa(knative::autoscaler_url(&client).await?, &ns, &revision, 5.0);
        crashing
            .wait_exit(Duration::from_secs(60))
            .await
            .map_err(|e| e.context(format!("crash point {step}")))?;
        assert_no_half_handoffs(&pods(&client, &ns, "kinfer.dev/warmpool").await?);
        let _controller = PoolController::start(&ns).await?;

        // The warm pod serves; exactly one revision pod; the pool refills.
        poll(Duration::from_secs(60), || async {
            let p = revision_pods(&client, &ns, &revision).await?;
            Ok(p.len() == 1 && pod_uid(&p[0]) == warm && pod_ready(&p[0]))
        })
        .await
        .map_err(|e| e.context(format!("after a crash at {step}")))?;
        // A status written after the restart (the one before the crash also says one loaded
        // warm pod, but had not seen the revision scale up yet).
        wait_pool(&pools, "crash", |s| {
            s.ready_replicas == Some(1) && s.observed_revision_replicas == Some(1)
        })
        .await?;
        let all = pods(&client, &ns, "kinfer.dev/warmpool").await?;
        assert_no_half_handoffs(&all);
        let warm_now = warm_pods(&client, &ns, "crash").await?;
        assert_eq!(warm_now.len(), 1, "{step}: refilled exactly once");
        assert_ne!(pod_uid(&warm_now[0]), warm);

        pools.delete("crash", &DeleteParams::default()).await?;
        poll(Duration::from_secs(60), || async {
            Ok(warm_pods(&client, &ns, "crash").await?.is_empty())
        })
        .await?;
        let p = revision_pods(&client, &ns, &revision).await?;
        assert_eq!(
            p.iter().map(pod_uid).collect::<Vec<_>>(),
            vec![warm.clone()],
            "{step}: the handed-off pod stays"
        );
        feeding.cancel();
        eprintln!("crash after {step}: recovered");
    }
    Ok(())
}
