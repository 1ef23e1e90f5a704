//! The scheduler counts `nvidia.com/gpu`: nine one-GPU pods pinned to one 8-GPU node leave
//! exactly one Pending. (Its own test binary: cargo runs binaries one after another, so no
//! other test holds GPUs on that node meanwhile.)

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kinfer_tests::{client, namespace, pod_ready, poll, unschedulable_message};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn nine_one_gpu_pods_on_an_eight_gpu_node_leave_one_pending() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "gpu-capacity").await?;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for i in 0..9 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": format!("gpu-{i}"), "labels": { "app": "gpu" } },
            "spec": {
                "nodeSelector": { "kubernetes.io/hostname": "gpu-node-24g" },
                "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }],
                "containers": [{
                    "name": "model",
                    "image": "dev.local/model",
                    "resources": { "limits": { "nvidia.com/gpu": "1" } }
                }]
            }
        }))?;
        pod_api.create(&PostParams::default(), &pod).await?;
    }
    poll(Duration::from_secs(60), || async {
        let all = pod_api
            .list(&ListParams::default().labels("app=gpu"))
            .await?
            .items;
        let ready = all.iter().filter(|p| pod_ready(p)).count();
        let unschedulable = all
            .iter()
            .filter(|p| unschedulable_message(p).is_some())
            .count();
        Ok(ready == 8 && unschedulable == 1)
    })
    .await?;
    // And it stays that way: nothing else frees a GPU.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = pod_api
        .list(&ListParams::default().labels("app=gpu"))
        .await?
        .items;
    assert_eq!(all.iter().filter(|p| pod_ready(p)).count(), 8);
    let pending: Vec<_> = all
        .iter()
        .filter(|p| unschedulable_message(p).is_some())
        .collect();
    assert_eq!(pending.len(), 1);
    let message = unschedulable_message(pending[0]).unwrap();
    assert!(message.contains("Insufficient nvidia.com/gpu"), "{message}");

    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}
