//! The local control plane is real Kubernetes: real version, real controllers and
//! scheduler, and pods that take their model-load time to become Ready.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kinfer_tests::{
    client, namespace, pod_condition, pod_ready, pods, poll, unschedulable_message, wait_for,
};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

fn deployment(name: &str, load_time: Option<&str>) -> Deployment {
    let annotations = match load_time {
        Some(t) => json!({ "test.kinfer.dev/load-time": t }),
        None => json!({}),
    };
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name }, "annotations": annotations },
                "spec": { "containers": [{ "name": "model", "image": "dev.local/model" }] }
            }
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn server_reports_kubernetes_1_37() -> anyhow::Result<()> {
    let client = client().await?;
    let version = client.apiserver_version().await?;
    assert_eq!(version.major, "1");
    assert_eq!(version.minor, "37");
    assert!(
        version.git_version.starts_with("v1.37."),
        "git version {}",
        version.git_version
    );
    Ok(())
}

#[tokio::test]
async fn pod_turns_ready_only_after_its_load_time() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "load-time").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let start = Instant::now();
    deployments
        .create(&PostParams::default(), &deployment("slow", Some("6s")))
        .await?;

    // It starts running at once but is not Ready while the "model" loads.
    let mut running_at = None;
    let ready_after = loop {
        if let Some(pod) = pods(&client, &ns, "app=slow").await?.pop() {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if pod_ready(&pod) {
                break start.elapsed();
            }
            if running && running_at.is_none() {
                running_at = Some(start.elapsed());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "not Ready after 40s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let running_at = running_at.expect("the pod was seen Running and not Ready first");
    assert!(
        running_at < Duration::from_secs(4),
        "Running only after {running_at:?}"
    );
    assert!(
        ready_after >= Duration::from_secs(6),
        "Ready after {ready_after:?}, before its 6s load time"
    );
    assert!(
        ready_after < Duration::from_secs(16),
        "Ready only after {ready_after:?}"
    );

    // Without the annotation a pod is Ready at once.
    deployments
        .create(&PostParams::default(), &deployment("fast", None))
        .await?;
    let fast = poll(Duration::from_secs(20), || async {
        Ok(pods(&client, &ns, "app=fast").await?.iter().any(pod_ready))
    })
    .await?;
    assert!(
        fast < Duration::from_secs(5),
        "fast pod Ready after {fast:?}"
    );
    Ok(())
}

#[tokio::test]
async fn replicaset_controller_replaces_a_deleted_pod() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "replace").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &deployment("web", None))
        .await?;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    poll(Duration::from_secs(30), || async {
        Ok(pods(&client, &ns, "app=web").await?.iter().any(pod_ready))
    })
    .await?;
    let first = pods(&client, &ns, "app=web").await?.remove(0);
    let first_name = first.metadata.name.clone().unwrap();
    pod_api
        .delete(&first_name, &DeleteParams::default())
        .await?;

    poll(Duration::from_secs(30), || async {
        let now = pods(&client, &ns, "app=web").await?;
        Ok(now.len() == 1
            && now[0].metadata.name.as_deref() != Some(first_name.as_str())
            && pod_ready(&now[0]))
    })
    .await?;
    // The deleted pod finished terminating (no kubelet: KWOK's delete stage did it).
    assert!(pod_api.get_opt(&first_name).await?.is_none());
    Ok(())
}

fn gpu_pod(name: &str, tolerate: bool, node_selector: serde_json::Value) -> Pod {
    let tolerations = if tolerate {
        json!([{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }])
    } else {
        json!([])
    };
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "tolerations": tolerations,
            "nodeSelector": node_selector,
            "containers": [{
                "name": "model",
                "image": "dev.local/model",
                "resources": { "limits": { "nvidia.com/gpu": "1" } }
            }]
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn gpu_pod_needs_the_gpu_toleration() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "gpu-taint").await?;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Kept off the 24 GB node, whose capacity another test counts.
    let big_gpu = json!({ "nvidia.com/gpu.memory": "81920" });

    pod_api
        .create(
            &PostParams::default(),
            &gpu_pod("untolerated", false, json!({})),
        )
        .await?;
    let pending = wait_for(&pod_api, "untolerated", Duration::from_secs(30), |p| {
        unschedulable_message(p).is_some()
    })
    .await?;
    let message = unschedulable_message(&pending).unwrap();
    assert!(
        message.contains("untolerated taint") && message.contains("nvidia.com/gpu"),
        "scheduler message: {message}"
    );

    pod_api
        .create(&PostParams::default(), &gpu_pod("tolerated", true, big_gpu))
        .await?;
    let placed = wait_for(&pod_api, "tolerated", Duration::from_secs(30), pod_ready).await?;
    let node = placed.spec.unwrap().node_name.unwrap();
    assert_eq!(node, "gpu-node-80g");
    assert_eq!(
        pod_condition(&pod_api.get("untolerated").await?, "PodScheduled").as_deref(),
        Some("False")
    );
    Ok(())
}
