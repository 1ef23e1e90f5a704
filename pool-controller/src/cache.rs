//! The controller's view of the cluster: reflector caches filled by the same watches that
//! trigger reconciles, so a pass reads no object from the API server. The node list, which
//! the controller may only list, is remembered for a few seconds.
//!
//! A cache may lag the cluster; nothing that matters depends on it being current. The
//! handoff patch carries the pod's `resourceVersion`, so a stale pod makes it fail with a
//! conflict (and the pass retries) rather than hand the pod off twice; and each pass first
//! waits until the pod cache shows what the pool's previous pass wrote ([`Expect`]), so it
//! does not create or hand off a pod again because its own write has not arrived yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, TryStreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec};
use kinfer_core::admin::{Readiness, ReadinessGate};
use kinfer_core::warmpool::{WarmPool, WarmPoolStatus};
use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use crate::names::*;

/// How long a pass waits for the pod cache to show the previous pass's writes.
pub const EXPECT_WITHIN: Duration = Duration::from_secs(2);
/// How long a node list is used for the capacity cap.
pub const NODES_TTL: Duration = Duration::from_secs(10);

/// The caches a pass reads. Cloning shares them.
#[derive(Clone)]
pub struct Caches {
    pub pools: Store<WarmPool>,
    /// Every pod in the cluster: the pools' own, the revisions', and the rest for the
    /// capacity cap (real pods that wait for room, what each node has left).
    pub pods: Store<Pod>,
    /// Knative's revision ReplicaSets (label `serving.knative.dev/configuration`): the pod
    /// template, the labels to hand off with, and the replicas the ReplicaSet holds its pods
    /// to (a handoff beyond those would have the handed-off pod deleted).
    pub replica_sets: Store<ReplicaSet>,
    pub configurations: Store<DynamicObject>,
    synced: watch::Receiver<usize>,
}

/// The write halves of [`Caches`] and their readiness gates, taken apart by
/// [`crate::controller::run`] as it starts the watches.
pub struct Writers {
    pub pools: (Writer<WarmPool>, CacheGate),
    pub pods: (Writer<Pod>, CacheGate),
    pub replica_sets: (Writer<ReplicaSet>, CacheGate),
    pub configurations: (Writer<DynamicObject>, CacheGate),
}

impl Caches {
    /// Empty caches, each with a `readiness` gate (registered now, so `/readyz` stays red
    /// until the watches run) that opens when its watch has done its first list.
    pub fn new(configuration: &kube::api::ApiResource, readiness: &Readiness) -> (Self, Writers) {
        let pools = Writer::default();
        let pods = Writer::default();
        let replica_sets = Writer::default();
        let configurations = Writer::new(configuration.clone());
        let (tx, rx) = watch::channel(4);
        let tx = Arc::new(tx);
        let gate = |name| CacheGate {
            readiness: readiness.gate(name),
            pending: tx.clone(),
        };
        let caches = Caches {
            pools: pools.as_reader(),
            pods: pods.as_reader(),
            replica_sets: replica_sets.as_reader(),
            configurations: configurations.as_reader(),
            synced: rx,
        };
        let writers = Writers {
            pools: (pools, gate("warmpools")),
            pods: (pods, gate("pods")),
            replica_sets: (replica_sets, gate("replicasets")),
            configurations: (configurations, gate("configurations")),
        };
        (caches, writers)
    }

    /// Resolves once every cache has done its first list (at once after that); `false` if
    /// the watches are gone.
    pub async fn synced(&self) -> bool {
        let mut rx = self.synced.clone();
        rx.wait_for(|pending| *pending == 0).await.is_ok()
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(ns))
    }

    /// The pods in `ns` whose label `key` is `value`.
    pub fn pods_labeled(&self, ns: &str, key: &str, value: &str) -> Vec<Arc<Pod>> {
        self.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
                && p.labels().get(key).map(String::as_str) == Some(value)
        })
    }

    /// The revision's current ReplicaSet (see [`pick_replica_set`]).
    pub fn revision_replica_set(&self, ns: &str, revision: &str) -> Option<RevisionSet> {
        let sets: Vec<ReplicaSet> = self
            .replica_sets
            .state_filter(|rs| {
                rs.metadata.namespace.as_deref() == Some(ns)
                    && rs.labels().get(REVISION_LABEL).map(String::as_str) == Some(revision)
            })
            .into_iter()
            .map(|rs| (*rs).clone())
            .collect();
        pick_replica_set(&sets)
    }
}

/// Feeds `writer`'s cache from `events` (managed fields dropped: nobody reads them) and
/// passes on the objects that changed, to trigger reconciles. `gate` opens at the end of the
/// first list.
pub fn reflect<K, S>(
    (writer, gate): (Writer<K>, CacheGate),
    events: S,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let mut gate = Some(gate);
    events
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone)
                && let Some(gate) = gate.take()
            {
                gate.open();
            }
        })
        .touched_objects()
}

/// One cache's part of readiness.
pub struct CacheGate {
    readiness: ReadinessGate,
    pending: Arc<watch::Sender<usize>>,
}

impl CacheGate {
    fn open(self) {
        self.readiness.open();
        self.pending.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What a pass wrote to a pod, for the next pass to see in the pod cache before it plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A pod the pass created.
    Created { name: String },
    /// A pod the pass patched (handed off): the cache has a newer version than `from`, or
    /// no longer has the pod.
    Changed {
        name: String,
        uid: String,
        from: String,
    },
    /// A pod the pass deleted: gone from the cache, or being deleted.
    Deleted { name: String, uid: String },
}

impl Expect {
    pub fn name(&self) -> &str {
        match self {
            Expect::Created { name }
            | Expect::Changed { name, .. }
            | Expect::Deleted { name, .. } => name,
        }
    }

    /// Whether `seen` (the cache's pod of that name) shows the write. Pure.
    pub fn met(&self, seen: Option<&Pod>) -> bool {
        let same = |p: &Pod, uid: &str| p.metadata.uid.as_deref() == Some(uid);
        match (self, seen) {
            (Expect::Created { .. }, seen) => seen.is_some(),
            (Expect::Changed { uid, from, .. }, Some(p)) if same(p, uid) => {
                p.metadata.resource_version.as_deref() != Some(from.as_str())
            }
            (Expect::Deleted { uid, .. }, Some(p)) if same(p, uid) => {
                p.metadata.deletion_timestamp.is_some()
            }
            _ => true,
        }
    }
}

/// Per pool (`namespace/name`): the writes its last pass expects the pod cache to show.
#[derive(Default)]
pub struct Expectations {
    pending: Mutex<HashMap<String, (Instant, Vec<Expect>)>>,
}

impl Expectations {
    pub fn record(&self, pool: &str, writes: Vec<Expect>) {
        if writes.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().unwrap();
        let entry = pending
            .entry(pool.to_string())
            .or_insert_with(|| (Instant::now(), Vec::new()));
        entry.0 = Instant::now() + EXPECT_WITHIN;
        entry.1.extend(writes);
    }

    /// Waits until the cache shows every write the pool's last pass made, or until they are
    /// [`EXPECT_WITHIN`] old (a pod deleted by someone else before the cache saw it would
    /// otherwise be waited for forever). Returns how long it waited.
    pub async fn settle(&self, pool: &str, ns: &str, caches: &Caches) -> Duration {
        let start = Instant::now();
        loop {
            let deadline = {
                let mut pending = self.pending.lock().unwrap();
                let Some((deadline, writes)) = pending.get_mut(pool) else {
                    return start.elapsed();
                };
                writes.retain(|w| !w.met(caches.pod(ns, w.name()).as_deref()));
                if writes.is_empty() {
                    pending.remove(pool);
                    return start.elapsed();
                }
                if Instant::now() >= *deadline {
                    tracing::warn!(
                        writes = ?writes,
                        "the pod cache did not show the last pass's writes in time"
                    );
                    pending.remove(pool);
                    return start.elapsed();
                }
                *deadline
            };
            let nap =
                Duration::from_millis(5).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(nap).await;
        }
    }

    pub fn forget(&self, pool: &str) {
        self.pending.lock().unwrap().remove(pool);
    }
}

/// The revision's current ReplicaSet, as far as a pass needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionSet {
    /// The ReplicaSet's name and uid: a handoff makes it the pod's controller.
    pub name: String,
    pub uid: String,
    pub revision_uid: String,
    pub template_hash: String,
    pub template: PodTemplateSpec,
    /// The replicas the ReplicaSet holds its pods to (it follows its Deployment's).
    pub replicas: i32,
}

fn deployment_revision(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> i64 {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(DEPLOYMENT_REVISION_ANNOTATION))
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
}

/// Of a revision's ReplicaSets, the Deployment's newest one that is not being deleted, if it
/// carries the labels a handoff needs. Pure.
pub fn pick_replica_set(sets: &[ReplicaSet]) -> Option<RevisionSet> {
    let rs = sets
        .iter()
        .filter(|rs| rs.metadata.deletion_timestamp.is_none())
        .max_by_key(|rs| deployment_revision(&rs.metadata))?;
    let labels = rs.labels();
    Some(RevisionSet {
        name: rs.metadata.name.clone()?,
        uid: rs.metadata.uid.clone()?,
        revision_uid: labels.get(REVISION_UID_LABEL)?.clone(),
        template_hash: labels.get(POD_TEMPLATE_HASH_LABEL)?.clone(),
        template: rs.spec.template.clone()?,
        replicas: rs.spec.replicas.unwrap_or(0),
    })
}

/// The node list, which the controller may only list (its role has `list` on nodes, not
/// `watch`), remembered for [`NODES_TTL`].
#[derive(Default)]
pub struct Listed {
    nodes: Mutex<Option<(Instant, Arc<Vec<Node>>)>>,
}

impl Listed {
    /// The cluster's nodes, listed at most every [`NODES_TTL`].
    pub async fn nodes(&self, client: &kube::Client) -> kube::Result<Arc<Vec<Node>>> {
        if let Some((at, nodes)) = self.nodes.lock().unwrap().as_ref()
            && at.elapsed() < NODES_TTL
        {
            return Ok(nodes.clone());
        }
        let api: Api<Node> = Api::all(client.clone());
        let mut nodes = api.list(&ListParams::default()).await?.items;
        for n in &mut nodes {
            n.metadata.managed_fields = None;
        }
        let nodes = Arc::new(nodes);
        *self.nodes.lock().unwrap() = Some((Instant::now(), nodes.clone()));
        Ok(nodes)
    }
}

/// Per pool: the status this process last wrote. The pool cache shows a status write only
/// when its watch event arrives; a pass that starts before that builds its counters
/// (handoffs, misses, the revision's replicas last seen) on this instead, so it neither
/// loses a handoff nor counts a scale-up twice. After a restart the cluster's copy is used.
#[derive(Default)]
pub struct Written {
    statuses: Mutex<HashMap<String, (String, WarmPoolStatus)>>,
}

impl Written {
    /// The status to build on: the last one written for this pool (same uid), with the
    /// fields other managers own taken from `cached`; else `cached`'s.
    pub fn status(&self, pool: &str, uid: &str, cached: Option<&WarmPoolStatus>) -> WarmPoolStatus {
        let cached = cached.cloned().unwrap_or_default();
        match self.statuses.lock().unwrap().get(pool) {
            Some((u, written)) if u == uid => WarmPoolStatus {
                demand_forecast: cached.demand_forecast,
                ..written.clone()
            },
            _ => cached,
        }
    }

    pub fn record(&self, pool: &str, uid: &str, status: WarmPoolStatus) {
        self.statuses
            .lock()
            .unwrap()
            .insert(pool.to_string(), (uid.to_string(), status));
    }

    pub fn forget(&self, pool: &str) {
        self.statuses.lock().unwrap().remove(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, rv: &str, deleting: bool) -> Pod {
        let mut p = json!({"metadata": {"name": "p", "uid": uid, "resourceVersion": rv}});
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn expectations_are_met_once_the_cache_shows_the_write() {
        let created = Expect::Created { name: "p".into() };
        assert!(!created.met(None));
        assert!(created.met(Some(&pod("u", "1", false))));

        let changed = Expect::Changed {
            name: "p".into(),
            uid: "u".into(),
            from: "5".into(),
        };
        assert!(
            !changed.met(Some(&pod("u", "5", false))),
            "still the version patched"
        );
        assert!(changed.met(Some(&pod("u", "6", false))));
        assert!(changed.met(None), "gone");
        assert!(
            changed.met(Some(&pod("other", "5", false))),
            "another pod by that name"
        );

        let deleted = Expect::Deleted {
            name: "p".into(),
            uid: "u".into(),
        };
        assert!(!deleted.met(Some(&pod("u", "5", false))));
        assert!(deleted.met(Some(&pod("u", "6", true))), "terminating");
        assert!(deleted.met(None));
    }

    fn rs(name: &str, revision: &str, deleting: bool, labels: bool) -> ReplicaSet {
        let mut r = json!({
            "metadata": {
                "name": name,
                "uid": format!("rs-{name}"),
                "annotations": {DEPLOYMENT_REVISION_ANNOTATION: revision},
                "labels": {},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                    "name": "m-00001-deployment", "uid": "d", "controller": true}],
            },
            "spec": {"replicas": 2, "selector": {}, "template": {"metadata": {"labels": {"a": name}}}},
        });
        if labels {
            r["metadata"]["labels"] =
                json!({REVISION_UID_LABEL: "uid", POD_TEMPLATE_HASH_LABEL: name});
        }
        if deleting {
            r["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(r).unwrap()
    }

    #[test]
    fn picks_the_newest_live_replica_set() {
        let picked = pick_replica_set(&[
            rs("h1", "1", false, true),
            rs("h3", "3", true, true),
            rs("h2", "2", false, true),
        ])
        .unwrap();
        assert_eq!(picked.template_hash, "h2");
        assert_eq!(picked.revision_uid, "uid");
        assert_eq!((picked.name.as_str(), picked.uid.as_str()), ("h2", "rs-h2"));
        assert_eq!(picked.replicas, 2);
        assert!(pick_replica_set(&[rs("h1", "1", false, false)]).is_none());
        assert!(pick_replica_set(&[]).is_none());
    }

    #[test]
    fn the_status_builds_on_the_last_write() {
        let written = Written::default();
        let cached = WarmPoolStatus {
            handoffs: Some(1),
            demand_forecast: Some(kinfer_core::warmpool::DemandForecast {
                replicas: 3,
                horizon_seconds: 60,
                observed_at: "2026-01-01T00:00:00Z".into(),
                source: "test".into(),
            }),
            ..Default::default()
        };
        assert_eq!(written.status("ns/p", "u1", Some(&cached)), cached);
        written.record(
            "ns/p",
            "u1",
            WarmPoolStatus {
                handoffs: Some(2),
                ..Default::default()
            },
        );
        let status = written.status("ns/p", "u1", Some(&cached));
        assert_eq!(status.handoffs, Some(2));
        assert_eq!(status.demand_forecast, cached.demand_forecast);
        // A pool of that name made anew starts from the cluster's status.
        assert_eq!(written.status("ns/p", "u2", Some(&cached)), cached);
    }
}
