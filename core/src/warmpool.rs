//! The `WarmPool` custom resource (`kinfer.dev/v1alpha1`): warm pods kept for a Knative
//! Configuration and handed to its latest ready Revision on scale-up.
//!
//! The status has two writers, each with its own server-side-apply field manager: the pool
//! controller ([`POOL_CONTROLLER_MANAGER`]) owns everything but `demandForecast`, which the
//! autoscaler plugin ([`AUTOSCALER_PLUGIN_MANAGER`]) owns.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// On pods the pool controller made: the `pod-template-hash` of the ReplicaSet a warm pod
/// was built from.
pub const TEMPLATE_HASH_ANNOTATION: &str = "kinfer.dev/pod-template-hash";
/// On pods the pool controller handed off: when (RFC 3339 with fractional seconds).
pub const HANDOFF_TIME_ANNOTATION: &str = "kinfer.dev/handoff-time";
/// The pool controller's bookkeeping annotations on pods. They share the `kinfer.dev/` prefix
/// with the user's annotations but configure nothing, so the webhook lets them through.
pub const POD_BOOKKEEPING_ANNOTATIONS: &[&str] =
    &[TEMPLATE_HASH_ANNOTATION, HANDOFF_TIME_ANNOTATION];

/// The field manager of the pool controller's status writes.
pub const POOL_CONTROLLER_MANAGER: &str = "kinfer-pool-controller";
/// The field manager of the autoscaler plugin's `status.demandForecast` writes.
pub const AUTOSCALER_PLUGIN_MANAGER: &str = "kinfer-autoscaler-plugin";

/// Keep warm pods for a Knative Configuration (a Service's Configuration has the Service's
/// name) and hand them to its revision when the revision scales up.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kinfer.dev",
    version = "v1alpha1",
    kind = "WarmPool",
    namespaced,
    shortname = "wp",
    status = "WarmPoolStatus",
    doc = "Warm pods for a Knative Configuration, handed to its latest ready Revision on scale-up",
    printcolumn = r#"{"name":"Configuration", "type":"string", "jsonPath":".spec.configurationRef.name"}"#,
    printcolumn = r#"{"name":"Revision", "type":"string", "jsonPath":".status.revision"}"#,
    printcolumn = r#"{"name":"Ready", "type":"integer", "jsonPath":".status.readyReplicas", "description":"warm pods that are loaded and can be handed off"}"#,
    printcolumn = r#"{"name":"Desired", "type":"integer", "jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Handoffs", "type":"integer", "jsonPath":".status.handoffs"}"#,
    printcolumn = r#"{"name":"Misses", "type":"integer", "jsonPath":".status.misses", "priority":1}"#,
    printcolumn = r#"{"name":"Sizing", "type":"string", "jsonPath":".spec.sizing", "priority":1}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolSpec {
    /// The Knative Configuration (in the pool's namespace) whose latest ready Revision the
    /// pool warms.
    pub configuration_ref: ConfigurationRef,
    /// Warm pods to hold at least (when the cluster has room for them).
    #[serde(default = "default_min_ready")]
    #[schemars(range(min = 0))]
    pub min_ready: i32,
    /// Warm pods to hold at most; `predictive` sizing stays within `minReady..maxReady`.
    /// Defaults to `minReady`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_ready: Option<i32>,
    /// `fixed` holds `minReady` pods; `predictive` sizes the pool from the Configuration's
    /// scale-up history and the autoscaler's demand forecast.
    #[serde(default)]
    pub sizing: Sizing,
}

fn default_min_ready() -> i32 {
    1
}

impl WarmPoolSpec {
    /// `maxReady`, defaulted to `minReady` and never below it.
    pub fn max_ready(&self) -> i32 {
        self.max_ready.unwrap_or(self.min_ready).max(self.min_ready)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ConfigurationRef {
    /// The Configuration's name.
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Sizing {
    #[default]
    Fixed,
    Predictive,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Revision whose pods the pool holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The `pod-template-hash` of that Revision's current ReplicaSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_hash: Option<String>,
    /// Warm pods that are loaded and can be handed off now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Warm pods, loaded or still loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// The pool size the sizing policy chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Warm pods handed to a Revision, in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoffs: Option<i64>,
    /// Revision pods that had to start cold because no warm pod was ready, in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misses: Option<i64>,
    /// The Revision's replica count when the controller last looked (to detect scale-ups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_revision_replicas: Option<i32>,
    /// Recent scale-ups of the Configuration, newest last (input of `predictive` sizing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_ups: Option<Vec<ScaleUp>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// Written by the autoscaler plugin (field manager `kinfer-autoscaler-plugin`), never by
    /// the pool controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand_forecast: Option<DemandForecast>,
}

/// One scale-up of the Configuration's Revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleUp {
    /// When the controller saw it (RFC 3339).
    pub at: String,
    /// How many pods the Revision grew by.
    pub pods: i32,
}

/// The autoscaler plugin's forecast of the Revision's replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DemandForecast {
    /// Replicas the Revision is expected to need within the horizon.
    pub replicas: i32,
    pub horizon_seconds: i64,
    /// When the forecast was made (RFC 3339).
    pub observed_at: String,
    /// What the forecast is based on, e.g. `prometheus`.
    pub source: String,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_names_and_columns() {
        let crd = WarmPool::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("warmpools.kinfer.dev"));
        assert_eq!(crd.spec.names.short_names, Some(vec!["wp".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert!(columns.starts_with(&[
            "Configuration",
            "Revision",
            "Ready",
            "Desired",
            "Handoffs"
        ]));
    }

    #[test]
    fn spec_defaults() {
        let spec: WarmPoolSpec =
            serde_json::from_value(serde_json::json!({"configurationRef": {"name": "m"}})).unwrap();
        assert_eq!(spec.min_ready, 1);
        assert_eq!(spec.max_ready(), 1);
        assert_eq!(spec.sizing, Sizing::Fixed);
        let spec: WarmPoolSpec = serde_json::from_value(serde_json::json!({
            "configurationRef": {"name": "m"}, "minReady": 3, "maxReady": 2, "sizing": "predictive"
        }))
        .unwrap();
        assert_eq!(
            spec.max_ready(),
            3,
            "maxReady below minReady is raised to it"
        );
        assert_eq!(spec.sizing, Sizing::Predictive);
    }

    #[test]
    fn status_without_forecast_never_mentions_it() {
        let status = WarmPoolStatus {
            revision: Some("m-00001".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert!(json.get("demandForecast").is_none(), "{json}");
    }
}
