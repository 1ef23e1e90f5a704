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
//!   webhook (a kinfer annotation all the same);
//! - **called**: revision label and `kinfer.dev/accelerator: cpu`: the apiserver calls
//!   `pods.kinfer.dev` over TLS, which allows it unchanged;
//! - **patched**: revision label and `kinfer.dev/handler`: the webhook patches in the init
//!   container, volume and wrapper command. Adding a container makes the apiserver rerun its
//!   in-tree plugins (the ServiceAccount plugin mounts the token into the new init
//!   container), and that change makes it call the webhook a second time
//!   (`reinvocationPolicy: IfNeeded`; the second answer is a no-op).
//!
//! Prints p50/p99 of each and the ratios to "without" (goal: within 1.1x).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Without,
    Called,
    Patched,
}

const VARIANTS: [Variant; 3] = [Variant::Without, Variant::Called, Variant::Patched];

fn pod(name: &str, variant: Variant) -> Pod {
    let mut labels = json!({ "app": "bench" });
    if variant != Variant::Without {
        labels["serving.knative.dev/revision"] = json!("bench-00001");
    }
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
    let mut times: [Vec<Duration>; 3] = Default::default();
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
        }
    }
    for t in &mut times {
        t.sort();
    }
    let p = |v: usize, q: f64| ms(percentile(&times[v], q));
    println!(
        "pod creation through the apiserver, {n} Pods per variant, sequential (after {warmup} warm-up):"
    );
    let labels = [
        "without webhook (out of scope)",
        "webhook called, no patch     ",
        "webhook patches (handler)    ",
    ];
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
    println!("  (goal: within 1.1x)");

    namespaces.delete(&ns, &DeleteParams::background()).await?;
    Ok(())
}
