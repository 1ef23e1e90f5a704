//! The pool controller on the local control plane with Knative: a scale-from-zero through
//! the KPA takes the warm pod (same UID) and is Ready long before a cold pod would have
//! loaded its model; the cold pod the ReplicaSet made goes, the pool refills, and deleting
//! the pool removes its warm pods but not the revision's.
//!
//! Prints the headline numbers: time from the KPA's scale-up decision to the first Ready
//! pod, with the pool and without (load time 20 s).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Endpoints, Pod};
use kinfer_core::kpa::{StatSender, WireStatMessage, WireStatMessages};
use kinfer_core::warmpool::WarmPool;
use kinfer_tests::knative::{self, ready};
use kinfer_tests::pool::PoolController;
use kinfer_tests::{client, namespace, pod_ready, pods, poll, wait_for};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LOAD_TIME: &str = "20s";

async fn autoscaler_url(client: &kube::Client) -> anyhow::Result<String> {
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "knative-serving");
    let ep = endpoints.get("autoscaler").await?;
    let subset = &ep.subsets.unwrap()[0];
    let ip = &subset.addresses.as_ref().unwrap()[0].ip;
    let port = subset.ports.as_ref().unwrap()[0].port;
    Ok(format!("ws://{ip}:{port}"))
}

async fn create_service(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<String> {
    let svc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": { "name": name },
        "spec": { "template": {
            "metadata": { "annotations": {
                "test.kinfer.dev/load-time": LOAD_TIME,
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "0",
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

/// Feeds the KPA `concurrency` for `revision` once a second until the token is cancelled.
fn feed(url: String, ns: &str, revision: &str, concurrency: f64) -> CancellationToken {
    let stop = CancellationToken::new();
    let sender = StatSender::spawn(url, stop.clone(), None);
    let (ns, revision, token) = (ns.to_string(), revision.to_string(), stop.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !token.is_cancelled() {
            tick.tick().await;
            sender.send(WireStatMessages {
                messages: vec![WireStatMessage::concurrency(
                    &ns,
                    &revision,
                    "kinfer-test",
                    concurrency,
                )],
            });
        }
    });
    stop
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
    let feeding = feed(autoscaler_url(client).await?, ns, revision, 5.0);
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
