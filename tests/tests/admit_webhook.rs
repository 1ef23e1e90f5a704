//! kinfer's admission webhook on the local control plane (`hack/with-cluster --kinfer`): the
//! real apiserver calls it over TLS through its Service, for the Deployments Knative creates
//! for revisions (whose Pods are then created already placed), for revision Pods of templates
//! it did not place, and for the Knative Services themselves.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod};
use kinfer_tests::knative::{self, ready};
use kinfer_tests::{client, namespace, pods, poll, unschedulable_message, wait_for};
use kube::api::{DynamicObject, PostParams};
use serde_json::json;

async fn create_ready(client: &kube::Client, ns: &str, svc: DynamicObject) -> anyhow::Result<()> {
    let services = knative::services(client, ns);
    let name = svc.metadata.name.clone().unwrap();
    services.create(&PostParams::default(), &svc).await?;
    wait_for(&services, &name, Duration::from_secs(120), ready).await?;
    Ok(())
}

/// The one Pod of a Service's revisions (waits for it to exist).
async fn service_pod(client: &kube::Client, ns: &str, service: &str) -> anyhow::Result<Pod> {
    let selector = format!("serving.knative.dev/service={service}");
    poll(Duration::from_secs(60), || async {
        Ok(!pods(client, ns, &selector).await?.is_empty())
    })
    .await?;
    Ok(pods(client, ns, &selector).await?.remove(0))
}

fn user_container(pod: &Pod) -> &Container {
    pod.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == "user-container")
        .expect("a user-container")
}

fn limit(c: &Container, resource: &str) -> Option<String> {
    c.resources
        .as_ref()?
        .limits
        .as_ref()?
        .get(resource)
        .map(|q| q.0.clone())
}

fn has_gpu_toleration(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .unwrap()
        .tolerations
        .iter()
        .flatten()
        .any(|t| {
            t.key.as_deref() == Some("nvidia.com/gpu")
                && t.operator.as_deref() == Some("Exists")
                && t.effect.as_deref() == Some("NoSchedule")
        })
}

fn init_container_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test]
async fn a_gpu_service_is_placed_on_the_80g_node() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "admit-gpu").await?;
    create_ready(
        &client,
        &ns,
        knative::service(
            "llm",
            json!({ "kinfer.dev/accelerator": "gpu", "kinfer.dev/model-memory": "40Gi" }),
        ),
    )
    .await?;
    let pod = service_pod(&client, &ns, "llm").await?;
    let spec = pod.spec.as_ref().unwrap();
    let user = user_container(&pod);
    assert_eq!(limit(user, "nvidia.com/gpu").as_deref(), Some("1"));
    assert!(has_gpu_toleration(&pod), "{:?}", spec.tolerations);
    assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
    // 40Gi = 40960 MiB: the node needs more than 40959 MiB per GPU, so only the 80 GB one.
    let terms = &spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("a required node affinity")
        .node_selector_terms;
    assert!(
        terms
            .iter()
            .all(|t| t.match_expressions.iter().flatten().any(|e| {
                e.key == "nvidia.com/gpu.memory"
                    && e.operator == "Gt"
                    && e.values.as_deref() == Some(&["40959".to_string()][..])
            })),
        "{terms:?}"
    );
    assert_eq!(spec.node_name.as_deref(), Some("gpu-node-80g"));
    // queue-proxy is left alone.
    let qp = spec
        .containers
        .iter()
        .find(|c| c.name == "queue-proxy")
        .unwrap();
    assert_eq!(limit(qp, "nvidia.com/gpu"), None);
    // The placement was made once, on the revision's Deployment: its template carries it, and
    // the Pod was created without a call to the webhook.
    let template = revision_template(&client, &ns, "llm").await?;
    let template_user = template
        .containers
        .iter()
        .find(|c| c.name == "user-container")
        .unwrap();
    assert_eq!(limit(template_user, "nvidia.com/gpu").as_deref(), Some("1"));
    assert_eq!(template.runtime_class_name.as_deref(), Some("nvidia"));
    assert_calls(&ns, 1, 0)?;
    // Give the GPU back for the tests that count them.
    delete_namespace(&client, &ns).await
}

async fn delete_namespace(client: &kube::Client, ns: &str) -> anyhow::Result<()> {
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .delete(ns, &Default::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_cpu_service_is_untouched() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "admit-cpu").await?;
    // Explicitly CPU (in the webhook's scope, so it is asked and must change nothing) and
    // without any kinfer annotation (never sent to the webhook): the Pods must agree.
    create_ready(
        &client,
        &ns,
        knative::service("cpu", json!({ "kinfer.dev/accelerator": "cpu" })),
    )
    .await?;
    create_ready(&client, &ns, knative::service("plain", json!({}))).await?;
    let cpu = service_pod(&client, &ns, "cpu").await?;
    let plain = service_pod(&client, &ns, "plain").await?;
    for pod in [&cpu, &plain] {
        let spec = pod.spec.as_ref().unwrap();
        let name = pod.metadata.name.as_deref().unwrap();
        for c in &spec.containers {
            assert_eq!(limit(c, "nvidia.com/gpu"), None, "{name}/{}", c.name);
            assert_eq!(limit(c, "nvidia.com/gpu.shared"), None, "{name}/{}", c.name);
        }
        assert_eq!(spec.runtime_class_name, None, "{name}");
        assert!(init_container_names(pod).is_empty(), "{name}");
        assert!(!has_gpu_toleration(pod), "{name}");
        // (Knative's own preferred anti-affinity is there; no node affinity from kinfer.)
        let node_affinity = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref());
        assert!(node_affinity.is_none(), "{name}: {node_affinity:?}");
        assert!(
            spec.node_name
                .as_deref()
                .is_some_and(|n| n.starts_with("cpu-node-")),
            "{name}: {:?}",
            spec.node_name
        );
    }
    // Field by field, the user container is the same as without kinfer.
    let (a, b) = (user_container(&cpu), user_container(&plain));
    assert_eq!(a.resources, b.resources);
    assert_eq!(a.command, b.command);
    assert_eq!(a.args, b.args);
    // (The service-account volume's name is random.)
    let paths = |c: &Container| -> Vec<String> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.clone())
            .collect()
    };
    assert_eq!(paths(a), paths(b));
    assert_eq!(a.image, b.image);
    let (sa, sb) = (cpu.spec.as_ref().unwrap(), plain.spec.as_ref().unwrap());
    assert_eq!(sa.tolerations, sb.tolerations);
    assert_eq!(sa.runtime_class_name, sb.runtime_class_name);
    assert_eq!(
        sa.volumes.as_ref().map(Vec::len),
        sb.volumes.as_ref().map(Vec::len)
    );
    Ok(())
}

#[tokio::test]
async fn bad_annotations_are_rejected_at_create() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "admit-bad").await?;
    let services = knative::services(&client, &ns);
    let cases = [
        (
            "typo",
            json!({ "kinfer.dev/acelerator": "gpu" }),
            "unknown annotation kinfer.dev/acelerator (did you mean kinfer.dev/accelerator?)",
        ),
        (
            "badvalue",
            json!({ "kinfer.dev/accelerator": "tpu" }),
            "annotation kinfer.dev/accelerator: invalid value \"tpu\": allowed: cpu, gpu, auto",
        ),
        (
            "badmemory",
            json!({ "kinfer.dev/accelerator": "gpu", "kinfer.dev/model-memory": "6GB" }),
            "annotation kinfer.dev/model-memory: invalid value \"6GB\": allowed: a positive memory quantity",
        ),
    ];
    for (name, annotations, expected) in cases {
        let err = services
            .create(&PostParams::default(), &knative::service(name, annotations))
            .await
            .expect_err("kinfer's webhook must reject it");
        let message = err.to_string();
        assert!(
            message.contains("services.kinfer.dev")
                && message.contains(&format!("Service {name}: "))
                && message.contains(expected),
            "{name}: {message}"
        );
        assert!(
            services.get_opt(name).await?.is_none(),
            "{name} was created"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_handler_pod_gets_the_wrapper() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "admit-handler").await?;
    create_ready(
        &client,
        &ns,
        knative::service("wrapped", json!({ "kinfer.dev/handler": "model:predict" })),
    )
    .await?;
    let pod = service_pod(&client, &ns, "wrapped").await?;
    let spec = pod.spec.as_ref().unwrap();
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "kinfer-wrapper-install")
        .expect("the wrapper's init container");
    assert_eq!(
        init.image.as_deref(),
        Some("ghcr.io/kinfer/kinfer-wrapper:latest")
    );
    assert_eq!(
        init.command.as_deref(),
        Some(&["/kinfer-wrapper", "install", "/kinfer/bin"].map(String::from)[..])
    );
    let user = user_container(&pod);
    assert_eq!(
        user.command.as_deref(),
        Some(&["/kinfer/bin/kinfer-wrapper".to_string()][..])
    );
    assert_eq!(
        user.args.as_deref(),
        Some(&["--handler", "model:predict", "--model-name", "wrapped"].map(String::from)[..])
    );
    // The image stays the user's, and the wrapper directory is shared with the init container.
    assert_eq!(user.image.as_deref(), Some("dev.local/model"));
    let mounted = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/kinfer")
            .map(|m| m.name.clone())
    };
    let volume = mounted(user).expect("/kinfer mounted in the user container");
    assert_eq!(mounted(init).as_deref(), Some(volume.as_str()));
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .any(|v| v.name == volume && v.empty_dir.is_some())
    );
    // No GPU for a CPU handler.
    assert_eq!(limit(user, "nvidia.com/gpu"), None);
    assert_eq!(spec.runtime_class_name, None);

    // The init container is there once, and the ServiceAccount plugin mounted the API token
    // into it as into the other containers (it came with the template).
    let names = init_container_names(&pod);
    assert_eq!(
        names
            .iter()
            .filter(|n| *n == "kinfer-wrapper-install")
            .count(),
        1,
        "{names:?}"
    );
    let user_token = token(user);
    assert_eq!(user_token.len(), 1, "{user_token:?}");
    assert_eq!(token(init), user_token);
    // Placed once on the revision's Deployment; the Pod needed no call.
    assert_calls(&ns, 1, 0)?;

    // A revision Pod made without a placed template (by hand here; a Deployment from before
    // kinfer was installed alike) is placed by the Pod webhook, in one call: the webhook gave
    // the init container the ServiceAccount plugin's own mount, so the plugin's rerun after
    // the patch changed nothing and the apiserver did not call again (IfNeeded).
    let direct: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "direct",
            "labels": { "serving.knative.dev/revision": "direct-00001" },
            "annotations": { "kinfer.dev/handler": "model:predict" }
        },
        "spec": { "containers": [{ "name": "user-container", "image": "dev.local/model" }] }
    }))?;
    let direct = kube::Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &direct)
        .await?;
    let names = init_container_names(&direct);
    assert_eq!(names, ["kinfer-wrapper-install"]);
    let user = user_container(&direct);
    let init = &direct
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[0];
    let user_token = token(user);
    assert_eq!(user_token.len(), 1, "{user_token:?}");
    assert_eq!(token(init), user_token);
    assert_calls(&ns, 1, 1)?;
    Ok(())
}

/// The pod template of the Deployment of a Service's (only) revision.
async fn revision_template(
    client: &kube::Client,
    ns: &str,
    service: &str,
) -> anyhow::Result<k8s_openapi::api::core::v1::PodSpec> {
    let list = kube::Api::<Deployment>::namespaced(client.clone(), ns)
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("serving.knative.dev/service={service}")),
        )
        .await?;
    let [deployment] = &list.items[..] else {
        anyhow::bail!("{} Deployments for {service}", list.items.len());
    };
    let template = &deployment.spec.template;
    let labels = template.metadata.as_ref().and_then(|m| m.labels.as_ref());
    assert_eq!(
        labels
            .and_then(|l| l.get("kinfer.dev/placed"))
            .map(String::as_str),
        Some("template")
    );
    Ok(template.spec.clone().unwrap())
}

/// The apiserver called `deployments.kinfer.dev` and `pods.kinfer.dev` this often for objects
/// in `ns`.
fn assert_calls(ns: &str, deployments: usize, pods: usize) -> anyhow::Result<()> {
    for (webhook, expected) in [("mutate-deployments", deployments), ("mutate-pods", pods)] {
        let calls = webhook_calls(ns, webhook)?;
        assert_eq!(
            calls.len(),
            expected,
            "the apiserver called {webhook} {} times:\n{}",
            calls.len(),
            calls.join("\n")
        );
    }
    Ok(())
}

const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The volumes a container has mounted at the API-token path.
fn token(c: &Container) -> Vec<String> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path == TOKEN_PATH)
        .map(|m| m.name.clone())
        .collect()
}

/// The webhook's log lines (one per call it answered) for objects in `ns`, from the log that
/// `hack/with-cluster` keeps for it.
fn webhook_calls(ns: &str, webhook: &str) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    let dir = std::env::var("KINFER_CLUSTER_DIR")
        .context("KINFER_CLUSTER_DIR is not set: run under hack/with-cluster --kinfer")?;
    let path = std::path::Path::new(&dir).join("logs/kinfer-webhook.log");
    let log = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
    let ns_field = [format!("namespace={ns} "), format!("namespace=\"{ns}\"")];
    Ok(log
        .lines()
        .filter(|l| {
            l.contains(&format!("webhook=\"{webhook}\""))
                || l.contains(&format!("webhook={webhook} "))
        })
        .filter(|l| ns_field.iter().any(|f| l.contains(f.as_str())))
        .map(str::to_string)
        .collect())
}

#[tokio::test]
async fn time_sliced_sharing_requests_the_shared_resource() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = namespace(&client, "admit-shared").await?;
    knative::services(&client, &ns)
        .create(
            &PostParams::default(),
            &knative::service(
                "shared",
                json!({ "kinfer.dev/accelerator": "gpu", "kinfer.dev/gpu-sharing": "time-sliced" }),
            ),
        )
        .await?;
    // No node advertises nvidia.com/gpu.shared, so the Pod is created (the webhook admitted
    // it) and waits, unschedulable, naming the resource.
    let mut pod = service_pod(&client, &ns, "shared").await?;
    let name = pod.metadata.name.clone().unwrap();
    let api = kube::Api::<Pod>::namespaced(client.clone(), &ns);
    pod = wait_for(&api, &name, Duration::from_secs(60), |p| {
        unschedulable_message(p).is_some()
    })
    .await?;
    let user = user_container(&pod);
    assert_eq!(limit(user, "nvidia.com/gpu.shared").as_deref(), Some("1"));
    assert_eq!(limit(user, "nvidia.com/gpu"), None);
    let message = unschedulable_message(&pod).unwrap();
    assert!(
        message.contains("Insufficient nvidia.com/gpu.shared"),
        "{message}"
    );
    assert!(has_gpu_toleration(&pod));
    assert_eq!(
        pod.spec.as_ref().unwrap().runtime_class_name.as_deref(),
        Some("nvidia")
    );
    delete_namespace(&client, &ns).await
}
