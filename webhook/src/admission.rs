//! The admission HTTP API: warp filters that take an `AdmissionReview` (v1) and answer one.
//!
//! | route | webhook | objects |
//! |---|---|---|
//! | `POST /mutate-deployments` | mutating `deployments.kinfer.dev` | Deployments of Knative revisions whose pod template has `kinfer.dev/*` annotations |
//! | `POST /mutate-pods` | mutating `pods.kinfer.dev` | Pods of Knative revisions with `kinfer.dev/*` annotations whose template was not placed |
//! | `POST /validate-services` | validating `services.kinfer.dev` | `serving.knative.dev` Services and Configurations |
//!
//! Bad input never crashes it: a body that is not an AdmissionReview (malformed, truncated,
//! no `request`) gets 400, a body over [`MAX_BODY_BYTES`] gets 413. A kind a route does not
//! handle is allowed unchanged, with a warning. Every answer carries the request uid, is
//! logged with it and counted in `kinfer_webhook_admissions_total`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use json_patch::Patch;
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde_json::Value;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use crate::annotations::{self, Parsed};
use crate::config::KinferConfig;
use crate::placement;

/// Largest AdmissionReview accepted. The apiserver's own object limit is 3 MiB (etcd's
/// request limit is 1.5 MiB), and a review carries the object once for CREATE.
pub const MAX_BODY_BYTES: u64 = 3 * 1024 * 1024;

pub const MUTATE_DEPLOYMENTS_PATH: &str = "mutate-deployments";
pub const MUTATE_PODS_PATH: &str = "mutate-pods";
pub const VALIDATE_SERVICES_PATH: &str = "validate-services";

const REVISION_LABEL: &str = "serving.knative.dev/revision";
const KNATIVE_GROUP: &str = "serving.knative.dev";

/// The current `kinfer-config`, swapped whole when the ConfigMap changes.
pub type SharedConfig = Arc<ArcSwap<KinferConfig>>;

/// Counters and latency of admissions, registered in the admin server's registry.
#[derive(Clone)]
pub struct Metrics {
    admissions: IntCounterVec,
    duration: HistogramVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let admissions = IntCounterVec::new(
            Opts::new(
                "admissions_total",
                "Admission requests answered, by webhook, operation, kind and result (patched, allowed, denied, ignored, bad_request, too_large)",
            ),
            &["webhook", "operation", "kind", "result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "admission_duration_seconds",
                "Time from request to answer, body reading included",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5,
            ]),
            &["webhook"],
        )?;
        registry.register(Box::new(admissions.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            admissions,
            duration,
        })
    }

    fn record(&self, webhook: &str, operation: &str, kind: &str, result: &str, since: Instant) {
        self.admissions
            .with_label_values(&[webhook, operation, kind, result])
            .inc();
        self.duration
            .with_label_values(&[webhook])
            .observe(since.elapsed().as_secs_f64());
    }
}

pub struct Admission {
    pub config: SharedConfig,
    pub metrics: Metrics,
}

impl Admission {
    pub fn new(config: SharedConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self { config, metrics })
    }
}

#[derive(Clone, Copy, Debug)]
enum Webhook {
    MutateDeployments,
    MutatePods,
    ValidateServices,
}

impl Webhook {
    fn name(self) -> &'static str {
        match self {
            Webhook::MutateDeployments => MUTATE_DEPLOYMENTS_PATH,
            Webhook::MutatePods => MUTATE_PODS_PATH,
            Webhook::ValidateServices => VALIDATE_SERVICES_PATH,
        }
    }
}

/// All admission routes. Unknown paths get 404, other methods 405 (warp's defaults).
pub fn routes(
    admission: Arc<Admission>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let with = move |webhook: Webhook| {
        let admission = admission.clone();
        warp::post()
            .and(warp::path(webhook.name()))
            .and(warp::path::end())
            .and(warp::header::optional::<u64>("content-length"))
            .and(warp::body::stream())
            .then(move |length: Option<u64>, body| {
                let admission = admission.clone();
                async move { admission.handle(webhook, length, body).await }
            })
    };
    with(Webhook::MutatePods)
        .or(with(Webhook::MutateDeployments))
        .unify()
        .or(with(Webhook::ValidateServices))
        .unify()
}

/// Reads at most [`MAX_BODY_BYTES`].
async fn read_body<S, B>(length: Option<u64>, body: S) -> Result<Bytes, (StatusCode, String)>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("AdmissionReview larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    if length.is_some_and(|l| l > MAX_BODY_BYTES) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(length.unwrap_or(16 * 1024) as usize);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )
        })?;
        if (buf.len() + chunk.remaining()) as u64 > MAX_BODY_BYTES {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

fn plain(status: StatusCode, message: String) -> Response {
    warp::reply::with_status(message, status).into_response()
}

/// What to answer, before it becomes an AdmissionResponse.
struct Verdict {
    result: &'static str,
    denied: Option<String>,
    patch: Option<Patch>,
    warnings: Vec<String>,
}

impl Verdict {
    fn allow() -> Self {
        Self {
            result: "allowed",
            denied: None,
            patch: None,
            warnings: Vec::new(),
        }
    }

    fn ignore(warning: String) -> Self {
        Self {
            result: "ignored",
            warnings: vec![warning],
            ..Self::allow()
        }
    }

    fn deny(message: String, warnings: Vec<String>) -> Self {
        Self {
            result: "denied",
            denied: Some(message),
            patch: None,
            warnings,
        }
    }
}

impl Admission {
    async fn handle<S, B>(&self, webhook: Webhook, length: Option<u64>, body: S) -> Response
    where
        S: Stream<Item = Result<B, warp::Error>>,
        B: Buf,
    {
        let start = Instant::now();
        let name = webhook.name();
        let body = match read_body(length, body).await {
            Ok(b) => b,
            Err((status, message)) => {
                let result = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "bad_request"
                };
                tracing::warn!(webhook = name, %status, "{message}");
                self.metrics.record(name, "", "", result, start);
                return plain(status, message);
            }
        };
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("malformed AdmissionReview: {e}");
                tracing::warn!(webhook = name, "{message}");
                self.metrics.record(name, "", "", "bad_request", start);
                return plain(StatusCode::BAD_REQUEST, message);
            }
        };
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(_) => {
                let message = "AdmissionReview has no request".to_string();
                tracing::warn!(webhook = name, "{message}");
                self.metrics.record(name, "", "", "bad_request", start);
                return plain(StatusCode::BAD_REQUEST, message);
            }
        };

        let config = self.config.load();
        let verdict = match webhook {
            Webhook::MutateDeployments => mutate_deployment(&request, &config),
            Webhook::MutatePods => mutate_pod(&request, &config),
            Webhook::ValidateServices => validate_service(&request, &config),
        };

        let operation = operation_name(&request.operation);
        let kind = request.kind.kind.as_str();
        let object = request.name.as_str();
        let namespace = request.namespace.as_deref().unwrap_or_default();
        match (&verdict.denied, &verdict.patch) {
            (Some(message), _) => tracing::info!(
                uid = %request.uid, webhook = name, operation, kind, namespace, object,
                "denied: {message}"
            ),
            (None, Some(patch)) => tracing::info!(
                uid = %request.uid, webhook = name, operation, kind, namespace, object,
                operations = patch.0.len(), warnings = ?verdict.warnings, "patched"
            ),
            // Info like the others: only kinfer objects reach the webhook, and one line per
            // call lets an operator (and the admit_webhook test) see every call the apiserver
            // makes, reinvocations included.
            (None, None) => tracing::info!(
                uid = %request.uid, webhook = name, operation, kind, namespace, object,
                result = verdict.result, warnings = ?verdict.warnings, "allowed"
            ),
        }
        self.metrics
            .record(name, operation, kind, verdict.result, start);

        let mut response = AdmissionResponse::from(&request);
        if let Some(message) = verdict.denied {
            response = response.deny(message);
            response.result.code = 403;
            response.result.reason = "Forbidden".into();
        }
        if !verdict.warnings.is_empty() {
            response.warnings = Some(verdict.warnings);
        }
        review_reply(response, verdict.patch)
    }
}

/// Serializes the answer with the patch base64-encoded, as the API defines `[]byte` in JSON
/// (kube-core's `with_patch` writes an array of numbers, kube-rs/kube#1781).
fn review_reply(response: AdmissionResponse, patch: Option<Patch>) -> Response {
    use base64::Engine as _;
    let encoded = serde_json::to_value(response.into_review()).and_then(|mut value| {
        if let Some(patch) = patch
            && let Some(response) = value.get_mut("response").and_then(Value::as_object_mut)
        {
            let b64 = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&patch)?);
            response.insert("patchType".into(), Value::String("JSONPatch".into()));
            response.insert("patch".into(), Value::String(b64));
        }
        Ok(value)
    });
    match encoded {
        Ok(value) => warp::reply::json(&value).into_response(),
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serializing the AdmissionReview: {e}"),
        ),
    }
}

fn operation_name(op: &Operation) -> &'static str {
    match op {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn mutate_pod(request: &AdmissionRequest<DynamicObject>, config: &KinferConfig) -> Verdict {
    let gvk = &request.kind;
    if !(gvk.group.is_empty() && gvk.kind == "Pod") {
        return not_handled(MUTATE_PODS_PATH, gvk);
    }
    if request.operation != Operation::Create {
        return Verdict::allow();
    }
    let Some(object) = &request.object else {
        return Verdict::allow();
    };
    let meta = &object.metadata;
    let in_scope = meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(REVISION_LABEL))
        && meta
            .annotations
            .as_ref()
            .is_some_and(|a| annotations::has_kinfer_annotations(a.keys()));
    if !in_scope {
        return Verdict::allow();
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let Parsed { spec, warnings } = match annotations::parse(&annotations) {
        Ok(p) => p,
        Err(errors) => return Verdict::deny(format!("kinfer: {errors}"), Vec::new()),
    };
    // Nothing to place (e.g. `accelerator: cpu` alone): answer without decoding the whole Pod,
    // which is most of the handler's time for a Pod it leaves alone.
    if spec.is_noop() {
        return Verdict {
            warnings,
            ..Verdict::allow()
        };
    }
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => return Verdict::deny(format!("kinfer: the Pod does not decode: {e}"), warnings),
    };
    patched(placement::place(&spec, config, &pod), warnings)
}

/// Places the pod template of a Knative revision's Deployment, on CREATE and on any UPDATE
/// that changes the template (Knative rewrites the whole spec when its own wanted Deployment
/// changes, and that must not strip the placement; the webhook configuration's
/// matchCondition keeps scale patches away). Idempotent: an already placed template gets no
/// patch. A template that cannot be placed denies the Deployment, and Knative shows the
/// message in the revision's status.
fn mutate_deployment(request: &AdmissionRequest<DynamicObject>, config: &KinferConfig) -> Verdict {
    let gvk = &request.kind;
    if !(gvk.group == "apps" && gvk.kind == "Deployment") {
        return not_handled(MUTATE_DEPLOYMENTS_PATH, gvk);
    }
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return Verdict::allow();
    }
    let Some(object) = &request.object else {
        return Verdict::allow();
    };
    let is_revision = object
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(REVISION_LABEL));
    let (template, annotations) = template_annotations(object);
    if !is_revision || !annotations::has_kinfer_annotations(annotations.keys()) {
        return Verdict::allow();
    }
    let Parsed { spec, warnings } = match annotations::parse(&annotations) {
        Ok(p) => p,
        Err(errors) => return Verdict::deny(format!("kinfer: {errors}"), Vec::new()),
    };
    let template: PodTemplateSpec = match template.cloned().map(serde_json::from_value) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            return Verdict::deny(
                format!("kinfer: the Deployment's pod template does not decode: {e}"),
                warnings,
            );
        }
        None => return Verdict::allow(),
    };
    patched(
        placement::place_template(&spec, config, &template),
        warnings,
    )
}

/// The verdict for a placement: denied with its error, or admitted with its patch (if any)
/// and every warning.
fn patched(
    placed: Result<placement::Mutation, placement::PlacementError>,
    warnings: Vec<String>,
) -> Verdict {
    match placed {
        Err(e) => Verdict::deny(format!("kinfer: {e}"), warnings),
        Ok(mutation) => {
            let (patch, mut more) = mutation.into_patch();
            let mut all = warnings;
            all.append(&mut more);
            if patch.0.is_empty() {
                Verdict {
                    warnings: all,
                    ..Verdict::allow()
                }
            } else {
                Verdict {
                    result: "patched",
                    denied: None,
                    patch: Some(patch),
                    warnings: all,
                }
            }
        }
    }
}

/// The answer for a kind a route does not handle: allowed unchanged, with a warning.
fn not_handled(path: &str, gvk: &kube::core::GroupVersionKind) -> Verdict {
    Verdict::ignore(format!(
        "kinfer-webhook: {path} does not handle {}; admitted unchanged",
        describe(gvk)
    ))
}

/// `spec.template` of a Deployment, Service or Configuration, and its annotations.
fn template_annotations(object: &DynamicObject) -> (Option<&Value>, BTreeMap<String, String>) {
    let template = object.data.get("spec").and_then(|s| s.get("template"));
    let annotations = string_map(
        template
            .and_then(|t| t.get("metadata"))
            .and_then(|m| m.get("annotations")),
    );
    (template, annotations)
}

fn describe(gvk: &kube::core::GroupVersionKind) -> String {
    if gvk.group.is_empty() {
        format!("{}/{}", gvk.version, gvk.kind)
    } else {
        format!("{}/{} {}", gvk.group, gvk.version, gvk.kind)
    }
}

/// Validates the revision template of a Knative Service or Configuration: the annotations,
/// then a dry run of the Pod placement on the template, so that what would make the Pod fail
/// (or what kinfer would keep of the user's settings) is said at `kn service create` time.
fn validate_service(request: &AdmissionRequest<DynamicObject>, config: &KinferConfig) -> Verdict {
    let gvk = &request.kind;
    if !(gvk.group == KNATIVE_GROUP && ["Service", "Configuration"].contains(&gvk.kind.as_str())) {
        return not_handled(VALIDATE_SERVICES_PATH, gvk);
    }
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return Verdict::allow();
    }
    let Some(object) = &request.object else {
        return Verdict::allow();
    };
    let (template, annotations) = template_annotations(object);
    if !annotations::has_kinfer_annotations(annotations.keys()) {
        return Verdict::allow();
    }
    let what = format!(
        "{} {}",
        gvk.kind,
        object.metadata.name.as_deref().unwrap_or(&request.name)
    );
    let Parsed { spec, mut warnings } = match annotations::parse(&annotations) {
        Ok(p) => p,
        Err(errors) => return Verdict::deny(format!("{what}: {errors}"), Vec::new()),
    };
    if let Some(pod) = template_pod(template, &annotations, &object.metadata.name) {
        match placement::place(&spec, config, &pod) {
            Err(e) => return Verdict::deny(format!("{what}: {e}"), warnings),
            Ok(m) => warnings.extend(m.warnings),
        }
    }
    Verdict {
        warnings,
        ..Verdict::allow()
    }
}

/// The Pod a revision of this template would get, as far as placement cares. Knative lets the
/// container name default (to `user-container`), so missing names are filled in.
fn template_pod(
    template: Option<&Value>,
    annotations: &BTreeMap<String, String>,
    service: &Option<String>,
) -> Option<Pod> {
    let mut spec = template?.get("spec")?.clone();
    let containers = spec.get_mut("containers")?.as_array_mut()?;
    for (i, c) in containers.iter_mut().enumerate() {
        let c = c.as_object_mut()?;
        if !c.contains_key("name") {
            let name = if i == 0 {
                "user-container".to_string()
            } else {
                format!("container-{i}")
            };
            c.insert("name".into(), Value::String(name));
        }
    }
    let spec: PodSpec = serde_json::from_value(spec).ok()?;
    let mut pod = Pod {
        spec: Some(spec),
        ..Pod::default()
    };
    pod.metadata.annotations = Some(annotations.clone());
    if let Some(s) = service {
        pod.metadata.labels = Some(BTreeMap::from([(
            "serving.knative.dev/service".to_string(),
            s.clone(),
        )]));
    }
    Some(pod)
}

/// Turns every rejection into a plain-text answer, so clients never see an empty body.
pub async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let (status, message) = if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "not found".to_string())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST".to_string(),
        )
    } else {
        (StatusCode::BAD_REQUEST, format!("{rejection:?}"))
    };
    Ok(plain(status, message))
}

#[cfg(test)]
mod tests;
