//! Pod-creation latency through the real apiserver, with and without kinfer's webhook.
//!
//! Run inside the local control plane (not part of `make test`):
//! `webhook/bench/pod_latency.sh [N]` (= `hack/with-cluster --kinfer cargo bench -p
//! kinfer-webhook --bench pod_latency`).
//!
//! Creates N Pods one after another in each of two variants, interleaved so that load from
//! elsewhere on the machine hits both alike, and times each create call (the apiserver's
//! whole admission chain, storage included):
//! - **through the webhook**: a Knative revision label and `kinfer.dev/handler`, so the
//!   apiserver calls `pods.kinfer.dev` over TLS and applies its patch (init container,
//!   volume, wrapper command);
//! - **without**: the same Pod without the revision label, so the objectSelector keeps it
//!   away from the webhook.
//!
//! Prints p50/p99 of both and their ratio (goal: within 1.1x).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

fn pod(name: &str, through_webhook: bool) -> Pod {
    let mut labels = json!({ "app": "bench" });
    if through_webhook {
        labels["serving.knative.dev/revision"] = json!("bench-00001");
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": { "kinfer.dev/handler": "model:predict" },
        },
        "spec": { "containers": [{
            "name": "user-container",
            "image": "dev.local/model",
            "ports": [{ "containerPort": 8080 }],
        }]}
    }))
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "current_thread")]
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

    let warmup = 20.min(n);
    let mut with = Vec::with_capacity(n);
    let mut without = Vec::with_capacity(n);
    for i in 0..warmup + n {
        // Alternate which variant goes first, so neither always follows the other.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for through in order {
            let name = format!("{}-{i}", if through { "kinfer" } else { "plain" });
            let p = pod(&name, through);
            let start = Instant::now();
            let created = pods.create(&PostParams::default(), &p).await?;
            let took = start.elapsed();
            let injected = created
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.name == "kinfer-wrapper-install"));
            anyhow::ensure!(
                injected == through,
                "{}: went through the webhook: {injected}, expected {through}",
                created.name_any()
            );
            if i >= warmup {
                if through { &mut with } else { &mut without }.push(took);
            }
        }
    }
    with.sort();
    without.sort();
    let (w50, w99) = (percentile(&with, 0.5), percentile(&with, 0.99));
    let (o50, o99) = (percentile(&without, 0.5), percentile(&without, 0.99));
    println!(
        "pod creation through the apiserver, {n} Pods each, sequential (after {warmup} warm-up):"
    );
    println!(
        "  without webhook: p50 {:7.2} ms  p99 {:7.2} ms",
        ms(o50),
        ms(o99)
    );
    println!(
        "  through webhook: p50 {:7.2} ms  p99 {:7.2} ms",
        ms(w50),
        ms(w99)
    );
    println!(
        "  ratio:           p50 {:7.2}x    p99 {:7.2}x   (goal: within 1.1x)",
        ms(w50) / ms(o50),
        ms(w99) / ms(o99)
    );

    namespaces.delete(&ns, &DeleteParams::background()).await?;
    Ok(())
}
