//! The reconciler: one pass per WarmPool looks at the cluster afresh (the pool, its
//! Configuration's latest ready Revision, that Revision's ReplicaSet and Deployment, the
//! pool's pods and the revision's pods), plans with [`crate::plan`], acts, and writes the
//! status with server-side apply. State lives in the cluster only, so a restart at any point
//! re-derives it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec};
use kinfer_core::warmpool::{
    Condition, POOL_CONTROLLER_MANAGER, ScaleUp, Sizing, WarmPool, WarmPoolStatus,
};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::capacity;
use crate::metrics::Metrics;
use crate::names::*;
use crate::plan::{Plan, plan};
use crate::pod::{PodView, PoolState, Target, handoff_patch, open_gate_patch, warm_pod};
use crate::sidecar::{SidecarVerifier, private_service_host};
use crate::sizing;

/// Fault injection for the crash-safety tests: with `KINFER_POOL_CRASH_AFTER=<step>` the
/// process aborts right after that step of a handoff (`handoff`: the relabel patch;
/// `gate`: opening the served gate; `create`: creating the refill pods), before anything
/// else is written.
fn crash_point(step: &str) {
    if std::env::var("KINFER_POOL_CRASH_AFTER").is_ok_and(|s| s == step) {
        tracing::error!(step, "KINFER_POOL_CRASH_AFTER: aborting");
        std::process::abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the WarmPool has no namespace")]
    NoNamespace,
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::NoNamespace => "invalid",
        }
    }
}

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub verifier: Arc<dyn SidecarVerifier>,
    /// Load time assumed for a revision until the pool has seen one of its pods load.
    pub default_refill: Duration,
    /// Per pool: when warm pod-seconds were last counted, and how many loaded pods there were.
    held: Mutex<HashMap<String, (Instant, i32)>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        metrics: Metrics,
        verifier: Arc<dyn SidecarVerifier>,
        default_refill: Duration,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "kinfer-pool-controller".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            recorder,
            metrics,
            verifier,
            default_refill,
            held: Mutex::new(HashMap::new()),
        }
    }
}

pub fn configuration_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "serving.knative.dev",
        "v1",
        "Configuration",
    ))
}

fn rfc3339(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn precise(t: jiff::Timestamp) -> String {
    t.to_string()
}

fn parse_time(s: &str) -> Option<f64> {
    s.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

/// The revision the pool warms and the template its pods come from.
struct Found {
    target: Target,
    template: PodTemplateSpec,
}

async fn find_target(
    client: &kube::Client,
    ns: &str,
    revision: &str,
) -> kube::Result<Option<Found>> {
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let list = sets
        .list(&ListParams::default().labels(&format!("{REVISION_LABEL}={revision}")))
        .await?;
    let deployment_revision = |rs: &ReplicaSet| {
        rs.annotations()
            .get(DEPLOYMENT_REVISION_ANNOTATION)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let Some(rs) = list
        .items
        .into_iter()
        .filter(|rs| rs.metadata.deletion_timestamp.is_none())
        .max_by_key(deployment_revision)
    else {
        return Ok(None);
    };
    let labels = rs.labels();
    let (Some(uid), Some(hash)) = (
        labels.get(REVISION_UID_LABEL).cloned(),
        labels.get(POD_TEMPLATE_HASH_LABEL).cloned(),
    ) else {
        return Ok(None);
    };
    let Some(template) = rs.spec.template.clone() else {
        return Ok(None);
    };
    // The Deployment's replicas move first when the KPA scales; the ReplicaSet's follow.
    let mut replicas = rs.spec.replicas.unwrap_or(0);
    if let Some(owner) = rs
        .owner_references()
        .iter()
        .find(|o| o.kind == "Deployment" && o.controller == Some(true))
    {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
        if let Some(d) = deployments.get_opt(&owner.name).await? {
            replicas = d.spec.replicas.unwrap_or(1);
        }
    }
    Ok(Some(Found {
        target: Target {
            revision: revision.to_string(),
            revision_uid: uid,
            template_hash: hash,
            replicas,
        },
        template,
    }))
}

/// Typical time from creating a pool pod to its containers being ready, from the pods seen.
fn observed_refill(pods: &[Pod]) -> Option<f64> {
    let mut samples: Vec<f64> = pods
        .iter()
        .filter_map(|p| {
            let created =
                p.metadata.creation_timestamp.as_ref()?.0.as_millisecond() as f64 / 1000.0;
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "ContainersReady" && c.status == "True")?;
            let at = ready.last_transition_time.as_ref()?.0.as_millisecond() as f64 / 1000.0;
            Some((at - created).max(0.0))
        })
        .collect();
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    Some(samples[samples.len() / 2])
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    now: &str,
    prev: &[Condition],
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: last,
        observed_generation: generation,
    }
}

#[tracing::instrument(skip_all, fields(pool = %cached.name_any(), namespace = cached.namespace().unwrap_or_default()))]
pub async fn reconcile(cached: Arc<WarmPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cached.namespace().ok_or(Error::NoNamespace)?;
    let name = cached.name_any();
    let client = &ctx.client;
    let pools: Api<WarmPool> = Api::namespaced(client.clone(), &ns);
    // Read afresh: the counters in the status must build on the last write, not the cache.
    let Some(pool) = pools.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if pool.metadata.deletion_timestamp.is_some() {
        // Warm pods carry an owner reference to the pool: the garbage collector removes
        // them; handed-off pods carry none and stay with their revision.
        return Ok(Action::await_change());
    }
    let status = pool.status.clone().unwrap_or_default();
    let reference = pool.object_ref(&());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let now_ts = jiff::Timestamp::now();
    let now = now_ts.as_millisecond() as f64 / 1000.0;
    let now_str = rfc3339(now_ts);

    // The Configuration's latest ready Revision.
    let configurations: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &configuration_resource());
    let configuration = configurations
        .get_opt(&pool.spec.configuration_ref.name)
        .await?;
    let latest = configuration.as_ref().and_then(|c| {
        c.data
            .pointer("/status/latestReadyRevisionName")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    });
    let found = match &latest {
        Some(rev) => find_target(client, &ns, rev).await?,
        None => None,
    };
    let target = found.as_ref().map(|f| &f.target);

    let pool_pods = pods
        .list(&ListParams::default().labels(&format!("{POOL_LABEL}={name}")))
        .await?
        .items;
    let revision_pods = match target {
        Some(t) => {
            pods.list(
                &ListParams::default().labels(&format!("{REVISION_UID_LABEL}={}", t.revision_uid)),
            )
            .await?
            .items
        }
        None => Vec::new(),
    };
    let pool_views: Vec<PodView> = pool_pods.iter().map(PodView::from_pod).collect();
    let revision_views: Vec<PodView> = revision_pods.iter().map(PodView::from_pod).collect();

    // Scale-ups since the last look (only when the pool already watched this revision).
    let mut scale_ups: Vec<sizing::ScaleUp> = status
        .scale_ups
        .iter()
        .flatten()
        .filter_map(|s| {
            Some(sizing::ScaleUp {
                at: parse_time(&s.at)?,
                pods: s.pods,
            })
        })
        .collect();
    let mut grew = 0;
    if let (Some(t), Some(prev)) = (target, status.observed_revision_replicas)
        && status.revision.as_deref() == Some(t.revision.as_str())
        && t.replicas > prev
    {
        grew = t.replicas - prev;
        scale_ups.push(sizing::ScaleUp {
            at: now,
            pods: grew,
        });
    }
    let scale_ups = sizing::prune(scale_ups, now, sizing::HISTORY_LIMIT);

    // Size the pool.
    let warm_now = pool_views
        .iter()
        .filter(|p| p.state == PoolState::Warm && !p.terminating)
        .count() as i32;
    let room = match (pool.spec.sizing, &found) {
        (Sizing::Predictive, Some(f)) => {
            let nodes: Api<Node> = Api::all(client.clone());
            let all_pods: Api<Pod> = Api::all(client.clone());
            let nodes = nodes.list(&ListParams::default()).await?.items;
            let everything = all_pods.list(&ListParams::default()).await?.items;
            let spec = f.template.spec.clone().unwrap_or_default();
            Some(capacity::room(&spec, &nodes, &everything, |p| {
                p.labels().get(STATE_LABEL).map(String::as_str) == Some(STATE_WARM)
            }))
        }
        _ => None,
    };
    let forecast = status.demand_forecast.as_ref().and_then(|f| {
        Some(sizing::Forecast {
            replicas: f.replicas,
            horizon_seconds: f.horizon_seconds as f64,
            observed_at: parse_time(&f.observed_at)?,
        })
    });
    let load_seconds = observed_refill(&pool_pods).unwrap_or(ctx.default_refill.as_secs_f64());
    let decision = sizing::size(&sizing::Input {
        policy: pool.spec.sizing,
        min_ready: pool.spec.min_ready,
        max_ready: pool.spec.max_ready(),
        now,
        scale_ups: &scale_ups,
        forecast,
        replicas: target.map(|t| t.replicas).unwrap_or(0),
        refill_seconds: load_seconds,
        warm: warm_now,
        room,
    });

    let Plan {
        handoff,
        mut open_gate,
        delete,
        create,
        unmet,
        ready_after,
        warm_after,
    } = plan(
        target,
        &pool_views,
        &revision_views,
        decision.desired,
        now,
        load_seconds,
    );

    // 1. Hand off: latency matters most here.
    let mut handed = 0;
    let mut conflicts = 0;
    if let Some(t) = target {
        for p in &handoff {
            let patch = handoff_patch(&p.resource_version, t, &precise(now_ts));
            match pods
                .patch(&p.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(pod) => {
                    handed += 1;
                    tracing::info!(pod = %p.name, revision = %t.revision, "handed off");
                    open_gate.push(PodView::from_pod(&pod));
                }
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                    // The pod changed since we looked: look again.
                    conflicts += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if handed > 0 {
        crash_point("handoff");
    }

    // 2. Let handed-off pods serve once their sidecar serves the revision.
    let mut sidecar_error = None;
    if let Some(t) = target {
        let host = private_service_host(&t.revision, &ns);
        let checks = open_gate.iter().map(|p| {
            let pods = pods.clone();
            let host = host.clone();
            let ctx = ctx.clone();
            async move {
                let pod = pods.get_opt(&p.name).await?;
                let Some(pod) = pod else {
                    return Ok::<_, kube::Error>(None);
                };
                match ctx.verifier.verify(&pod, &host).await {
                    Ok(()) => {
                        let message = format!(
                            "serves revision {} ({} mesh)",
                            t.revision,
                            ctx.verifier.name()
                        );
                        pods.patch_status(
                            &p.name,
                            &PatchParams::default(),
                            &Patch::Strategic(open_gate_patch(
                                &rfc3339(jiff::Timestamp::now()),
                                &message,
                            )),
                        )
                        .await?;
                        Ok(Some(Ok(pod)))
                    }
                    Err(e) => Ok(Some(Err((pod, e)))),
                }
            }
        });
        for result in futures::future::join_all(checks).await {
            match result? {
                Some(Ok(pod)) => {
                    let since = pod
                        .annotations()
                        .get(HANDOFF_TIME_ANNOTATION)
                        .and_then(|s| parse_time(s));
                    if let Some(since) = since {
                        let secs = (jiff::Timestamp::now().as_millisecond() as f64 / 1000.0
                            - since)
                            .max(0.0);
                        ctx.metrics
                            .handoff_to_ready
                            .with_label_values(&[&ns, &name])
                            .observe(secs);
                    }
                }
                Some(Err((pod, e))) => {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "sidecar does not serve the revision yet");
                    publish(
                        &ctx,
                        &reference,
                        EventType::Warning,
                        e.reason(),
                        "VerifySidecar",
                        format!("pod {}: {e}", pod.name_any()),
                    )
                    .await;
                    sidecar_error = Some(e);
                }
                None => {}
            }
        }
    }
    if !open_gate.is_empty() {
        crash_point("gate");
    }
    if handed > 0 {
        ctx.metrics
            .handoffs
            .with_label_values(&[&ns, &name])
            .inc_by(handed as u64);
        ctx.metrics
            .hits
            .with_label_values(&[&ns, &name])
            .inc_by(handed as u64);
        let names: Vec<&str> = handoff
            .iter()
            .take(handed)
            .map(|p| p.name.as_str())
            .collect();
        publish(
            &ctx,
            &reference,
            EventType::Normal,
            "Handoff",
            "Handoff",
            format!(
                "handed {} warm pod(s) to revision {}: {}",
                handed,
                target.map(|t| t.revision.as_str()).unwrap_or_default(),
                names.join(", ")
            ),
        )
        .await;
    }
    let missed = (grew - handed as i32).max(0).min(unmet);
    if missed > 0 {
        ctx.metrics
            .misses
            .with_label_values(&[&ns, &name])
            .inc_by(missed as u64);
        publish(
            &ctx,
            &reference,
            EventType::Normal,
            "Miss",
            "Handoff",
            format!(
                "revision {} scaled up by {grew}; {missed} pod(s) start cold (no loaded warm pod)",
                target.map(|t| t.revision.as_str()).unwrap_or_default()
            ),
        )
        .await;
    }

    // 3. Shrink and refill.
    for pod_name in &delete {
        match pods.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(pod = %pod_name, "deleted warm pod"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let (Some(f), true) = (&found, create > 0) {
        let owner = pool
            .controller_owner_ref(&())
            .expect("a stored pool has a uid");
        let pod = warm_pod(&f.template, &f.target, &name, owner);
        for _ in 0..create {
            pods.create(&PostParams::default(), &pod).await?;
        }
        tracing::info!(count = create, revision = %f.target.revision, "created warm pods");
        crash_point("create");
    }
    if status
        .desired_replicas
        .is_some_and(|d| d != decision.desired)
    {
        publish(
            &ctx,
            &reference,
            EventType::Normal,
            "Resize",
            "Size",
            format!(
                "pool size {} → {} ({:?} sizing{})",
                status.desired_replicas.unwrap_or(0),
                decision.desired,
                pool.spec.sizing,
                if decision.capped {
                    format!(
                        ", capped from {} by the cluster's free capacity",
                        decision.wanted
                    )
                } else {
                    String::new()
                }
            ),
        )
        .await;
    }

    // 4. Metrics and status.
    {
        let key = format!("{ns}/{name}");
        let mut held = ctx.held.lock().unwrap();
        if let Some((since, loaded)) = held.get(&key) {
            ctx.metrics
                .warm_pod_seconds
                .with_label_values(&[&ns, &name])
                .inc_by(since.elapsed().as_secs_f64() * *loaded as f64);
        }
        held.insert(key, (Instant::now(), ready_after));
    }
    ctx.metrics
        .warm_pods
        .with_label_values(&[&ns, &name, "loaded"])
        .set(ready_after as i64);
    ctx.metrics
        .warm_pods
        .with_label_values(&[&ns, &name, "loading"])
        .set((warm_after - ready_after + create) as i64);
    ctx.metrics
        .desired_pods
        .with_label_values(&[&ns, &name])
        .set(decision.desired as i64);

    let prev_conditions = status.conditions.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let revision_ok = target.is_some();
    let revision_cond = condition(
        "RevisionReady",
        revision_ok,
        if revision_ok {
            "Found"
        } else if configuration.is_none() {
            "ConfigurationNotFound"
        } else {
            "NoReadyRevision"
        },
        match (&latest, &configuration) {
            (_, None) => format!(
                "Configuration {} not found",
                pool.spec.configuration_ref.name
            ),
            (None, Some(_)) => format!(
                "Configuration {} has no ready Revision yet",
                pool.spec.configuration_ref.name
            ),
            (Some(r), _) if !revision_ok => format!("Revision {r} has no ReplicaSet yet"),
            (Some(r), _) => format!("warming Revision {r}"),
        },
        &now_str,
        &prev_conditions,
        generation,
    );
    let sidecar_cond = condition(
        "SidecarReady",
        sidecar_error.is_none(),
        sidecar_error
            .as_ref()
            .map(|e| e.reason())
            .unwrap_or("Verified"),
        sidecar_error
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_else(|| {
                format!(
                    "handed-off pods serve their revision ({} mesh)",
                    ctx.verifier.name()
                )
            }),
        &now_str,
        &prev_conditions,
        generation,
    );
    let full = ready_after >= decision.desired;
    let ready_cond = condition(
        "Ready",
        revision_ok && full && sidecar_error.is_none(),
        if !revision_ok {
            "NoRevision"
        } else if sidecar_error.is_some() {
            "SidecarNotReady"
        } else if full {
            "PoolFull"
        } else {
            "Filling"
        },
        format!("{ready_after}/{} warm pods loaded", decision.desired),
        &now_str,
        &prev_conditions,
        generation,
    );
    let new_status = WarmPoolStatus {
        observed_generation: generation,
        revision: target.map(|t| t.revision.clone()),
        pod_template_hash: target.map(|t| t.template_hash.clone()),
        ready_replicas: Some(ready_after),
        replicas: Some(warm_after + create),
        desired_replicas: Some(decision.desired),
        handoffs: Some(status.handoffs.unwrap_or(0) + handed as i64),
        misses: Some(status.misses.unwrap_or(0) + missed as i64),
        observed_revision_replicas: target.map(|t| t.replicas),
        scale_ups: Some(
            scale_ups
                .iter()
                .filter_map(|s| {
                    Some(ScaleUp {
                        at: rfc3339(
                            jiff::Timestamp::from_millisecond((s.at * 1000.0) as i64).ok()?,
                        ),
                        pods: s.pods,
                    })
                })
                .collect(),
        ),
        conditions: Some(vec![ready_cond, revision_cond, sidecar_cond]),
        // Owned by the autoscaler plugin: never part of this manager's apply.
        demand_forecast: None,
    };
    let apply = serde_json::json!({
        "apiVersion": "kinfer.dev/v1alpha1",
        "kind": "WarmPool",
        "status": new_status,
    });
    pools
        .patch_status(
            &name,
            &PatchParams::apply(POOL_CONTROLLER_MANAGER).force(),
            &Patch::Apply(&apply),
        )
        .await?;

    let busy = conflicts > 0
        || sidecar_error.is_some()
        || create > 0
        || warm_after > ready_after
        || unmet > 0;
    Ok(Action::requeue(if busy {
        Duration::from_secs(2)
    } else {
        // The predictive policy pre-warms one load time plus this ahead of a likely arrival.
        Duration::from_secs_f64(sizing::RECHECK)
    }))
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

pub fn error_policy(_pool: Arc<WarmPool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.kind()])
        .inc();
    tracing::warn!(%error, "reconcile failed");
    Action::requeue(Duration::from_secs(if error.kind() == "conflict" {
        1
    } else {
        5
    }))
}

/// Runs the controller until `stop` fires. `synced` is called once the pools' cache has
/// done its first list.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: CancellationToken,
    synced: impl FnOnce() + Send + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let controller = Controller::new(
        api::<WarmPool>(&client, &namespace),
        watcher::Config::default(),
    );
    let store = controller.store();
    let wait = store.clone();
    tokio::spawn(async move {
        // Re-polled: kube-runtime wakes only one of several waiters on a store (the
        // controller's own), so a lone wait here could sleep forever.
        loop {
            match tokio::time::timeout(Duration::from_millis(200), wait.wait_until_ready()).await {
                Ok(Ok(())) => return synced(),
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });
    let by_configuration = move |ns: Option<String>, configuration: Option<String>| {
        let (Some(ns), Some(configuration)) = (ns, configuration) else {
            return Vec::new();
        };
        store
            .state()
            .iter()
            .filter(|p| {
                p.namespace().as_deref() == Some(ns.as_str())
                    && p.spec.configuration_ref.name == configuration
            })
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    };
    let by_configuration2 = by_configuration.clone();
    let ar = configuration_resource();
    controller
        .watches(
            api::<Pod>(&client, &namespace),
            watcher::Config::default().labels(POOL_LABEL),
            |pod: Pod| {
                let ns = pod.namespace()?;
                pod.labels()
                    .get(POOL_LABEL)
                    .map(|pool| ObjectRef::new(pool).within(&ns))
            },
        )
        .watches(
            api::<Deployment>(&client, &namespace),
            watcher::Config::default().labels(CONFIGURATION_LABEL),
            move |d: Deployment| {
                by_configuration(d.namespace(), d.labels().get(CONFIGURATION_LABEL).cloned())
            },
        )
        .watches_with(
            match &namespace {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
                None => Api::<DynamicObject>::all_with(client.clone(), &ar),
            },
            ar,
            watcher::Config::default(),
            move |c: DynamicObject| by_configuration2(c.namespace(), c.metadata.name.clone()),
        )
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "controller");
            }
        })
        .await;
}
