//! The reconciler: one pass per WarmPool looks at the cluster through the caches of
//! [`crate::cache`] (the pool, its Configuration's latest ready Revision, that Revision's
//! ReplicaSet, the pool's pods and the revision's pods), plans with
//! [`crate::plan`], acts, and writes the status with server-side apply. Reads come from the
//! caches, so the only API calls of a pass are its writes; state lives in the cluster only,
//! so a restart at any point re-derives it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use kinfer_core::warmpool::{
    Condition, POOL_CONTROLLER_MANAGER, ScaleUp, Sizing, WarmPool, WarmPoolStatus,
};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::cache::{self, Caches, Expect, Expectations, Listed, Writers, Written};
use crate::capacity;
use crate::metrics::Metrics;
use crate::names::*;
use crate::plan::{Plan, plan};
use crate::pod::{PodView, PoolState, Target, handoff_patch, open_gate_patch, warm_pod};
use crate::sidecar::{SidecarError, SidecarVerifier, private_service_host};
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
    pub caches: Caches,
    /// Per pool: the pod writes of its last pass, for the next pass to see in the cache.
    expectations: Expectations,
    /// Nodes, which the controller lists rather than watches.
    listed: Listed,
    /// Per pool: the status this process last wrote.
    written: Written,
    /// Per pool: when warm pod-seconds were last counted, and how many loaded pods there were.
    held: Mutex<HashMap<String, (Instant, i32)>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        metrics: Metrics,
        verifier: Arc<dyn SidecarVerifier>,
        default_refill: Duration,
        caches: Caches,
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
            caches,
            expectations: Expectations::default(),
            listed: Listed::default(),
            written: Written::default(),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Drops what is remembered about a pool that is gone.
    fn forget(&self, key: &str) {
        self.expectations.forget(key);
        self.written.forget(key);
        self.held.lock().unwrap().remove(key);
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

/// The revision's current ReplicaSet, from the cache, and the replicas it holds its pods to.
/// Those follow the Deployment's (which the KPA scales) one write later; a pass hands off
/// only as many pods as the ReplicaSet will keep, or the ReplicaSet would count the
/// handed-off pod as one too many and delete it.
fn find_target(ctx: &Context, ns: &str, revision: &str) -> Option<Found> {
    let set = ctx.caches.revision_replica_set(ns, revision)?;
    Some(Found {
        target: Target {
            revision: revision.to_string(),
            revision_uid: set.revision_uid,
            replica_set: set.name,
            replica_set_uid: set.uid,
            template_hash: set.template_hash,
            replicas: set.replicas,
        },
        template: set.template,
    })
}

/// Typical time from creating a pool pod to its containers being ready, from the pods seen.
fn observed_refill<P: std::borrow::Borrow<Pod>>(pods: &[P]) -> Option<f64> {
    let mut samples: Vec<f64> = pods
        .iter()
        .filter_map(|p| {
            let p: &Pod = p.borrow();
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

/// What became of a handed-off pod's served gate.
enum Gate {
    /// Opened: the pod turns Ready now.
    Open(Pod),
    /// The sidecar does not serve the revision yet; the gate stays closed.
    Closed(Pod, SidecarError),
    /// The pod is gone.
    Gone,
}

/// Verifies that a handed-off pod's sidecar serves the revision, then opens its served gate.
async fn let_serve(
    ctx: &Context,
    pods: &Api<Pod>,
    target: &Target,
    host: &str,
    pod: Pod,
    started: Instant,
) -> kube::Result<Gate> {
    if let Err(e) = ctx.verifier.verify(&pod, host).await {
        return Ok(Gate::Closed(pod, e));
    }
    let message = format!(
        "serves revision {} ({} mesh)",
        target.revision,
        ctx.verifier.name()
    );
    let patch = open_gate_patch(&rfc3339(jiff::Timestamp::now()), &message);
    match pods
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(
                pod = %pod.name_any(),
                pass_ms = started.elapsed().as_millis() as u64,
                "opened the served gate"
            );
            Ok(Gate::Open(pod))
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Gate::Gone),
        Err(e) => Err(e),
    }
}

#[tracing::instrument(skip_all, fields(pool = %cached.name_any(), namespace = cached.namespace().unwrap_or_default()))]
pub async fn reconcile(cached: Arc<WarmPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cached.namespace().ok_or(Error::NoNamespace)?;
    let name = cached.name_any();
    let key = format!("{ns}/{name}");
    let client = &ctx.client;
    if !ctx.caches.synced().await {
        return Ok(Action::await_change());
    }
    // The pool as the cache has it now (the trigger's copy may be older).
    let Some(pool) = ctx.caches.pools.get(&ObjectRef::from_obj(cached.as_ref())) else {
        ctx.forget(&key);
        return Ok(Action::await_change());
    };
    if pool.metadata.deletion_timestamp.is_some() {
        // Warm pods carry an owner reference to the pool: the garbage collector removes
        // them; handed-off pods carry none and stay with their revision.
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    let uid = pool.metadata.uid.clone().unwrap_or_default();
    // The counters build on this process's last status write, which the cache may not show
    // yet; the pods must show the last pass's writes before this pass plans.
    let status = ctx.written.status(&key, &uid, pool.status.as_ref());
    let waited = ctx.expectations.settle(&key, &ns, &ctx.caches).await;
    let reference = pool.object_ref(&());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let now_ts = jiff::Timestamp::now();
    let now = now_ts.as_millisecond() as f64 / 1000.0;
    let now_str = rfc3339(now_ts);

    // The Configuration's latest ready Revision.
    let configuration = ctx.caches.configurations.get(
        &ObjectRef::<DynamicObject>::new_with(
            &pool.spec.configuration_ref.name,
            configuration_resource(),
        )
        .within(&ns),
    );
    let latest = configuration.as_ref().and_then(|c| {
        c.data
            .pointer("/status/latestReadyRevisionName")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    });
    let found = match &latest {
        Some(rev) => find_target(&ctx, &ns, rev),
        None => None,
    };
    let target = found.as_ref().map(|f| &f.target);

    let pool_pods = ctx.caches.pods_labeled(&ns, POOL_LABEL, &name);
    let revision_pods = match target {
        Some(t) => ctx
            .caches
            .pods_labeled(&ns, REVISION_UID_LABEL, &t.revision_uid),
        None => Vec::new(),
    };
    let pool_views: Vec<PodView> = pool_pods.iter().map(|p| PodView::from_pod(p)).collect();
    let revision_views: Vec<PodView> = revision_pods.iter().map(|p| PodView::from_pod(p)).collect();

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
            let nodes = ctx.listed.nodes(client).await?;
            let everything = ctx.caches.pods.state();
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
        open_gate,
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

    // 1 and 2. Hand off (one patch per pod, guarded by its resourceVersion), then let each
    // handed-off pod serve once its sidecar serves the revision. Pod by pod and all at once,
    // so that no pod's gate waits for another pod's patch: latency matters most here.
    let mut handed: Vec<String> = Vec::new();
    let mut conflicts = 0;
    let mut sidecar_error = None;
    let mut gates_tried = false;
    if let Some(t) = target {
        let host = private_service_host(&t.revision, &ns);
        let handoff_time = precise(now_ts);
        let (ctx, pods, host, key) = (&ctx, &pods, &host, &key);
        let handoffs = handoff.iter().map(|p| {
            let patch = handoff_patch(&p.resource_version, t, &handoff_time);
            async move {
                let sent_ms = started.elapsed().as_millis() as u64;
                match pods
                    .patch(&p.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(pod) => {
                        ctx.expectations.record(
                            key,
                            vec![Expect::Changed {
                                name: p.name.clone(),
                                uid: p.uid.clone(),
                                from: p.resource_version.clone(),
                            }],
                        );
                        tracing::info!(
                            pod = %p.name,
                            revision = %t.revision,
                            waited_ms = waited.as_millis() as u64,
                            sent_ms,
                            pass_ms = started.elapsed().as_millis() as u64,
                            "handed off"
                        );
                        crash_point("handoff");
                        let gate = let_serve(ctx, pods, t, host, pod, started).await?;
                        Ok::<_, kube::Error>(Some((p.name.clone(), gate)))
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                        // The pod changed since the cache saw it: look again.
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
        });
        // Handed off by an earlier pass (or process) with the gate still closed.
        let earlier = open_gate.iter().filter_map(|v| {
            let pod = ctx.caches.pod(&ns, &v.name)?;
            Some(let_serve(ctx, pods, t, host, (*pod).clone(), started))
        });
        gates_tried = !open_gate.is_empty();
        let (handoffs, earlier) = futures::join!(
            futures::future::join_all(handoffs),
            futures::future::join_all(earlier)
        );
        let mut failed = None;
        let mut gates = Vec::new();
        for result in handoffs {
            match result {
                Ok(Some((pod, gate))) => {
                    handed.push(pod);
                    gates.push(gate);
                }
                Ok(None) => conflicts += 1,
                Err(e) => failed = Some(e),
            }
        }
        for result in earlier {
            match result {
                Ok(gate) => gates.push(gate),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        gates_tried |= !handed.is_empty();
        for gate in gates {
            match gate {
                Gate::Gone => {}
                Gate::Open(pod) => {
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
                Gate::Closed(pod, e) => {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "sidecar does not serve the revision yet");
                    publish(
                        ctx,
                        &reference,
                        EventType::Warning,
                        e.reason(),
                        "VerifySidecar",
                        format!("pod {}: {e}", pod.name_any()),
                    )
                    .await;
                    sidecar_error = Some(e);
                }
            }
        }
    }
    if gates_tried {
        crash_point("gate");
    }
    let handed_count = handed.len();
    if handed_count > 0 {
        ctx.metrics
            .handoffs
            .with_label_values(&[&ns, &name])
            .inc_by(handed_count as u64);
        ctx.metrics
            .hits
            .with_label_values(&[&ns, &name])
            .inc_by(handed_count as u64);
        publish(
            &ctx,
            &reference,
            EventType::Normal,
            "Handoff",
            "Handoff",
            format!(
                "handed {} warm pod(s) to revision {}: {}",
                handed_count,
                target.map(|t| t.revision.as_str()).unwrap_or_default(),
                handed.join(", ")
            ),
        )
        .await;
    }
    let missed = (grew - handed_count as i32).max(0).min(unmet);
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
        let uid = pool_views
            .iter()
            .find(|p| &p.name == pod_name)
            .map(|p| p.uid.clone())
            .unwrap_or_default();
        match pods.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(pod = %pod_name, "deleted warm pod"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        ctx.expectations.record(
            &key,
            vec![Expect::Deleted {
                name: pod_name.clone(),
                uid,
            }],
        );
    }
    if let (Some(f), true) = (&found, create > 0) {
        let owner = pool
            .controller_owner_ref(&())
            .expect("a stored pool has a uid");
        let pod = warm_pod(&f.template, &f.target, &name, owner);
        for _ in 0..create {
            let made = pods.create(&PostParams::default(), &pod).await?;
            ctx.expectations.record(
                &key,
                vec![Expect::Created {
                    name: made.name_any(),
                }],
            );
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
        handoffs: Some(status.handoffs.unwrap_or(0) + handed_count as i64),
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
    // Written only when it differs from the cluster's copy (as the cache shows it; a stale
    // copy costs a write that changes nothing).
    let in_cluster = pool.status.clone().map(|s| WarmPoolStatus {
        demand_forecast: None,
        ..s
    });
    if in_cluster.as_ref() != Some(&new_status) {
        let apply = serde_json::json!({
            "apiVersion": "kinfer.dev/v1alpha1",
            "kind": "WarmPool",
            "status": new_status,
        });
        let pools: Api<WarmPool> = Api::namespaced(client.clone(), &ns);
        pools
            .patch_status(
                &name,
                &PatchParams::apply(POOL_CONTROLLER_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await?;
    }
    ctx.written.record(&key, &uid, new_status);
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    if waited > Duration::from_millis(50) {
        tracing::debug!(
            waited_ms = waited.as_millis() as u64,
            "waited for the pod cache"
        );
    }

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

/// Runs the controller until `stop` fires. The watches that trigger reconciles also fill the
/// caches of `ctx` (`writers` are their write halves); each cache's readiness gate opens when
/// its first list is in, and no pass runs before all are.
pub async fn run(
    ctx: Arc<Context>,
    writers: Writers,
    namespace: Option<String>,
    stop: CancellationToken,
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
    // Lists come from the API server's watch cache; a watch resumes from there anyway.
    let config = || watcher::Config::default().any_semantic();
    let pools = cache::reflect(
        writers.pools,
        watcher(api::<WarmPool>(&client, &namespace), config()),
    );
    // Every pod, in every namespace: the capacity cap counts what all nodes run.
    let pods = cache::reflect(
        writers.pods,
        watcher(Api::<Pod>::all(client.clone()), config()),
    );
    let replica_sets = cache::reflect(
        writers.replica_sets,
        watcher(
            api::<ReplicaSet>(&client, &namespace),
            config().labels(CONFIGURATION_LABEL),
        ),
    );
    let ar = configuration_resource();
    let configurations = cache::reflect(
        writers.configurations,
        watcher(
            match &namespace {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
                None => Api::<DynamicObject>::all_with(client.clone(), &ar),
            },
            config(),
        ),
    );

    let (p1, p2, p3) = (
        ctx.caches.pools.clone(),
        ctx.caches.pools.clone(),
        ctx.caches.pools.clone(),
    );
    Controller::for_stream(pools, ctx.caches.pools.clone())
        .watches_stream(pods, move |pod: Pod| pools_for_pod(&pod, &p1.state()))
        // The KPA scales the Deployment, the Deployment its ReplicaSet: a scale-up is a
        // handoff, once the ReplicaSet will keep the handed-off pod.
        .watches_stream(replica_sets, move |d: ReplicaSet| {
            pools_for_configuration(
                &d.namespace().unwrap_or_default(),
                d.labels().get(CONFIGURATION_LABEL).map(String::as_str),
                &p2.state(),
            )
        })
        .watches_stream_with(
            configurations,
            move |c: DynamicObject| {
                pools_for_configuration(
                    &c.namespace().unwrap_or_default(),
                    c.metadata.name.as_deref(),
                    &p3.state(),
                )
            },
            ar,
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

/// The pools that warm `configuration` in `ns`. Pure.
fn pools_for_configuration(
    ns: &str,
    configuration: Option<&str>,
    pools: &[Arc<WarmPool>],
) -> Vec<ObjectRef<WarmPool>> {
    pools
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && Some(p.spec.configuration_ref.name.as_str()) == configuration
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The pools a pod event concerns: the pool of one of its pods (if that pool is watched:
/// the pod cache spans every namespace, the pools may not), or the pools of a revision
/// pod's Configuration (a cold pod that turns Ready changes what the revision still waits
/// for). Other pods concern none. Pure.
fn pools_for_pod(pod: &Pod, pools: &[Arc<WarmPool>]) -> Vec<ObjectRef<WarmPool>> {
    let labels = pod.labels();
    let ns = pod.namespace().unwrap_or_default();
    match labels.get(POOL_LABEL) {
        Some(pool) => pools
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && &p.name_any() == pool)
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect(),
        None if labels.contains_key(REVISION_UID_LABEL) => pools_for_configuration(
            &ns,
            labels.get(CONFIGURATION_LABEL).map(String::as_str),
            pools,
        ),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(ns: &str, name: &str, configuration: &str) -> Arc<WarmPool> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "kinfer.dev/v1alpha1", "kind": "WarmPool",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"configurationRef": {"name": configuration}, "minReady": 1},
            }))
            .unwrap(),
        )
    }

    fn pod(ns: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": ns, "labels": labels}}),
        )
        .unwrap()
    }

    fn names(refs: Vec<ObjectRef<WarmPool>>) -> Vec<String> {
        refs.into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect()
    }

    #[test]
    fn pod_events_trigger_the_pools_they_concern() {
        let pools = [
            pool("a", "m", "m"),
            pool("a", "other", "other"),
            pool("b", "m", "m"),
        ];
        let cases = [
            // A pool's own pod, warm or handed off.
            (pod("a", json!({POOL_LABEL: "m"})), vec!["a/m"]),
            (
                pod(
                    "a",
                    json!({POOL_LABEL: "m", REVISION_UID_LABEL: "u", CONFIGURATION_LABEL: "m"}),
                ),
                vec!["a/m"],
            ),
            // A pool label whose pool is not watched here.
            (pod("c", json!({POOL_LABEL: "m"})), vec![]),
            // A revision pod: the pools of its Configuration, in its namespace.
            (
                pod(
                    "b",
                    json!({REVISION_UID_LABEL: "u", CONFIGURATION_LABEL: "m"}),
                ),
                vec!["b/m"],
            ),
            (
                pod(
                    "a",
                    json!({REVISION_UID_LABEL: "u", CONFIGURATION_LABEL: "none"}),
                ),
                vec![],
            ),
            // Any other pod.
            (pod("a", json!({CONFIGURATION_LABEL: "m"})), vec![]),
            (pod("a", json!({})), vec![]),
        ];
        for (p, want) in cases {
            assert_eq!(
                names(pools_for_pod(&p, &pools)),
                want,
                "{:?}",
                p.metadata.labels
            );
        }
        assert_eq!(
            names(pools_for_configuration("a", Some("other"), &pools)),
            vec!["a/other"]
        );
        assert!(pools_for_configuration("a", None, &pools).is_empty());
    }
}
