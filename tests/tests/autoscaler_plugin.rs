//! The autoscaler plugin end to end: a real Prometheus (Debian's `prometheus`, run here as a
//! child process on loopback) scrapes a test exporter that plays the revision's pods with the
//! HTTP wrapper's and DCGM's metric names; the plugin (the real binary) queries it and feeds
//! the real Knative autoscaler over its stat websocket; the assertions are on the revision's
//! Deployment, which only the KPA scales. The bed is `kinfer_tests::autoscaling`; the
//! autoscaler-restart test is its own binary (`autoscaler_restart.rs`), so that the restart
//! cannot disturb these.
//!
//! The local control plane runs Knative with `target-burst-capacity: -1` and no activator, so
//! nothing else reports load: the plugin runs with `--knative-reporters none`.

use std::time::Duration;

use anyhow::Context;
use kinfer_tests::autoscaling::{Load, bed, reaches, replicas};
use kinfer_tests::knative;
use kinfer_tests::{poll, wait_for};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;

const SCRAPE: Duration = Duration::from_secs(1);

#[tokio::test]
async fn requests_mode_scales_the_revision_and_leaves_others_alone() -> anyhow::Result<()> {
    let Some(bed) = bed("as-requests", SCRAPE).await? else {
        return Ok(());
    };
    // Revision names are known in advance (`<service>-00001`), so the load and the plugin
    // are in place before the revisions exist: a revision at zero has no pods to report
    // (waking it is the activator's job, and the local control plane has none).
    let (driven, plain) = ("model-00001".to_string(), "plain-00001".to_string());
    bed.exporter.set(
        &plain,
        Load {
            in_flight: 100.0,
            queued: 90.0,
            gpu_busy: None,
        },
    );
    bed.exporter.set(
        &driven,
        Load {
            in_flight: 14.0,
            queued: 0.0,
            gpu_busy: None,
        },
    );
    let plugin = bed.plugin().await?;
    // Not opted in: Knative alone decides; min-scale 1 keeps it at one pod, whatever load the
    // exporter claims for it.
    bed.revision(knative::service(
        "plain",
        json!({
            "autoscaling.knative.dev/target": "10",
            "autoscaling.knative.dev/window": "6s",
            "autoscaling.knative.dev/min-scale": "1",
        }),
    ))
    .await?;
    bed.revision(knative::service(
        "model",
        json!({
            "kinfer.dev/autoscaling": "requests",
            "autoscaling.knative.dev/target": "10",
            "autoscaling.knative.dev/window": "6s",
            "autoscaling.knative.dev/min-scale": "0",
        }),
    ))
    .await?;
    let driven_dep = format!("{driven}-deployment");
    let plain_dep = format!("{plain}-deployment");
    // 14 requests: ceil(14 / (10 × 0.7)) = 2 pods.
    reaches(&bed.deployments, &driven_dep, 2, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;

    // Step: 35 requests in the pods, 30 of them queued behind a batching server → 5 pods.
    bed.exporter.set(
        &driven,
        Load {
            in_flight: 35.0,
            queued: 30.0,
            gpu_busy: None,
        },
    );
    let up = reaches(&bed.deployments, &driven_dep, 5, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    eprintln!(
        "reaction: load step 14 → 35 at the source to {driven_dep} replicas 5 in {up:.2?} (Prometheus scrape 1 s)"
    );
    // Held while the load lasts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(replicas(&bed.deployments, &driven_dep).await?, Some(5));
    assert_eq!(
        plugin
            .metric(&format!(
                r#"kinfer_autoscaler_plugin_decision_kpa_pods{{namespace="{}",revision="{driven}"}}"#,
                bed.ns
            ))
            .await?,
        Some(5.0)
    );
    assert!(
        plugin
            .metric("kinfer_autoscaler_plugin_stats_sent_total")
            .await?
            .unwrap_or(0.0)
            >= 5.0
    );

    // A second step: 14 requests → 2 pods.
    bed.exporter.set(
        &driven,
        Load {
            in_flight: 14.0,
            queued: 0.0,
            gpu_busy: None,
        },
    );
    let down = reaches(&bed.deployments, &driven_dep, 2, Duration::from_secs(90)).await?;
    eprintln!("load step 35 → 14: {driven_dep} replicas 2 in {down:.2?}");

    // The load stops: scale to zero.
    bed.exporter.set(&driven, Load::default());
    let zero = reaches(&bed.deployments, &driven_dep, 0, Duration::from_secs(180)).await?;
    eprintln!("load stopped: {driven_dep} scaled to zero in {zero:.2?}");

    // The plain revision never moved.
    assert_eq!(replicas(&bed.deployments, &plain_dep).await?, Some(1));
    assert_eq!(
        plugin.metric(&format!(r#"kinfer_autoscaler_plugin_decision_kpa_pods{{namespace="{}",revision="{plain}"}}"#, bed.ns)).await?,
        None
    );
    Ok(())
}

#[tokio::test]
async fn gpu_mode_converges_on_gpu_busy_time_and_publishes_a_forecast() -> anyhow::Result<()> {
    let Some(bed) = bed("as-gpu", SCRAPE).await? else {
        return Ok(());
    };
    // 2.4 GPUs' worth of work, few requests in flight (a batching server): at an 80% target
    // that is 3 pods. Each pod's GPU is at most 100% busy, so from one pod the plugin first
    // sees 1.0 (→ 2 pods), then 2 × 1.0 (→ 3), then 3 × 0.8 (→ 3, steady). The load is in
    // place before the revision exists (its name is known): a revision that reached zero
    // before the plugin saw its pod would stay there (waking it is the activator's job).
    bed.exporter.set(
        "llm-00001",
        Load {
            in_flight: 3.0,
            queued: 0.0,
            gpu_busy: Some(2.4),
        },
    );
    // A WarmPool for the Configuration, when the CRD is installed.
    let wp_api: Api<DynamicObject> = Api::namespaced_with(
        bed.client.clone(),
        &bed.ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("kinfer.dev", "v1alpha1", "WarmPool"),
            "warmpools",
        ),
    );
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kinfer.dev/v1alpha1", "kind": "WarmPool",
        "metadata": { "name": "llm-pool" },
        "spec": { "configurationRef": { "name": "llm" }, "minReady": 0, "sizing": "predictive" }
    }))?;
    let have_pool = match wp_api.create(&PostParams::default(), &pool).await {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            eprintln!("the WarmPool CRD is not installed: checking the forecast metric only");
            false
        }
        Err(e) => return Err(e.into()),
    };

    // The plugin runs before the revision exists, as in the requests test.
    let plugin = bed.plugin().await?;
    let revision = bed
        .revision(knative::service(
            "llm",
            json!({
                "kinfer.dev/autoscaling": "gpu",
                "kinfer.dev/autoscaling-gpu-target": "80",
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "0",
            }),
        ))
        .await?;
    assert_eq!(revision, "llm-00001");
    let dep = format!("{revision}-deployment");
    let up = reaches(&bed.deployments, &dep, 3, Duration::from_secs(90))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    eprintln!("gpu mode: 2.4 busy GPUs → {dep} replicas 3 in {up:.2?}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        replicas(&bed.deployments, &dep).await?,
        Some(3),
        "no overshoot once at 80% busy"
    );

    let gauge = format!(
        r#"kinfer_autoscaler_plugin_forecast_replicas{{configuration="llm",namespace="{}"}}"#,
        bed.ns
    );
    poll(Duration::from_secs(30), || async {
        Ok(plugin.metric(&gauge).await? == Some(3.0))
    })
    .await
    .context("forecast gauge")?;
    if have_pool {
        let pool = wait_for(&wp_api, "llm-pool", Duration::from_secs(30), |p| {
            p.data
                .pointer("/status/demandForecast/replicas")
                .and_then(|v| v.as_i64())
                == Some(3)
        })
        .await?;
        let f = &pool.data["status"]["demandForecast"];
        assert_eq!(f["horizonSeconds"], 30);
        assert_eq!(f["source"], "prometheus");
        assert!(f["observedAt"].as_str().unwrap().ends_with('Z'), "{f}");
        let managers: Vec<_> = pool
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.manager)
            .collect();
        assert!(
            managers.contains(&"kinfer-autoscaler-plugin".to_string()),
            "{managers:?}"
        );
    }

    bed.exporter.set(
        &revision,
        Load {
            in_flight: 0.0,
            queued: 0.0,
            gpu_busy: Some(0.0),
        },
    );
    reaches(&bed.deployments, &dep, 0, Duration::from_secs(180)).await?;
    Ok(())
}
