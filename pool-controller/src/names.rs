//! Well-known label, annotation and condition names the pool controller reads and writes.

/// On every pod the pool made: the WarmPool's name.
pub const POOL_LABEL: &str = "kinfer.dev/warmpool";
/// On every pod the pool made: `warm` until handed off, then `handed-off`.
pub const STATE_LABEL: &str = "kinfer.dev/pool-state";
pub const STATE_WARM: &str = "warm";
pub const STATE_HANDED_OFF: &str = "handed-off";
pub use kinfer_core::warmpool::{HANDOFF_TIME_ANNOTATION, TEMPLATE_HASH_ANNOTATION};
/// The readiness gate every pool pod carries from creation: the pod turns Ready only when
/// the controller has seen that it serves the revision it was handed to.
pub const SERVED_GATE: &str = "kinfer.dev/served";

/// Knative's labels.
pub const REVISION_UID_LABEL: &str = "serving.knative.dev/revisionUID";
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";
pub const CONFIGURATION_LABEL: &str = "serving.knative.dev/configuration";
/// The Deployment controller's label on ReplicaSets and their pods.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
/// The ReplicaSet deletes pods with a lower cost first when it has too many.
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The cost a handed-off pod carries, so the cold pod it replaces is the one deleted.
pub const HANDED_OFF_DELETION_COST: &str = "1000";
/// The Deployment controller's revision annotation on ReplicaSets.
pub const DEPLOYMENT_REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
