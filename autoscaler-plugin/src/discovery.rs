//! Which revisions the plugin drives and which pods they have: watches of Knative Revisions
//! (only those with `kinfer.dev/autoscaling` count), of revision pods (stripped to what the
//! plugin needs), and of Knative's `config-autoscaler` defaults.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::annotations::{self, KnativeDefaults};
use crate::policy::RevisionPolicy;
use crate::signals::PodKey;

pub const REVISION_LABEL: &str = "serving.knative.dev/revision";
/// Only pods with this label are the revision's (its ReplicaSet selects on it). kinfer's warm
/// pods carry the revision label but not this one until they are handed off, so, as in
/// Knative's own pod view, they are not counted.
pub const REVISION_UID_LABEL: &str = "serving.knative.dev/revisionUID";
pub const CONFIGURATION_LABEL: &str = "serving.knative.dev/configuration";

/// A pod of a revision, with its IP when it has one.
pub type RevisionPod = (PodKey, Option<String>);

/// A revision the plugin drives, with its running pods (and their IPs, for scraping).
#[derive(Debug, Clone, PartialEq)]
pub struct DrivenRevision {
    pub namespace: String,
    pub name: String,
    pub configuration: String,
    pub policy: RevisionPolicy,
    pub pods: Vec<RevisionPod>,
}

/// The revisions to drive, and problems with revisions that opted in but cannot be driven
/// (keyed by `namespace/name`). Pure.
pub fn driven_revisions(
    revisions: &[Arc<DynamicObject>],
    pods: &[Arc<Pod>],
    defaults: &KnativeDefaults,
) -> (Vec<DrivenRevision>, BTreeMap<String, String>) {
    let mut by_revision: HashMap<(String, String), Vec<RevisionPod>> = HashMap::new();
    for pod in pods {
        let (Some(ns), Some(rev)) = (
            pod.metadata.namespace.as_deref(),
            pod.labels().get(REVISION_LABEL),
        ) else {
            continue;
        };
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let owned = pod.labels().contains_key(REVISION_UID_LABEL);
        if !running || !owned || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        by_revision
            .entry((ns.to_string(), rev.clone()))
            .or_default()
            .push((
                PodKey::new(ns, pod.name_any()),
                status.and_then(|s| s.pod_ip.clone()),
            ));
    }
    let mut out = Vec::new();
    let mut problems = BTreeMap::new();
    for rev in revisions {
        let Some(value) = rev.annotations().get(annotations::AUTOSCALING) else {
            continue;
        };
        let ns = rev.namespace().unwrap_or_default();
        let name = rev.name_any();
        let key = format!("{ns}/{name}");
        let mode = match annotations::parse_mode(value) {
            Ok(Some(mode)) => mode,
            Ok(None) => continue,
            Err(e) => {
                problems.insert(key, e);
                continue;
            }
        };
        let gpu_target = match rev.annotations().get(annotations::AUTOSCALING_GPU_TARGET) {
            None => annotations::DEFAULT_GPU_TARGET,
            Some(v) => match annotations::parse_gpu_target(v) {
                Ok(t) => t,
                Err(e) => {
                    problems.insert(key, e);
                    continue;
                }
            },
        };
        let cc = rev
            .data
            .pointer("/spec/containerConcurrency")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let kpa = match annotations::kpa_target(rev.annotations(), cc, defaults) {
            Ok(t) => t,
            Err(e) => {
                problems.insert(key, e);
                continue;
            }
        };
        let mut pods = by_revision
            .remove(&(ns.clone(), name.clone()))
            .unwrap_or_default();
        pods.sort();
        out.push(DrivenRevision {
            configuration: rev
                .labels()
                .get(CONFIGURATION_LABEL)
                .cloned()
                .unwrap_or_else(|| name.clone()),
            namespace: ns,
            name,
            policy: RevisionPolicy {
                mode,
                gpu_target,
                kpa,
            },
            pods,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (out, problems)
}

/// The watches behind [`driven_revisions`].
#[derive(Clone)]
pub struct Discovery {
    pub revisions: Store<DynamicObject>,
    pub pods: Store<Pod>,
    pub defaults: watch::Receiver<KnativeDefaults>,
}

impl Discovery {
    /// Starts the watches; they end when `stop` is cancelled.
    pub fn start(
        client: Client,
        namespace: Option<&str>,
        knative_namespace: String,
        stop: CancellationToken,
    ) -> Self {
        let gvk = GroupVersionKind::gvk("serving.knative.dev", "v1", "Revision");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "revisions");
        let rev_api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let rev_writer = reflector::store::Writer::new(ar);
        let revisions = rev_writer.as_reader();
        let rev_stream = watcher(rev_api, watcher::Config::default().any_semantic())
            .modify(|r: &mut DynamicObject| {
                r.metadata.managed_fields = None;
                if let Some(obj) = r.data.as_object_mut() {
                    obj.remove("status");
                }
            })
            .default_backoff()
            .reflect(rev_writer)
            .for_each(|e| async {
                if let Err(e) = e {
                    tracing::warn!(error = %e, "watching Knative Revisions");
                }
            });

        let pod_api: Api<Pod> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (pods, pod_writer) = reflector::store();
        let pod_stream = watcher(
            pod_api,
            watcher::Config::default()
                .labels(&format!("{REVISION_LABEL},{REVISION_UID_LABEL}"))
                .any_semantic(),
        )
        .modify(|p: &mut Pod| {
            // Keep what decides membership and where to scrape; drop the rest (memory).
            p.metadata.managed_fields = None;
            p.metadata.annotations = None;
            p.metadata.owner_references = None;
            p.spec = None;
            p.status = p.status.take().map(|s| PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                ..PodStatus::default()
            });
        })
        .default_backoff()
        .reflect(pod_writer)
        .for_each(|e| async {
            if let Err(e) = e {
                tracing::warn!(error = %e, "watching revision pods");
            }
        });

        let (defaults_tx, defaults) = watch::channel(KnativeDefaults::default());
        let cms: Api<ConfigMap> = Api::namespaced(client, &knative_namespace);
        let defaults_task = async move {
            loop {
                match cms.get_opt("config-autoscaler").await {
                    Ok(Some(cm)) => {
                        let d = KnativeDefaults::from_config_map(&cm.data.unwrap_or_default());
                        defaults_tx.send_if_modified(|old| {
                            let changed = *old != d;
                            if changed {
                                tracing::info!(defaults = ?d, "Knative autoscaler defaults");
                                *old = d;
                            }
                            changed
                        });
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "reading config-autoscaler"),
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        };

        tokio::spawn({
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = rev_stream => {}
                }
            }
        });
        tokio::spawn({
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = pod_stream => {}
                }
            }
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = defaults_task => {}
            }
        });
        Self {
            revisions,
            pods,
            defaults,
        }
    }

    /// Resolves once both watches have listed everything once.
    pub async fn synced(&self) -> anyhow::Result<()> {
        self.revisions.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        Ok(())
    }

    pub fn snapshot(&self) -> (Vec<DrivenRevision>, BTreeMap<String, String>) {
        let defaults = *self.defaults.borrow();
        driven_revisions(&self.revisions.state(), &self.pods.state(), &defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{KpaMetric, Mode};
    use serde_json::json;

    fn revision(ns: &str, name: &str, annotations: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                "metadata": { "namespace": ns, "name": name, "annotations": annotations,
                    "labels": { CONFIGURATION_LABEL: "svc" } },
                "spec": { "containerConcurrency": 0 }
            }))
            .unwrap(),
        )
    }

    fn pod(ns: &str, name: &str, rev: &str, phase: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": { "namespace": ns, "name": name,
                    "labels": { REVISION_LABEL: rev, REVISION_UID_LABEL: format!("{rev}-uid") } },
                "status": { "phase": phase, "podIP": "10.0.0.1" }
            }))
            .unwrap(),
        )
    }

    #[test]
    fn warm_pool_pods_are_not_the_revisions_until_handed_off() {
        let defaults = KnativeDefaults::default();
        let revisions = vec![revision(
            "ns",
            "a-1",
            json!({ "kinfer.dev/autoscaling": "requests" }),
        )];
        let mut warm = (*pod("ns", "warm", "a-1", "Running")).clone();
        warm.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(REVISION_UID_LABEL);
        let pods = vec![pod("ns", "served", "a-1", "Running"), Arc::new(warm)];
        let (driven, _) = driven_revisions(&revisions, &pods, &defaults);
        let names: Vec<_> = driven[0]
            .pods
            .iter()
            .map(|(key, _)| key.pod.as_str())
            .collect();
        assert_eq!(names, ["served"]);
    }

    #[test]
    fn only_opted_in_revisions_with_their_running_pods() {
        let revisions = [
            revision(
                "a",
                "svc-00001",
                json!({ "kinfer.dev/autoscaling": "gpu", "autoscaling.knative.dev/target": "10" }),
            ),
            revision("a", "plain-00001", json!({})),
            revision("a", "off-00001", json!({ "kinfer.dev/autoscaling": "off" })),
            revision(
                "a",
                "typo-00001",
                json!({ "kinfer.dev/autoscaling": "gpus" }),
            ),
            revision(
                "a",
                "hpa-00001",
                json!({ "kinfer.dev/autoscaling": "requests", "autoscaling.knative.dev/class": "hpa.autoscaling.knative.dev" }),
            ),
        ];
        let pods = [
            pod("a", "p1", "svc-00001", "Running"),
            pod("a", "p2", "svc-00001", "Pending"),
            pod("b", "p3", "svc-00001", "Running"),
            pod("a", "p4", "plain-00001", "Running"),
        ];
        let (driven, problems) = driven_revisions(&revisions, &pods, &KnativeDefaults::default());
        assert_eq!(driven.len(), 1);
        let d = &driven[0];
        assert_eq!(
            (
                d.namespace.as_str(),
                d.name.as_str(),
                d.configuration.as_str()
            ),
            ("a", "svc-00001", "svc")
        );
        assert_eq!(d.policy.mode, Mode::Gpu);
        assert_eq!(d.policy.kpa.metric, KpaMetric::Concurrency);
        assert!((d.policy.kpa.value - 7.0).abs() < 1e-9);
        assert_eq!(
            d.pods,
            vec![(PodKey::new("a", "p1"), Some("10.0.0.1".into()))]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems["a/typo-00001"].contains("\"gpus\""));
        assert!(problems["a/hpa-00001"].contains("only the KPA"));
    }
}
