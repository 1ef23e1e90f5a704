//! The webhook configurations kinfer registers, built in code and applied with server-side
//! apply at start-up (and again whenever the CA bundle changes).
//!
//! Scope and failure policy, deliberately:
//! - **Deployments** (`MutatingWebhookConfiguration kinfer-webhook`, webhook
//!   `deployments.kinfer.dev`): a revision's placement is decided once, on the pod template of
//!   the Deployment Knative makes for it, so its Pods are created already placed and never
//!   wait for an admission call (scale-ups, warm pools). Sent: Deployments labelled
//!   `serving.knative.dev/revision` (objectSelector) whose template has a `kinfer.dev/`
//!   annotation, on CREATE, and on UPDATE only when the template changes (matchConditions).
//!   Knative rewrites the whole spec when its own wanted Deployment changes (a new queue-proxy
//!   image, say), which must not strip the placement; the KPA's scale patches leave the
//!   template alone, so they never reach the webhook and an outage cannot stop a revision
//!   from scaling. `Fail`: a new revision waits (its status says why) rather than run its
//!   Pods unplaced. `reinvocationPolicy: IfNeeded` as for Pods.
//! - **Pods** (same configuration, webhook `pods.kinfer.dev`): the fallback for revision Pods
//!   whose template was not placed (Deployments from before kinfer was installed, Pods made
//!   by hand). Only Pod CREATEs whose labels carry `serving.knative.dev/revision` and not
//!   `kinfer.dev/placed` (objectSelector) *and* whose annotations have a `kinfer.dev/` key (a
//!   CEL matchCondition, evaluated by the apiserver) are sent. Every other Pod never reaches
//!   the webhook, so an outage cannot block it.
//!   Inside that scope the policy is `Fail`: a GPU revision Pod admitted without its GPU,
//!   toleration and runtime class would run in the wrong place, so it waits instead; the
//!   ReplicaSet retries with back-off and the Pods appear once the webhook is back.
//!   `reinvocationPolicy: IfNeeded`: if a later webhook changes the Pod, kinfer looks again;
//!   the placement is idempotent, so a second pass adds nothing.
//! - **Services** (`ValidatingWebhookConfiguration kinfer-webhook`, webhook
//!   `services.kinfer.dev`): CREATE/UPDATE of `serving.knative.dev` Services and
//!   Configurations whose revision template has a `kinfer.dev/` annotation (matchCondition).
//!   Policy `Fail` too: a bad annotation must be rejected at `kn service create`, never first
//!   surface as a Pod that cannot be created. Services without kinfer annotations are never
//!   sent, so they do not depend on the webhook.
//! - No separate "managed" label is needed: the matchConditions give the exact scope
//!   without making the Pod webhook depend on the Service webhook having run.
//! - Both: `sideEffects: None` (dry-run safe), `timeoutSeconds: 5` (admission is sub-ms; a
//!   slow answer means trouble, and the apiserver's budget is shared), `kube-system` excluded.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::admission::{MUTATE_DEPLOYMENTS_PATH, MUTATE_PODS_PATH, VALIDATE_SERVICES_PATH};
use crate::placement::PLACED_LABEL;

/// Default name of both configurations (`--configuration-name`).
pub const CONFIGURATION_NAME: &str = "kinfer-webhook";
pub const POD_WEBHOOK: &str = "pods.kinfer.dev";
pub const DEPLOYMENT_WEBHOOK: &str = "deployments.kinfer.dev";
pub const SERVICE_WEBHOOK: &str = "services.kinfer.dev";
pub const FIELD_MANAGER: &str = "kinfer-webhook";
pub const TIMEOUT: Duration = Duration::from_secs(5);

const POD_CONDITION: &str = "has(object.metadata.annotations) && object.metadata.annotations.exists(k, k.startsWith('kinfer.dev/'))";
const TEMPLATE_CONDITION: &str = "has(object.spec.template.metadata) && has(object.spec.template.metadata.annotations) && object.spec.template.metadata.annotations.exists(k, k.startsWith('kinfer.dev/'))";
/// CREATE, or an UPDATE that touches the pod template (not a scale patch).
const TEMPLATE_CHANGED_CONDITION: &str =
    "request.operation == 'CREATE' || object.spec.template != oldObject.spec.template";
const SERVICE_CONDITION: &str = "has(object.spec) && has(object.spec.template) && has(object.spec.template.metadata) && has(object.spec.template.metadata.annotations) && object.spec.template.metadata.annotations.exists(k, k.startsWith('kinfer.dev/'))";

/// Where the apiserver sends admissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// In cluster: the webhook's Service.
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    /// Out of cluster (local runs): `https://127.0.0.1:8443`; paths are appended.
    Url(String),
}

impl Target {
    fn client_config(&self, path: &str, ca_bundle: Option<&[u8]>) -> Value {
        let mut config = match self {
            Target::Service {
                namespace,
                name,
                port,
            } => {
                json!({"service": {"namespace": namespace, "name": name, "path": format!("/{path}"), "port": port}})
            }
            Target::Url(base) => json!({"url": format!("{}/{path}", base.trim_end_matches('/'))}),
        };
        if let Some(ca) = ca_bundle {
            use base64::Engine as _;
            config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
        }
        config
    }
}

fn common(webhook: &str, target: &Target, path: &str, ca_bundle: Option<&[u8]>) -> Value {
    json!({
        "name": webhook,
        "admissionReviewVersions": ["v1"],
        "clientConfig": target.client_config(path, ca_bundle),
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
        "timeoutSeconds": TIMEOUT.as_secs(),
        "namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}
        ]},
    })
}

/// The Pod and Deployment webhook configuration.
pub fn mutating(
    name: &str,
    target: &Target,
    ca_bundle: Option<&[u8]>,
) -> MutatingWebhookConfiguration {
    let mut pods = common(POD_WEBHOOK, target, MUTATE_PODS_PATH, ca_bundle);
    merge(
        &mut pods,
        json!({
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "objectSelector": {"matchExpressions": [
                {"key": "serving.knative.dev/revision", "operator": "Exists"},
                {"key": PLACED_LABEL, "operator": "DoesNotExist"},
            ]},
            "matchConditions": [{"name": "has-kinfer-annotations", "expression": POD_CONDITION}],
            "reinvocationPolicy": "IfNeeded",
        }),
    );
    let mut deployments = common(
        DEPLOYMENT_WEBHOOK,
        target,
        MUTATE_DEPLOYMENTS_PATH,
        ca_bundle,
    );
    merge(
        &mut deployments,
        json!({
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["apps"], "apiVersions": ["v1"], "resources": ["deployments"], "scope": "Namespaced"}],
            "objectSelector": {"matchExpressions": [{"key": "serving.knative.dev/revision", "operator": "Exists"}]},
            "matchConditions": [
                {"name": "has-kinfer-annotations", "expression": TEMPLATE_CONDITION},
                {"name": "template-changed", "expression": TEMPLATE_CHANGED_CONDITION},
            ],
            "reinvocationPolicy": "IfNeeded",
        }),
    );
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
        "webhooks": [pods, deployments],
    }))
    .expect("a valid MutatingWebhookConfiguration")
}

/// The Service/Configuration webhook configuration.
pub fn validating(
    name: &str,
    target: &Target,
    ca_bundle: Option<&[u8]>,
) -> ValidatingWebhookConfiguration {
    let mut webhook = common(SERVICE_WEBHOOK, target, VALIDATE_SERVICES_PATH, ca_bundle);
    let extra = json!({
        "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["serving.knative.dev"], "apiVersions": ["v1"], "resources": ["services", "configurations"], "scope": "Namespaced"}],
        "matchConditions": [{"name": "has-kinfer-annotations", "expression": SERVICE_CONDITION}],
    });
    merge(&mut webhook, extra);
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
        "webhooks": [webhook],
    }))
    .expect("a valid ValidatingWebhookConfiguration")
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// Applies both configurations, named `name` (server-side apply, forced: kinfer owns them).
pub async fn apply(
    client: &Client,
    name: &str,
    target: &Target,
    ca_bundle: Option<&[u8]>,
) -> anyhow::Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let m = mutating(name, target, ca_bundle);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(name, &params, &Patch::Apply(&m))
        .await
        .with_context(|| format!("applying MutatingWebhookConfiguration {name}"))?;
    let v = validating(name, target, ca_bundle);
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(name, &params, &Patch::Apply(&v))
        .await
        .with_context(|| format!("applying ValidatingWebhookConfiguration {name}"))?;
    tracing::info!(
        configuration = name,
        ?target,
        ca_bundle = ca_bundle.is_some(),
        "webhook configurations applied"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Target {
        Target::Service {
            namespace: "kinfer-system".into(),
            name: "kinfer-webhook".into(),
            port: 443,
        }
    }

    #[test]
    fn pod_webhook_is_scoped_and_fails_closed_inside_scope() {
        let m = mutating(CONFIGURATION_NAME, &service(), Some(b"CA"));
        let w = &m.webhooks.as_ref().unwrap()[0];
        assert_eq!(w.name, "pods.kinfer.dev");
        assert_eq!(w.side_effects, "None");
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(w.timeout_seconds, Some(5));
        assert_eq!(w.reinvocation_policy.as_deref(), Some("IfNeeded"));
        assert_eq!(w.admission_review_versions, ["v1"]);
        let selector = w.object_selector.as_ref().unwrap();
        let exprs: Vec<_> = selector
            .match_expressions
            .iter()
            .flatten()
            .map(|e| (e.key.as_str(), e.operator.as_str()))
            .collect();
        assert_eq!(
            exprs,
            [
                ("serving.knative.dev/revision", "Exists"),
                ("kinfer.dev/placed", "DoesNotExist")
            ]
        );
        let cond = &w.match_conditions.as_ref().unwrap()[0];
        assert!(cond.expression.contains("startsWith('kinfer.dev/')"));
        let rule = &w.rules.as_ref().unwrap()[0];
        assert_eq!(
            rule.operations.as_deref(),
            Some(&["CREATE".to_string()][..])
        );
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_string()][..]));
        let svc = w.client_config.service.as_ref().unwrap();
        assert_eq!(svc.path.as_deref(), Some("/mutate-pods"));
        assert_eq!(svc.port, Some(443));
        assert_eq!(w.client_config.ca_bundle.as_ref().unwrap().0, b"CA");
        // Serialized the way the apiserver wants it: caBundle base64.
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["webhooks"][0]["clientConfig"]["caBundle"], "Q0E=");
        assert_eq!(json["kind"], "MutatingWebhookConfiguration");
    }

    #[test]
    fn deployment_webhook_sees_template_changes_of_revision_deployments_only() {
        let m = mutating(CONFIGURATION_NAME, &service(), None);
        let w = &m.webhooks.as_ref().unwrap()[1];
        assert_eq!(w.name, "deployments.kinfer.dev");
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(w.side_effects, "None");
        let rule = &w.rules.as_ref().unwrap()[0];
        assert_eq!(
            rule.operations.as_deref(),
            Some(&["CREATE".to_string(), "UPDATE".to_string()][..])
        );
        assert_eq!(rule.api_groups.as_deref(), Some(&["apps".to_string()][..]));
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["deployments".to_string()][..])
        );
        let expr = &w
            .object_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap()[0];
        assert_eq!(expr.key, "serving.knative.dev/revision");
        let conditions: Vec<_> = w
            .match_conditions
            .iter()
            .flatten()
            .map(|c| c.expression.as_str())
            .collect();
        assert!(conditions[0].contains("object.spec.template.metadata.annotations.exists"));
        assert!(conditions[1].contains("object.spec.template != oldObject.spec.template"));
        let svc = w.client_config.service.as_ref().unwrap();
        assert_eq!(svc.path.as_deref(), Some("/mutate-deployments"));
    }

    #[tokio::test]
    async fn apply_uses_server_side_apply_for_both() {
        let (client, state) = crate::fake_api::client();
        apply(
            &client,
            CONFIGURATION_NAME,
            &Target::Url("https://127.0.0.1:8443".into()),
            Some(b"PEM"),
        )
        .await
        .unwrap();
        let st = state.lock().unwrap();
        assert_eq!(
            st.log,
            [
                "PATCH /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/kinfer-webhook?&force=true&fieldManager=kinfer-webhook",
                "PATCH /apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/kinfer-webhook?&force=true&fieldManager=kinfer-webhook",
            ]
        );
        let m = &st.objects["/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/kinfer-webhook"];
        assert_eq!(
            m["webhooks"][0]["clientConfig"]["url"],
            "https://127.0.0.1:8443/mutate-pods"
        );
        assert_eq!(m["webhooks"][0]["clientConfig"]["caBundle"], "UEVN");
    }

    #[test]
    fn service_webhook_validates_knative_services_and_configurations() {
        let v = validating(
            "kinfer-webhook-test",
            &Target::Url("https://127.0.0.1:8443/".into()),
            None,
        );
        assert_eq!(v.metadata.name.as_deref(), Some("kinfer-webhook-test"));
        let w = &v.webhooks.as_ref().unwrap()[0];
        assert_eq!(w.name, "services.kinfer.dev");
        assert_eq!(
            w.client_config.url.as_deref(),
            Some("https://127.0.0.1:8443/validate-services")
        );
        assert!(w.client_config.ca_bundle.is_none());
        assert!(w.client_config.service.is_none());
        let rule = &w.rules.as_ref().unwrap()[0];
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&["serving.knative.dev".to_string()][..])
        );
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["services".to_string(), "configurations".to_string()][..])
        );
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        assert!(
            w.match_conditions.as_ref().unwrap()[0]
                .expression
                .contains("object.spec.template.metadata.annotations.exists")
        );
    }
}
