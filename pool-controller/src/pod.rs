//! What a pool pod is: how it is built from the revision's ReplicaSet template, how the
//! controller reads one, and the patches that hand it off and open its gate. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodReadinessGate, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::{Value, json};

use crate::names::*;

/// The revision a pool warms, as its current ReplicaSet describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub revision: String,
    pub revision_uid: String,
    /// The revision's current ReplicaSet (name and uid), which a handoff makes the pod's
    /// controller.
    pub replica_set: String,
    pub replica_set_uid: String,
    pub template_hash: String,
    /// The replicas the revision's ReplicaSet holds its pods to.
    pub replicas: i32,
}

/// Labels the revision's ReplicaSet and Services select on; a warm pod must not carry them.
/// (`serving.knative.dev/revision` stays: Knative's autoscaler only sees pods that carry
/// `revisionUID`. The template carries kinfer's placement, put there by the webhook when the
/// revision's Deployment was made; were it unplaced, kinfer's Pod webhook would select warm
/// pods by that label, so they get exactly the revision pods' injection either way.)
pub const SELECTED_LABELS: [&str; 2] = [REVISION_UID_LABEL, POD_TEMPLATE_HASH_LABEL];

/// A warm pod for `target`, from the ReplicaSet's pod template: the selected labels swapped
/// for the pool's, a non-controller owner reference to the pool (so deleting the pool
/// deletes its warm pods, and the ReplicaSet may adopt them), and the served readiness gate.
pub fn warm_pod(
    template: &PodTemplateSpec,
    target: &Target,
    pool_name: &str,
    pool_owner: OwnerReference,
) -> Pod {
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    for key in SELECTED_LABELS {
        labels.remove(key);
    }
    labels.insert(POOL_LABEL.into(), pool_name.into());
    labels.insert(STATE_LABEL.into(), STATE_WARM.into());
    let mut annotations = meta.annotations.unwrap_or_default();
    annotations.insert(
        TEMPLATE_HASH_ANNOTATION.into(),
        target.template_hash.clone(),
    );
    annotations.remove(DELETION_COST_ANNOTATION);

    let mut spec = template.spec.clone().unwrap_or_default();
    let gates = spec.readiness_gates.get_or_insert_with(Vec::new);
    if !gates.iter().any(|g| g.condition_type == SERVED_GATE) {
        gates.push(PodReadinessGate {
            condition_type: SERVED_GATE.into(),
        });
    }
    let owner = OwnerReference {
        controller: Some(false),
        block_owner_deletion: Some(false),
        ..pool_owner
    };
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-warm-", target.revision)),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The one patch that hands a warm pod to the revision: the labels the ReplicaSet selects
/// on; the ReplicaSet as the pod's only owner, in place of the pool (a merge patch replaces
/// the list whole: deleting the pool leaves the pod alone, and the ReplicaSet, finding its
/// own controller reference on a pod it selects, counts it without a write of its own,
/// where adopting an ownerless pod would patch it while the gate is being opened); a high
/// deletion cost (so the ReplicaSet deletes the cold pod it made instead); the handoff time.
/// It carries the pod's resourceVersion, so it applies whole to the pod as the controller
/// saw it, or not at all: a pod is never half handed off, never has two owners, and is
/// never handed to two revisions.
pub fn handoff_patch(resource_version: &str, target: &Target, now: &str) -> Value {
    json!({
        "metadata": {
            "resourceVersion": resource_version,
            "labels": {
                REVISION_UID_LABEL: target.revision_uid,
                POD_TEMPLATE_HASH_LABEL: target.template_hash,
                REVISION_LABEL: target.revision,
                STATE_LABEL: STATE_HANDED_OFF,
            },
            "annotations": {
                DELETION_COST_ANNOTATION: HANDED_OFF_DELETION_COST,
                HANDOFF_TIME_ANNOTATION: now,
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": target.replica_set,
                "uid": target.replica_set_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        }
    })
}

/// The status patch (strategic merge, keyed by condition type) that opens the served gate.
pub fn open_gate_patch(now: &str, message: &str) -> Value {
    json!({
        "status": {
            "conditions": [{
                "type": SERVED_GATE,
                "status": "True",
                "reason": "ServesRevision",
                "message": message,
                "lastTransitionTime": now,
            }]
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolState {
    Warm,
    HandedOff,
    /// Not one of the pool's pods.
    None,
}

/// What the controller needs to know about a pod, read once.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub state: PoolState,
    /// For warm pods, the hash of the ReplicaSet template it was built from; for revision
    /// pods, their `pod-template-hash` label.
    pub template_hash: Option<String>,
    /// Containers ready: the model has loaded.
    pub loaded: bool,
    /// The pod is Ready (takes traffic).
    pub ready: bool,
    /// The served readiness gate is True, or the pod has no such gate.
    pub gate_open: bool,
    /// Being deleted, or finished.
    pub terminating: bool,
    pub has_gate: bool,
    /// Creation time, RFC 3339 (sorts in time order).
    pub created: String,
    /// Creation time, Unix seconds.
    pub created_at: Option<f64>,
    pub handoff_time: Option<String>,
}

impl PodView {
    pub fn from_pod(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let labels = meta.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
        let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k)).cloned();
        let state = match label(STATE_LABEL).as_deref() {
            Some(STATE_WARM) => PoolState::Warm,
            Some(STATE_HANDED_OFF) => PoolState::HandedOff,
            _ => PoolState::None,
        };
        let template_hash = match state {
            PoolState::Warm => annotation(TEMPLATE_HASH_ANNOTATION),
            _ => label(POD_TEMPLATE_HASH_LABEL),
        };
        let status = pod.status.as_ref();
        let condition = |t: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == t))
                .map(|c| c.status == "True")
                .unwrap_or(false)
        };
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let has_gate = pod
            .spec
            .as_ref()
            .and_then(|s| s.readiness_gates.as_ref())
            .is_some_and(|g| g.iter().any(|g| g.condition_type == SERVED_GATE));
        Self {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            state,
            template_hash,
            loaded: phase == "Running" && condition("ContainersReady"),
            ready: condition("Ready"),
            gate_open: !has_gate || condition(SERVED_GATE),
            terminating: meta.deletion_timestamp.is_some()
                || phase == "Succeeded"
                || phase == "Failed",
            has_gate,
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            created_at: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond() as f64 / 1000.0),
            handoff_time: annotation(HANDOFF_TIME_ANNOTATION),
        }
    }
}

/// Label selector of a pool's pods.
pub fn pool_selector(pool_name: &str) -> String {
    format!("{POOL_LABEL}={pool_name}")
}

/// Labels as a map, for tests and callers that build pods.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn target() -> Target {
        Target {
            revision: "m-00001".into(),
            revision_uid: "uid-1".into(),
            replica_set: "m-00001-deployment-abc".into(),
            replica_set_uid: "rs-uid".into(),
            template_hash: "abc".into(),
            replicas: 0,
        }
    }

    fn template() -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels(&[
                    (REVISION_UID_LABEL, "uid-1"),
                    (POD_TEMPLATE_HASH_LABEL, "abc"),
                    (REVISION_LABEL, "m-00001"),
                    (CONFIGURATION_LABEL, "m"),
                    ("app", "m-00001"),
                ])),
                annotations: Some(
                    [("test.kinfer.dev/load-time".to_string(), "20s".to_string())].into(),
                ),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                service_account_name: Some("model-sa".into()),
                containers: vec![
                    Container {
                        name: "user-container".into(),
                        ..Default::default()
                    },
                    Container {
                        name: "queue-proxy".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "kinfer.dev/v1alpha1".into(),
            kind: "WarmPool".into(),
            name: "pool".into(),
            uid: "pool-uid".into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn warm_pod_is_the_revision_pod_minus_what_selects_it() {
        let pod = warm_pod(&template(), &target(), "pool", owner());
        let meta = &pod.metadata;
        let labels = meta.labels.as_ref().unwrap();
        assert!(!labels.contains_key(REVISION_UID_LABEL));
        assert!(!labels.contains_key(POD_TEMPLATE_HASH_LABEL));
        assert_eq!(
            labels[REVISION_LABEL], "m-00001",
            "the webhook selects on it"
        );
        assert_eq!(labels[CONFIGURATION_LABEL], "m");
        assert_eq!(labels[POOL_LABEL], "pool");
        assert_eq!(labels[STATE_LABEL], STATE_WARM);
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations["test.kinfer.dev/load-time"], "20s");
        assert_eq!(annotations[TEMPLATE_HASH_ANNOTATION], "abc");
        assert_eq!(meta.generate_name.as_deref(), Some("m-00001-warm-"));
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            owners[0].controller,
            Some(false),
            "the ReplicaSet must be able to adopt it"
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("model-sa"));
        assert_eq!(
            spec.containers.len(),
            2,
            "queue-proxy and every sidecar stay"
        );
        assert_eq!(
            spec.readiness_gates.as_ref().unwrap()[0].condition_type,
            SERVED_GATE
        );
    }

    #[test]
    fn handoff_patch_selects_the_pod_into_the_replicaset_in_one_step() {
        let patch = handoff_patch("42", &target(), "2026-01-01T00:00:00Z");
        let meta = &patch["metadata"];
        assert_eq!(meta["resourceVersion"], "42");
        assert_eq!(meta["labels"][REVISION_UID_LABEL], "uid-1");
        assert_eq!(meta["labels"][POD_TEMPLATE_HASH_LABEL], "abc");
        assert_eq!(meta["labels"][REVISION_LABEL], "m-00001");
        assert_eq!(meta["labels"][STATE_LABEL], STATE_HANDED_OFF);
        assert_eq!(meta["annotations"][DELETION_COST_ANNOTATION], "1000");
        // The ReplicaSet is the only owner, its controller: the pool's reference is gone
        // (a merge patch replaces the list) and the ReplicaSet has nothing to adopt.
        assert_eq!(
            meta["ownerReferences"],
            json!([{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "m-00001-deployment-abc",
                "uid": "rs-uid",
                "controller": true,
                "blockOwnerDeletion": true,
            }])
        );
    }

    #[test]
    fn reads_a_pool_pod() {
        let mut pod = warm_pod(&template(), &target(), "pool", owner());
        pod.metadata.name = Some("m-00001-warm-x".into());
        let view = PodView::from_pod(&pod);
        assert_eq!(view.state, PoolState::Warm);
        assert_eq!(view.template_hash.as_deref(), Some("abc"));
        assert!(!view.loaded && !view.ready && !view.gate_open && !view.terminating);
        let status: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(json!({
            "phase": "Running",
            "conditions": [
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "False"},
            ]
        }))
        .unwrap();
        pod.status = Some(status);
        let view = PodView::from_pod(&pod);
        assert!(view.loaded && !view.ready && !view.gate_open);
    }
}
