//! Knative Serving itself runs in the local control plane: Services become Ready through
//! the real controller, webhook and autoscaler, and the KPA scales on stats pushed over its
//! websocket. (`kn` is not served by the Go module proxy, so Services are created as YAML.)

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kinfer_tests::knative::{self, ready};
use kinfer_tests::{client, namespace, pod_ready, pods, poll, wait_for};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn service_becomes_ready_with_queue_proxy_and_the_kpa() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "kn-hello").await?;
    let svc = knative::create_ready(
        &client,
        &ns,
        knative::service("hello", json!({ "test.kinfer.dev/load-time": "2s" })),
    )
    .await?;
    let revision = knative::status_str(&svc, "latestReadyRevisionName").unwrap();
    assert_eq!(revision, "hello-00001");

    let route = knative::routes(&client, &ns).get("hello").await?;
    assert!(ready(&route), "route not Ready: {:?}", route.data["status"]);
    let rev = knative::revisions(&client, &ns).get(&revision).await?;
    assert!(ready(&rev), "revision not Ready: {:?}", rev.data["status"]);

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = deployments.get(&format!("{revision}-deployment")).await?;
    assert_eq!(deployment.status.unwrap().ready_replicas, Some(1));
    let revision_pods = pods(
        &client,
        &ns,
        &format!("serving.knative.dev/revision={revision}"),
    )
    .await?;
    let ready_pods: Vec<_> = revision_pods.iter().filter(|p| pod_ready(p)).collect();
    assert_eq!(ready_pods.len(), 1);
    let containers: Vec<_> = ready_pods[0]
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        containers.contains(&"queue-proxy"),
        "containers: {containers:?}"
    );

    let pa = knative::pod_autoscalers(&client, &ns)
        .get(&revision)
        .await?;
    assert_eq!(
        pa.metadata.annotations.unwrap()["autoscaling.knative.dev/class"],
        "kpa.autoscaling.knative.dev"
    );
    Ok(())
}

#[tokio::test]
async fn kpa_scales_on_stats_pushed_over_its_websocket() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "kn-kpa").await?;
    let target = 10.0;
    let svc = knative::create_ready(
        &client,
        &ns,
        knative::service(
            "load",
            json!({
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "0",
            }),
        ),
    )
    .await?;
    let revision = knative::status_str(&svc, "latestReadyRevisionName").unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = format!("{revision}-deployment");

    // The KPA's formula: ceil(observed concurrency / (target × utilization 0.7)).
    let concurrency = 35.0;
    let expected = (concurrency / (target * 0.7_f64)).ceil() as i32;
    assert_eq!(expected, 5);

    let feeding = knative::feed_kpa(
        knative::autoscaler_url(&client).await?,
        &ns,
        &revision,
        concurrency,
    );
    let first_frame = Instant::now();
    let scaled = wait_for(&deployments, &deployment, Duration::from_secs(60), |d| {
        d.spec.replicas == Some(expected)
    })
    .await;
    let scale_up = first_frame.elapsed();
    if let Err(e) = scaled {
        feeding.cancel();
        return Err(e);
    }
    eprintln!("KPA scaled {revision} to {expected} in {scale_up:?} after the first stat frame");
    // It holds the count while the load lasts: no overshoot.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let replicas = deployments.get(&deployment).await?.spec.replicas;
    assert_eq!(replicas, Some(expected));

    feeding.cancel();
    let stopped = Instant::now();
    wait_for(&deployments, &deployment, Duration::from_secs(180), |d| {
        d.spec.replicas == Some(0)
    })
    .await?;
    eprintln!(
        "KPA scaled {revision} to zero {:?} after the stats stopped",
        stopped.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_new_revision_rolls_out_and_the_old_one_scales_away() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "kn-rollout").await?;
    // min-scale 1 keeps the routed revision up without load; Knative drops it to 0 for a
    // revision no route reaches, so the old one must still scale away.
    let min_one = json!({ "autoscaling.knative.dev/min-scale": "1" });
    knative::create_ready(&client, &ns, knative::service("roll", min_one)).await?;
    let services = knative::services(&client, &ns);
    let patch = json!({ "spec": { "template": { "spec": { "containers": [
        { "image": "dev.local/hello", "env": [{ "name": "VERSION", "value": "2" }] }
    ]}}}});
    services
        .patch("roll", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for(&services, "roll", Duration::from_secs(120), |s| {
        ready(s)
            && knative::status_str(s, "latestReadyRevisionName").as_deref() == Some("roll-00002")
    })
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for(
        &deployments,
        "roll-00001-deployment",
        Duration::from_secs(120),
        |d| d.spec.replicas == Some(0),
    )
    .await?;
    poll(Duration::from_secs(60), || async {
        Ok(
            pods(&client, &ns, "serving.knative.dev/revision=roll-00001")
                .await?
                .is_empty(),
        )
    })
    .await?;
    let new = deployments.get("roll-00002-deployment").await?;
    assert_eq!(new.status.unwrap().ready_replicas, Some(1));
    Ok(())
}

#[tokio::test]
async fn knative_validation_still_rejects_an_invalid_service() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "kn-invalid").await?;
    let mut svc = knative::service("bad", json!({}));
    svc.data["spec"]["template"]["spec"]["containerConcurrency"] = json!(-5);
    let err = knative::services(&client, &ns)
        .create(&PostParams::default(), &svc)
        .await
        .expect_err("Knative's webhook must reject containerConcurrency -5");
    let message = err.to_string();
    assert!(
        message.contains("validation.webhook.serving.knative.dev")
            && message.contains("spec.template.spec.containerConcurrency"),
        "{message}"
    );
    Ok(())
}
