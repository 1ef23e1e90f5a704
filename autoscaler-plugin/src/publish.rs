//! Publishes the demand forecast on `WarmPool.status.demandForecast` for every WarmPool whose
//! `spec.configurationRef.name` is the forecast's Configuration, with server-side apply on the
//! status subresource (field manager `kinfer-autoscaler-plugin`, which owns only that field).
//! Runs apart from the collection loop, so a slow API server never delays a stat.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "kinfer-autoscaler-plugin";

/// (namespace, configuration) → forecast replicas.
pub type Forecasts = BTreeMap<(String, String), i32>;

/// The status patch the plugin applies.
pub fn status_patch(
    name: &str,
    replicas: i32,
    horizon: Duration,
    observed_at: &str,
    source: &str,
) -> serde_json::Value {
    json!({
        "apiVersion": "kinfer.dev/v1alpha1",
        "kind": "WarmPool",
        "metadata": { "name": name },
        "status": { "demandForecast": {
            "replicas": replicas,
            "horizonSeconds": horizon.as_secs(),
            "observedAt": observed_at,
            "source": source,
        }},
    })
}

fn warmpools(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kinfer.dev", "v1alpha1", "WarmPool");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "warmpools");
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Writes forecasts every `period`, each WarmPool at least every `refresh` or when its
/// replicas change.
pub async fn run(
    client: Client,
    mut forecasts: watch::Receiver<Forecasts>,
    horizon: Duration,
    source: String,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let period = Duration::from_secs(2);
    let refresh = Duration::from_secs(30);
    let mut written: HashMap<(String, String), (i32, Instant)> = HashMap::new();
    let mut crd_missing_until: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if crd_missing_until.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        let current = forecasts.borrow_and_update().clone();
        let mut by_ns: BTreeMap<&str, Vec<(&str, i32)>> = BTreeMap::new();
        for ((ns, cfg), replicas) in &current {
            by_ns.entry(ns).or_default().push((cfg, *replicas));
        }
        for (ns, cfgs) in by_ns {
            let api = warmpools(&client, ns);
            let pools = match api.list(&ListParams::default()).await {
                Ok(l) => l.items,
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    tracing::info!(
                        "the WarmPool CRD is not installed; the forecast is only a metric (retrying in 60s)"
                    );
                    crd_missing_until = Some(Instant::now() + Duration::from_secs(60));
                    break;
                }
                Err(e) => {
                    tracing::warn!(namespace = ns, error = %e, "listing WarmPools");
                    metrics.forecast_writes.with_label_values(&["error"]).inc();
                    continue;
                }
            };
            for pool in pools {
                let cfg_ref = pool
                    .data
                    .pointer("/spec/configurationRef/name")
                    .and_then(|v| v.as_str());
                let Some((_, replicas)) = cfgs.iter().find(|(c, _)| Some(*c) == cfg_ref) else {
                    continue;
                };
                let name = pool.name_any();
                let key = (ns.to_string(), name.clone());
                if written
                    .get(&key)
                    .is_some_and(|(r, at)| r == replicas && at.elapsed() < refresh)
                {
                    continue;
                }
                let now =
                    k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second);
                let patch = status_patch(
                    &name,
                    *replicas,
                    horizon,
                    &now.map(|t| t.to_string()).unwrap_or_default(),
                    &source,
                );
                match api
                    .patch_status(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        metrics.forecast_writes.with_label_values(&["ok"]).inc();
                        if written.get(&key).map(|(r, _)| r) != Some(replicas) {
                            tracing::info!(namespace = ns, warmpool = %name, replicas, "demand forecast published");
                        }
                        written.insert(key, (*replicas, Instant::now()));
                    }
                    Err(e) => {
                        metrics.forecast_writes.with_label_values(&["error"]).inc();
                        tracing::warn!(namespace = ns, warmpool = %name, error = %e, "writing the demand forecast");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_touches_only_the_forecast() {
        let p = status_patch(
            "pool",
            4,
            Duration::from_secs(60),
            "2026-01-01T00:00:00Z",
            "prometheus",
        );
        assert_eq!(p["status"].as_object().unwrap().len(), 1);
        assert_eq!(
            p["status"]["demandForecast"],
            json!({"replicas": 4, "horizonSeconds": 60, "observedAt": "2026-01-01T00:00:00Z", "source": "prometheus"})
        );
        assert!(p.get("spec").is_none());
    }
}
