//! The admission routes called in-process, as the apiserver would call them.

use base64::Engine as _;
use serde_json::json;

use super::*;

fn admission() -> (Arc<Admission>, Registry) {
    let registry = Registry::new_custom(Some("kinfer_webhook".into()), None).unwrap();
    let metrics = Metrics::register(&registry).unwrap();
    let config = Arc::new(ArcSwap::from_pointee(KinferConfig::default()));
    (Admission::new(config, metrics), registry)
}

fn review(group: &str, version: &str, kind: &str, operation: &str, object: Value) -> Value {
    let resource = format!("{}s", kind.to_ascii_lowercase());
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": "default",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false
        }
    })
}

fn revision_pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "hello-00001-deployment-7c9d-",
            "namespace": "default",
            "labels": {
                "serving.knative.dev/revision": "hello-00001",
                "serving.knative.dev/service": "hello"
            },
            "annotations": annotations
        },
        "spec": {
            "containers": [
                {"name": "user-container", "image": "hello", "ports": [{"containerPort": 8080}]},
                {"name": "queue-proxy", "image": "queue"}
            ]
        }
    })
}

fn knative_service(annotations: Value) -> Value {
    json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"template": {
            "metadata": {"annotations": annotations},
            "spec": {"containers": [{"image": "hello"}]}
        }}
    })
}

struct Answer {
    status: u16,
    body: Value,
    text: String,
}

async fn post(admission: &Arc<Admission>, path: &str, body: impl AsRef<[u8]>) -> Answer {
    let routes = routes(admission.clone()).recover(recover);
    let res = warp::test::request()
        .method("POST")
        .path(path)
        .header("content-type", "application/json")
        .body(body)
        .reply(&routes)
        .await;
    let text = String::from_utf8_lossy(res.body()).to_string();
    Answer {
        status: res.status().as_u16(),
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

async fn admit(admission: &Arc<Admission>, path: &str, review: Value) -> Value {
    let answer = post(admission, path, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer.body["kind"], "AdmissionReview");
    let response = answer.body["response"].clone();
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    response
}

/// Applies the response's patch to `object` the way the apiserver does.
fn apply(response: &Value, mut object: Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(
            response["patch"]
                .as_str()
                .expect("patch is a base64 string"),
        )
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    json_patch::patch(&mut object, &patch).unwrap();
    object
}

#[tokio::test]
async fn gpu_revision_pod_is_patched() {
    let (admission, registry) = admission();
    let pod =
        revision_pod(json!({"kinfer.dev/accelerator": "gpu", "kinfer.dev/model-memory": "40Gi"}));
    let response = admit(
        &admission,
        "/mutate-pods",
        review("", "v1", "Pod", "CREATE", pod.clone()),
    )
    .await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("warnings").is_none(), "{response}");
    let pod = apply(&response, pod);
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert!(pod["spec"]["containers"][1].get("resources").is_none());
    assert_eq!(pod["spec"]["runtimeClassName"], "nvidia");
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "nvidia.com/gpu");
    assert_eq!(
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0],
        json!({"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40959"]})
    );

    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        metrics.contains(r#"kinfer_webhook_admissions_total{kind="Pod",operation="CREATE",result="patched",webhook="mutate-pods"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"kinfer_webhook_admission_duration_seconds_count{webhook="mutate-pods"} 1"#
        )
    );
}

#[tokio::test]
async fn warnings_reach_the_response() {
    let (admission, _) = admission();
    let mut pod = revision_pod(json!({"kinfer.dev/accelerator": "auto"}));
    pod["spec"]["runtimeClassName"] = json!("kata");
    let response = admit(
        &admission,
        "/mutate-pods",
        review("", "v1", "Pod", "CREATE", pod),
    )
    .await;
    let warnings = response["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("auto is placed like gpu")
    );
    assert!(
        warnings[1]
            .as_str()
            .unwrap()
            .contains("runtimeClassName kata; kept")
    );
}

#[tokio::test]
async fn pods_outside_scope_get_no_patch() {
    let (admission, _) = admission();
    let mut plain_pod = revision_pod(json!({"kinfer.dev/accelerator": "gpu"}));
    plain_pod["metadata"]["labels"] = json!({"app": "not-knative"});
    let cases = [
        ("not a revision pod", plain_pod),
        ("no kinfer annotations", revision_pod(json!({"other": "x"}))),
        (
            "cpu",
            revision_pod(json!({"kinfer.dev/accelerator": "cpu"})),
        ),
    ];
    for (what, pod) in cases {
        let response = admit(
            &admission,
            "/mutate-pods",
            review("", "v1", "Pod", "CREATE", pod),
        )
        .await;
        assert_eq!(response["allowed"], true, "{what}");
        assert!(response.get("patch").is_none(), "{what}: {response}");
        assert!(response.get("warnings").is_none(), "{what}: {response}");
    }
    // Updates are never mutated.
    let pod = revision_pod(json!({"kinfer.dev/accelerator": "gpu"}));
    let response = admit(
        &admission,
        "/mutate-pods",
        review("", "v1", "Pod", "UPDATE", pod),
    )
    .await;
    assert!(response.get("patch").is_none());
}

#[tokio::test]
async fn bad_annotations_on_a_pod_deny_it_with_the_message() {
    let (admission, _) = admission();
    let pod = revision_pod(json!({"kinfer.dev/accelerator": "tpu"}));
    let response = admit(
        &admission,
        "/mutate-pods",
        review("", "v1", "Pod", "CREATE", pod),
    )
    .await;
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    assert_eq!(
        response["status"]["message"],
        "kinfer: annotation kinfer.dev/accelerator: invalid value \"tpu\": allowed: cpu, gpu, auto"
    );
}

#[tokio::test]
async fn service_validation() {
    let (admission, registry) = admission();
    let ok = admit(
        &admission,
        "/validate-services",
        review(
            "serving.knative.dev",
            "v1",
            "Service",
            "CREATE",
            knative_service(json!({"kinfer.dev/accelerator": "gpu", "kinfer.dev/gpu-count": "2"})),
        ),
    )
    .await;
    assert_eq!(ok["allowed"], true);
    assert!(ok.get("patch").is_none());

    let bad = admit(
        &admission,
        "/validate-services",
        review(
            "serving.knative.dev",
            "v1",
            "Service",
            "CREATE",
            knative_service(json!({"kinfer.dev/acelerator": "gpu", "kinfer.dev/gpu-count": "2"})),
        ),
    )
    .await;
    assert_eq!(bad["allowed"], false);
    assert_eq!(
        bad["status"]["message"],
        "Service hello: unknown annotation kinfer.dev/acelerator (did you mean kinfer.dev/accelerator?); annotation kinfer.dev/gpu-count: \"2\" needs a GPU, but kinfer.dev/accelerator is cpu (the default); set kinfer.dev/accelerator: gpu (or auto), or remove kinfer.dev/gpu-count"
    );

    // Configurations are checked the same way, on UPDATE too.
    let mut config = knative_service(json!({"kinfer.dev/handler": "nocolon"}));
    config["kind"] = json!("Configuration");
    let bad = admit(
        &admission,
        "/validate-services",
        review(
            "serving.knative.dev",
            "v1",
            "Configuration",
            "UPDATE",
            config,
        ),
    )
    .await;
    assert_eq!(bad["allowed"], false);
    assert!(bad["status"]["message"].as_str().unwrap().starts_with(
        "Configuration hello: annotation kinfer.dev/handler: invalid value \"nocolon\""
    ));

    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(metrics.contains(r#"kinfer_webhook_admissions_total{kind="Service",operation="CREATE",result="denied",webhook="validate-services"} 1"#), "{metrics}");
}

#[tokio::test]
async fn service_validation_dry_runs_placement() {
    let (admission, _) = admission();
    let mut svc = knative_service(
        json!({"kinfer.dev/accelerator": "gpu", "kinfer.dev/handler": "model:predict"}),
    );
    svc["spec"]["template"]["spec"]["containers"][0]["resources"] =
        json!({"limits": {"nvidia.com/gpu": "4"}});
    svc["spec"]["template"]["spec"]["containers"][0]["command"] = json!(["python", "app.py"]);
    let response = admit(
        &admission,
        "/validate-services",
        review(
            "serving.knative.dev",
            "v1",
            "Service",
            "CREATE",
            svc.clone(),
        ),
    )
    .await;
    assert_eq!(response["allowed"], true);
    let warnings: Vec<&str> = response["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(
        warnings[0].contains("container user-container already has limits nvidia.com/gpu: 4; kept"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains(
            "runs the kinfer wrapper for model:predict instead of [\"python\", \"app.py\"]"
        )
    );

    svc["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "kinfer-wrapper", "emptyDir": {}}]);
    let response = admit(
        &admission,
        "/validate-services",
        review("serving.knative.dev", "v1", "Service", "CREATE", svc),
    )
    .await;
    assert_eq!(response["allowed"], false);
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("reserved for the kinfer wrapper")
    );
}

#[tokio::test]
async fn unknown_kinds_are_allowed_with_a_warning() {
    let (admission, _) = admission();
    let response = admit(
        &admission,
        "/mutate-pods",
        review(
            "apps",
            "v1",
            "Deployment",
            "CREATE",
            json!({"metadata": {"name": "d"}}),
        ),
    )
    .await;
    assert_eq!(response["allowed"], true);
    assert_eq!(
        response["warnings"][0],
        "kinfer-webhook: mutate-pods does not handle apps/v1 Deployment; admitted unchanged"
    );
    let response = admit(
        &admission,
        "/validate-services",
        review("", "v1", "Pod", "CREATE", revision_pod(json!({}))),
    )
    .await;
    assert_eq!(response["allowed"], true);
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("does not handle v1/Pod")
    );
}

#[tokio::test]
async fn malformed_truncated_and_empty_bodies_are_400() {
    let (admission, registry) = admission();
    let full = serde_json::to_vec(&review(
        "",
        "v1",
        "Pod",
        "CREATE",
        revision_pod(json!({"kinfer.dev/accelerator": "gpu"})),
    ))
    .unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            full[..full.len() / 2].to_vec(),
            "malformed AdmissionReview",
        ),
        ("not json", b"hello".to_vec(), "malformed AdmissionReview"),
        ("empty", Vec::new(), "malformed AdmissionReview"),
        (
            "wrong shape",
            br#"{"request": 5}"#.to_vec(),
            "malformed AdmissionReview",
        ),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "AdmissionReview has no request",
        ),
        (
            "no uid",
            br#"{"request": {"kind": {"group":"","version":"v1","kind":"Pod"}}}"#.to_vec(),
            "malformed AdmissionReview",
        ),
    ];
    for (what, body, want) in cases {
        let answer = post(&admission, "/mutate-pods", body).await;
        assert_eq!(answer.status, 400, "{what}: {}", answer.text);
        assert!(answer.text.contains(want), "{what}: {}", answer.text);
    }
    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        metrics.contains(r#"result="bad_request",webhook="mutate-pods"} 6"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversize_body_is_413() {
    let (admission, _) = admission();
    let mut pod = revision_pod(json!({"kinfer.dev/accelerator": "gpu"}));
    pod["metadata"]["annotations"]["big"] = json!("x".repeat(MAX_BODY_BYTES as usize));
    let body = serde_json::to_vec(&review("", "v1", "Pod", "CREATE", pod)).unwrap();
    let answer = post(&admission, "/mutate-pods", body).await;
    assert_eq!(answer.status, 413, "{}", answer.text);
    assert!(answer.text.contains("larger than 3145728 bytes"));
}

#[tokio::test]
async fn wrong_path_and_method() {
    let (admission, _) = admission();
    let answer = post(&admission, "/mutate-replicasets", "{}").await;
    assert_eq!(answer.status, 404);
    let routes = routes(admission.clone()).recover(recover);
    let res = warp::test::request()
        .method("GET")
        .path("/mutate-pods")
        .reply(&routes)
        .await;
    assert_eq!(res.status(), 405);
}

#[tokio::test]
async fn config_changes_apply_to_the_next_admission() {
    let (admission, _) = admission();
    admission.config.store(Arc::new(KinferConfig {
        runtime_class_name: Some("nvidia-cdi".into()),
        ..KinferConfig::default()
    }));
    let pod = revision_pod(json!({"kinfer.dev/accelerator": "gpu"}));
    let response = admit(
        &admission,
        "/mutate-pods",
        review("", "v1", "Pod", "CREATE", pod.clone()),
    )
    .await;
    assert_eq!(
        apply(&response, pod)["spec"]["runtimeClassName"],
        "nvidia-cdi"
    );
}

#[tokio::test]
async fn handler_pod_gets_the_wrapper() {
    let (admission, _) = admission();
    let pod = revision_pod(json!({"kinfer.dev/handler": "model:predict"}));
    let response = admit(
        &admission,
        "/mutate-pods",
        review("", "v1", "Pod", "CREATE", pod.clone()),
    )
    .await;
    let pod = apply(&response, pod);
    assert_eq!(
        pod["spec"]["initContainers"][0]["name"],
        "kinfer-wrapper-install"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["command"],
        json!(["/kinfer/bin/kinfer-wrapper"])
    );
    assert_eq!(
        pod["spec"]["containers"][0]["args"],
        json!(["--handler", "model:predict", "--model-name", "hello"])
    );
}

/// The Deployment Knative makes for a revision (trimmed), with `annotations` on its template.
fn revision_deployment(annotations: Value) -> Value {
    let labels = json!({
        "serving.knative.dev/revision": "hello-00001",
        "serving.knative.dev/revisionUID": "2f5c",
        "serving.knative.dev/service": "hello",
        "app": "hello-00001"
    });
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "hello-00001-deployment", "namespace": "default", "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"serving.knative.dev/revisionUID": "2f5c"}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {"containers": [
                    {"name": "user-container", "image": "hello", "ports": [{"containerPort": 8080}]},
                    {"name": "queue-proxy", "image": "queue"}
                ]}
            }
        }
    })
}

fn deployment_review(operation: &str, object: Value, old: Value) -> Value {
    let mut r = review("apps", "v1", "Deployment", operation, object);
    r["request"]["oldObject"] = old;
    r
}

#[tokio::test]
async fn a_revision_deployment_gets_its_pods_placement_on_the_template() {
    let (admission, registry) = admission();
    let annotations =
        json!({"kinfer.dev/accelerator": "gpu", "kinfer.dev/handler": "model:predict"});
    let deployment = revision_deployment(annotations.clone());
    let response = admit(
        &admission,
        "/mutate-deployments",
        deployment_review("CREATE", deployment.clone(), Value::Null),
    )
    .await;
    assert_eq!(response["allowed"], true);
    let placed = apply(&response, deployment.clone());
    let template = &placed["spec"]["template"];
    // What the Pod webhook gives such a Pod, on the template instead.
    let pod = apply(
        &admit(
            &admission,
            "/mutate-pods",
            review("", "v1", "Pod", "CREATE", revision_pod(annotations)),
        )
        .await,
        revision_pod(json!({})),
    );
    assert_eq!(template["spec"], pod["spec"]);
    assert_eq!(
        template["metadata"]["labels"]["kinfer.dev/placed"],
        "template"
    );
    // The rest of the Deployment is Knative's.
    assert_eq!(placed["metadata"], deployment["metadata"]);
    assert_eq!(placed["spec"]["selector"], deployment["spec"]["selector"]);

    // Knative rewrites the spec when its own wanted Deployment changes: the update is placed
    // again; an update that keeps the placement gets no patch.
    let stripped = deployment_review("UPDATE", deployment.clone(), placed.clone());
    let again = apply(
        &admit(&admission, "/mutate-deployments", stripped).await,
        deployment,
    );
    assert_eq!(again, placed);
    let kept = admit(
        &admission,
        "/mutate-deployments",
        deployment_review("UPDATE", placed.clone(), placed),
    )
    .await;
    assert_eq!(kept["allowed"], true);
    assert!(kept.get("patch").is_none(), "{kept}");

    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        metrics.contains(r#"kinfer_webhook_admissions_total{kind="Deployment",operation="UPDATE",result="allowed",webhook="mutate-deployments"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_cpu_revision_deployment_is_only_labelled_placed() {
    let (admission, _) = admission();
    let deployment = revision_deployment(json!({"kinfer.dev/accelerator": "cpu"}));
    let response = admit(
        &admission,
        "/mutate-deployments",
        deployment_review("CREATE", deployment.clone(), Value::Null),
    )
    .await;
    let mut expected = deployment.clone();
    expected["spec"]["template"]["metadata"]["labels"]["kinfer.dev/placed"] = json!("template");
    assert_eq!(apply(&response, deployment), expected);
}

#[tokio::test]
async fn a_deployment_that_cannot_be_placed_is_denied_with_the_reason() {
    let (admission, _) = admission();
    let mut deployment = revision_deployment(json!({"kinfer.dev/handler": "model:predict"}));
    deployment["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "kinfer-wrapper", "emptyDir": {}}]);
    let response = admit(
        &admission,
        "/mutate-deployments",
        deployment_review("CREATE", deployment, Value::Null),
    )
    .await;
    assert_eq!(response["allowed"], false);
    assert_eq!(
        response["status"]["message"],
        "kinfer: kinfer.dev/handler: the pod already has a volume named kinfer-wrapper; that name is reserved for the kinfer wrapper"
    );

    let bad = revision_deployment(json!({"kinfer.dev/gpu-count": "two"}));
    let response = admit(
        &admission,
        "/mutate-deployments",
        deployment_review("CREATE", bad, Value::Null),
    )
    .await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("kinfer.dev/gpu-count"), "{message}");
}

#[tokio::test]
async fn deployments_outside_the_scope_are_admitted_unchanged() {
    let (admission, _) = admission();
    // Not a revision's Deployment (no revision label): left alone even with kinfer annotations.
    let mut plain = revision_deployment(json!({"kinfer.dev/accelerator": "gpu"}));
    plain["metadata"]["labels"] = json!({"app": "plain"});
    let response = admit(
        &admission,
        "/mutate-deployments",
        deployment_review("CREATE", plain, Value::Null),
    )
    .await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    // A Pod sent to the Deployment route is allowed with a warning.
    let response = admit(
        &admission,
        "/mutate-deployments",
        review("", "v1", "Pod", "CREATE", revision_pod(json!({}))),
    )
    .await;
    assert_eq!(response["allowed"], true);
    assert_eq!(
        response["warnings"][0],
        "kinfer-webhook: mutate-deployments does not handle v1/Pod; admitted unchanged"
    );
}
