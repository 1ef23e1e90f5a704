//! The placement decision: (what the annotations ask for, cluster defaults, the Pod as
//! admitted) → a minimal JSON Patch plus warnings. Pure: no I/O.
//!
//! Rules:
//! - Only the *user container* changes: the one named by Knative's
//!   `kubectl.kubernetes.io/default-container` annotation, else the non-sidecar container that
//!   declares a port, else the first non-sidecar container (`queue-proxy`, `istio-proxy` and
//!   `linkerd-proxy` are sidecars).
//! - GPU (`accelerator: gpu|auto`): `gpu-count` of the resource in the user container's limits
//!   (`gpu-resource` annotation, else the shared resource for `time-sliced`, else the default),
//!   the GPU toleration and runtimeClassName from `kinfer-config`, and with `model-memory` a
//!   required node affinity `<gpu-memory-node-label> Gt <MiB - 1>` added to every
//!   nodeSelectorTerm (terms are ORed, so every alternative must have enough memory).
//! - What the user already set is kept: a different limit, toleration, runtime class or
//!   memory expression stays and is reported in a warning; an identical one is left alone
//!   silently, which also makes the patch of an already-mutated Pod empty (reinvocation).
//! - Wrapper (`handler`): an init container copies the wrapper from the wrapper image into an
//!   `emptyDir` (`<wrapper-source> install <path>/bin`), mounted read-only in the user
//!   container, whose command becomes `<path>/bin/kinfer-wrapper --handler m:f`. Image,
//!   working directory, env, ports, volumes and probes stay. When the ServiceAccount admission
//!   plugin has mounted the API token into the Pod's containers, the init container gets the
//!   same mount (see [`service_account_mount`]).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::{Value, json};

use crate::annotations::{GpuSharing, KinferSpec};
use crate::config::KinferConfig;

/// Name of the volume and init container that carry the wrapper.
pub const WRAPPER_VOLUME: &str = "kinfer-wrapper";
pub const WRAPPER_INIT_CONTAINER: &str = "kinfer-wrapper-install";
/// Where the wrapper lands inside the shared volume: `install` copies it into `bin/`.
pub const WRAPPER_BINARY: &str = "bin/kinfer-wrapper";
/// Containers that are never the user's.
pub const SIDECARS: &[&str] = &["queue-proxy", "istio-proxy", "linkerd-proxy"];
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
const SERVICE_LABEL: &str = "serving.knative.dev/service";
/// Where the apiserver's ServiceAccount admission plugin mounts the API token in every
/// container, and the prefix of the projected volume it adds for it (`kube-api-access-xxxxx`).
pub const SERVICE_ACCOUNT_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const SERVICE_ACCOUNT_VOLUME_PREFIX: &str = "kube-api-access-";
/// The label [`place_template`] puts on a pod template it has placed. Pods made from that
/// template are created already placed, and the Pod webhook's objectSelector leaves Pods with
/// this label out, so they are created without an admission call.
pub const PLACED_LABEL: &str = "kinfer.dev/placed";
pub const PLACED_VALUE: &str = "template";

/// The patch for one Pod (or pod template) and what the user should know about it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mutation {
    pub patch: Vec<PatchOperation>,
    pub warnings: Vec<String>,
    /// Where the Pod sits in the patched object: the root for a Pod, `/spec/template` for a
    /// Deployment. Every path in `patch` starts with it.
    root: PointerBuf,
}

impl Mutation {
    pub fn into_patch(self) -> (Patch, Vec<String>) {
        (Patch(self.patch), self.warnings)
    }
}

/// The Pod cannot be placed as asked; the message is shown to whoever creates the Pod (for a
/// revision, in the ReplicaSet's events and the revision's status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("pod has no user container (only sidecars {SIDECARS:?})")]
    NoUserContainer,
    #[error(
        "kinfer.dev/handler: the pod already has a volume named {WRAPPER_VOLUME}; that name is reserved for the kinfer wrapper"
    )]
    VolumeNameTaken,
    #[error(
        "kinfer.dev/handler: container {container} already mounts something at {path}, where the kinfer wrapper is installed (change wrapper-install-path in kinfer-config or the mount)"
    )]
    MountPathTaken { container: String, path: String },
}

/// Decides the patch for `pod`. An empty patch means "admit unchanged".
pub fn place(
    spec: &KinferSpec,
    config: &KinferConfig,
    pod: &Pod,
) -> Result<Mutation, PlacementError> {
    place_under(spec, config, pod, PointerBuf::new())
}

/// Decides the patch for a Deployment whose pod template is `template`: the placement
/// [`place`] would give each of its Pods, at `/spec/template`, plus [`PLACED_LABEL`] on the
/// template. Placing the template once per revision instead of every Pod takes the webhook
/// out of the path of Pod creation (scale-ups, warm pools); the template of an already
/// placed Deployment gets an empty patch.
pub fn place_template(
    spec: &KinferSpec,
    config: &KinferConfig,
    template: &PodTemplateSpec,
) -> Result<Mutation, PlacementError> {
    let pod = Pod {
        metadata: template.metadata.clone().unwrap_or_default(),
        spec: template.spec.clone(),
        status: None,
    };
    let root = PointerBuf::from_tokens(["spec", "template"]);
    let mut m = place_under(spec, config, &pod, root)?;
    let labels = pod.metadata.labels.as_ref();
    match labels.and_then(|l| l.get(PLACED_LABEL)) {
        Some(v) if v == PLACED_VALUE => {}
        _ if template.metadata.is_none() => add(
            &mut m,
            &["metadata"],
            json!({ "labels": { PLACED_LABEL: PLACED_VALUE } }),
        ),
        _ if labels.is_none() => add(
            &mut m,
            &["metadata", "labels"],
            json!({ PLACED_LABEL: PLACED_VALUE }),
        ),
        // `add` on an existing member replaces it (RFC 6902).
        _ => add(
            &mut m,
            &["metadata", "labels", PLACED_LABEL],
            json!(PLACED_VALUE),
        ),
    }
    Ok(m)
}

fn place_under(
    spec: &KinferSpec,
    config: &KinferConfig,
    pod: &Pod,
    root: PointerBuf,
) -> Result<Mutation, PlacementError> {
    let mut m = Mutation {
        root,
        ..Mutation::default()
    };
    if spec.is_noop() {
        return Ok(m);
    }
    let pod_spec = pod.spec.as_ref().ok_or(PlacementError::NoUserContainer)?;
    let index = user_container(pod).ok_or(PlacementError::NoUserContainer)?;
    let container = &pod_spec.containers[index];

    if spec.accelerator.wants_gpu() {
        gpu_limit(spec, config, index, container, &mut m);
        toleration(config, pod_spec, &mut m);
        runtime_class(config, pod_spec, &mut m);
        if let Some(mib) = spec.model_memory_mib {
            memory_affinity(config, pod_spec, mib, &mut m);
        }
    }
    if let Some(handler) = &spec.handler {
        let model_name = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_LABEL));
        wrapper(
            config,
            pod_spec,
            index,
            container,
            &handler.to_string(),
            model_name.map(String::as_str),
            &mut m,
        )?;
    }
    Ok(m)
}

/// Index of the container that runs the user's code.
pub fn user_container(pod: &Pod) -> Option<usize> {
    let containers = &pod.spec.as_ref()?.containers;
    let is_user = |c: &Container| !SIDECARS.contains(&c.name.as_str());
    if let Some(name) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION))
        && let Some(i) = containers
            .iter()
            .position(|c| &c.name == name && is_user(c))
    {
        return Some(i);
    }
    containers
        .iter()
        .position(|c| is_user(c) && c.ports.as_ref().is_some_and(|p| !p.is_empty()))
        .or_else(|| containers.iter().position(is_user))
}

fn add(m: &mut Mutation, path: &[&str], value: Value) {
    m.patch.push(PatchOperation::Add(AddOperation {
        path: m
            .root
            .concat(&PointerBuf::from_tokens(path.iter().copied())),
        value,
    }));
}

/// Whether a resource name is a GPU of some kind, so kinfer does not add a second GPU
/// resource next to one the user chose.
fn is_gpu_resource(name: &str, config: &KinferConfig) -> bool {
    name == config.gpu_resource
        || name == config.gpu_shared_resource
        || name.starts_with("nvidia.com/")
        || name.starts_with("amd.com/gpu")
        || name.starts_with("gpu.intel.com/")
}

fn quantity_eq(q: &Quantity, n: u32) -> bool {
    q.0.trim().parse::<u64>().is_ok_and(|v| v == u64::from(n))
}

fn gpu_limit(
    spec: &KinferSpec,
    config: &KinferConfig,
    index: usize,
    container: &Container,
    m: &mut Mutation,
) {
    let resource = spec
        .gpu_resource
        .clone()
        .unwrap_or_else(|| match spec.gpu_sharing {
            GpuSharing::Exclusive => config.gpu_resource.clone(),
            GpuSharing::TimeSliced => config.gpu_shared_resource.clone(),
        });
    let count = spec.gpu_count;
    let name = &container.name;
    let resources = container.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());

    if let Some(q) = limits.and_then(|l| l.get(&resource)) {
        if !quantity_eq(q, count) {
            m.warnings.push(format!(
                "container {name} already has limits {resource}: {}; kept (kinfer.dev/gpu-count asks for {count})",
                q.0
            ));
        }
        return;
    }
    // Extended resources need limits == requests, so a request alone decides the value.
    let value = match requests.and_then(|r| r.get(&resource)) {
        Some(q) => {
            if !quantity_eq(q, count) {
                m.warnings.push(format!(
                    "container {name} already requests {resource}: {}; kept as its limit (kinfer.dev/gpu-count asks for {count})",
                    q.0
                ));
            }
            q.0.clone()
        }
        None => {
            let other = limits
                .into_iter()
                .chain(requests)
                .flat_map(|m| m.keys())
                .find(|k| is_gpu_resource(k, config));
            if let Some(other) = other {
                m.warnings.push(format!(
                    "container {name} already asks for {other}; kept, and no {resource} added"
                ));
                return;
            }
            count.to_string()
        }
    };
    let i = index.to_string();
    match (resources, limits) {
        (None, _) => add(
            m,
            &["spec", "containers", &i, "resources"],
            json!({ "limits": { resource: value } }),
        ),
        (Some(_), None) => add(
            m,
            &["spec", "containers", &i, "resources", "limits"],
            json!({ resource: value }),
        ),
        (Some(_), Some(_)) => add(
            m,
            &["spec", "containers", &i, "resources", "limits", &resource],
            json!(value),
        ),
    }
}

fn toleration(config: &KinferConfig, pod_spec: &PodSpec, m: &mut Mutation) {
    let Some(want) = &config.gpu_toleration else {
        return;
    };
    let desired = Toleration {
        key: Some(want.key.clone()),
        operator: Some(want.operator.clone()),
        value: want.value.clone(),
        effect: want.effect.clone(),
        toleration_seconds: None,
    };
    let existing = pod_spec.tolerations.as_deref().unwrap_or_default();
    let normalize = |t: &Toleration| {
        (
            t.key.clone().unwrap_or_default(),
            t.operator.clone().unwrap_or_else(|| "Equal".into()),
            t.value.clone().unwrap_or_default(),
            t.effect.clone().unwrap_or_default(),
            t.toleration_seconds,
        )
    };
    if existing.iter().any(|t| normalize(t) == normalize(&desired)) {
        return;
    }
    // An empty key with Exists tolerates every taint: nothing to add.
    if existing.iter().any(|t| {
        t.key.as_deref().unwrap_or_default().is_empty()
            && t.operator.as_deref() == Some("Exists")
            && t.effect.as_deref().unwrap_or_default().is_empty()
    }) {
        return;
    }
    if let Some(t) = existing
        .iter()
        .find(|t| t.key.as_deref() == Some(want.key.as_str()))
    {
        m.warnings.push(format!(
            "pod already tolerates {} ({} {}); kept, no kinfer toleration added",
            want.key,
            t.operator.as_deref().unwrap_or("Equal"),
            t.effect.as_deref().unwrap_or("all effects"),
        ));
        return;
    }
    let value = serde_json::to_value(&desired).expect("a toleration serializes");
    if pod_spec.tolerations.is_none() {
        add(m, &["spec", "tolerations"], json!([value]));
    } else {
        add(m, &["spec", "tolerations", "-"], value);
    }
}

fn runtime_class(config: &KinferConfig, pod_spec: &PodSpec, m: &mut Mutation) {
    let Some(want) = &config.runtime_class_name else {
        return;
    };
    match &pod_spec.runtime_class_name {
        Some(have) if have == want => {}
        Some(have) => m.warnings.push(format!(
            "pod already has runtimeClassName {have}; kept (kinfer-config says {want})"
        )),
        None => add(m, &["spec", "runtimeClassName"], json!(want)),
    }
}

fn memory_affinity(config: &KinferConfig, pod_spec: &PodSpec, mib: u64, m: &mut Mutation) {
    let label = &config.gpu_memory_node_label;
    let expression = json!({ "key": label, "operator": "Gt", "values": [(mib - 1).to_string()] });
    let term = json!({ "matchExpressions": [expression.clone()] });
    let affinity = pod_spec.affinity.as_ref();
    let node = affinity.and_then(|a| a.node_affinity.as_ref());
    let required = node.and_then(|n| {
        n.required_during_scheduling_ignored_during_execution
            .as_ref()
    });
    let base = ["spec", "affinity", "nodeAffinity"];
    let req = "requiredDuringSchedulingIgnoredDuringExecution";
    let Some(required) = required else {
        let selector = json!({ "nodeSelectorTerms": [term] });
        match (affinity, node) {
            (None, _) => add(
                m,
                &["spec", "affinity"],
                json!({ "nodeAffinity": { req: selector } }),
            ),
            (Some(_), None) => add(m, &base, json!({ req: selector })),
            (Some(_), Some(_)) => add(m, &[base[0], base[1], base[2], req], selector),
        }
        return;
    };
    if required.node_selector_terms.is_empty() {
        add(
            m,
            &[base[0], base[1], base[2], req, "nodeSelectorTerms", "-"],
            term,
        );
        return;
    }
    let mut kept = false;
    for (i, t) in required.node_selector_terms.iter().enumerate() {
        let i = i.to_string();
        let path = [base[0], base[1], base[2], req, "nodeSelectorTerms", &i];
        match &t.match_expressions {
            None => add(
                m,
                &[path.as_slice(), &["matchExpressions"]].concat(),
                json!([expression.clone()]),
            ),
            Some(exprs) => match exprs.iter().find(|e| &e.key == label) {
                Some(e) => {
                    let same = e.operator == "Gt"
                        && e.values.as_deref() == Some(&[(mib - 1).to_string()][..]);
                    kept |= !same;
                }
                None => add(
                    m,
                    &[path.as_slice(), &["matchExpressions", "-"]].concat(),
                    expression.clone(),
                ),
            },
        }
    }
    if kept {
        m.warnings.push(format!(
            "pod already has a node affinity on {label}; kept (kinfer.dev/model-memory asks for {label} > {})",
            mib - 1
        ));
    }
}

fn wrapper(
    config: &KinferConfig,
    pod_spec: &PodSpec,
    index: usize,
    container: &Container,
    handler: &str,
    model_name: Option<&str>,
    m: &mut Mutation,
) -> Result<(), PlacementError> {
    let already = pod_spec
        .init_containers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|c| c.name == WRAPPER_INIT_CONTAINER);
    if already {
        return Ok(());
    }
    let volumes = pod_spec.volumes.as_deref().unwrap_or_default();
    if volumes.iter().any(|v| v.name == WRAPPER_VOLUME) {
        return Err(PlacementError::VolumeNameTaken);
    }
    let install = &config.wrapper_install_path;
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    if mounts
        .iter()
        .any(|vm| vm.mount_path.trim_end_matches('/') == install)
    {
        return Err(PlacementError::MountPathTaken {
            container: container.name.clone(),
            path: install.clone(),
        });
    }
    let binary = format!("{install}/{WRAPPER_BINARY}");
    let mut init_mounts = vec![json!({ "name": WRAPPER_VOLUME, "mountPath": install })];
    init_mounts.extend(service_account_mount(pod_spec));
    let mut init = json!({
        "name": WRAPPER_INIT_CONTAINER,
        "image": config.wrapper_image,
        // The wrapper image is one static binary (no shell, no cp): it installs itself.
        "command": [config.wrapper_source, "install", format!("{install}/bin")],
        "volumeMounts": init_mounts,
    });
    // Same security context as the user container, so restricted namespaces admit it.
    if let Some(sc) = &container.security_context {
        init["securityContext"] = serde_json::to_value(sc).expect("serializes");
    }
    if pod_spec.init_containers.is_none() {
        add(m, &["spec", "initContainers"], json!([init]));
    } else {
        add(m, &["spec", "initContainers", "-"], init);
    }
    let volume = json!({ "name": WRAPPER_VOLUME, "emptyDir": {} });
    if pod_spec.volumes.is_none() {
        add(m, &["spec", "volumes"], json!([volume]));
    } else {
        add(m, &["spec", "volumes", "-"], volume);
    }

    let i = index.to_string();
    let mount = json!({ "name": WRAPPER_VOLUME, "mountPath": install, "readOnly": true });
    if container.volume_mounts.is_none() {
        add(
            m,
            &["spec", "containers", &i, "volumeMounts"],
            json!([mount]),
        );
    } else {
        add(m, &["spec", "containers", &i, "volumeMounts", "-"], mount);
    }
    let replaced: Vec<&String> = container
        .command
        .iter()
        .chain(container.args.iter())
        .flatten()
        .collect();
    if !replaced.is_empty() {
        m.warnings.push(format!(
            "kinfer.dev/handler: container {} runs the kinfer wrapper for {handler} instead of {replaced:?}",
            container.name
        ));
    }
    let mut args = vec!["--handler".to_string(), handler.to_string()];
    if let Some(name) = model_name {
        args.extend(["--model-name".to_string(), name.to_string()]);
    }
    add(m, &["spec", "containers", &i, "command"], json!([binary]));
    add(m, &["spec", "containers", &i, "args"], json!(args));
    Ok(())
}

/// The API-token mount that the ServiceAccount admission plugin would give the init
/// container, when it has already mounted the token into this Pod.
///
/// The apiserver runs that plugin before the webhooks. A webhook patch that changes the Pod
/// makes it run its in-tree plugins again, and the plugin then mounts the token into every
/// container that has nothing at [`SERVICE_ACCOUNT_MOUNT_PATH`], our new init container
/// included. That change in turn makes it call this webhook a second time
/// (`reinvocationPolicy: IfNeeded`), which cost about as much as the first call
/// (`bench/pod_latency.sh`: a patched Pod's create took 2.0x that of a Pod outside the
/// webhook's scope, 1.4x with this mount; see the README). Adding the plugin's own mount here (the first
/// `kube-api-access-*` volume, read-only, at the token path: `mountServiceAccountToken` in
/// `plugin/pkg/admission/serviceaccount`) makes its rerun a no-op, so the apiserver calls the
/// webhook once. The init container gets nothing it would not have had anyway.
///
/// Only when some container already mounts that volume at that path, i.e. the plugin has run
/// with automounting on; with `automountServiceAccountToken: false` it adds nothing, and
/// neither does this.
fn service_account_mount(pod_spec: &PodSpec) -> Option<Value> {
    let volume = pod_spec
        .volumes
        .as_deref()?
        .iter()
        .find(|v| v.name.starts_with(SERVICE_ACCOUNT_VOLUME_PREFIX))?;
    let mounted = pod_spec
        .init_containers
        .iter()
        .flatten()
        .chain(&pod_spec.containers)
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| m.name == volume.name && m.mount_path == SERVICE_ACCOUNT_MOUNT_PATH);
    mounted.then(|| {
        json!({ "name": volume.name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT_PATH })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::annotations::parse;

    /// A revision Pod as Knative's Deployment makes it (trimmed).
    fn knative_pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "hello-00001-deployment-5d9f8b-",
                "namespace": "default",
                "labels": {
                    "serving.knative.dev/revision": "hello-00001",
                    "serving.knative.dev/service": "hello",
                    "app": "hello-00001"
                },
                "annotations": {
                    "kubectl.kubernetes.io/default-container": "user-container"
                }
            },
            "spec": {
                "containers": [
                    {
                        "name": "user-container",
                        "image": "registry.local/hello@sha256:abc",
                        "ports": [{ "name": "user-port", "containerPort": 8080, "protocol": "TCP" }],
                        "env": [{ "name": "PORT", "value": "8080" }],
                        "resources": {},
                        "lifecycle": { "preStop": { "httpGet": { "path": "/wait-for-drain", "port": 8022 } } }
                    },
                    {
                        "name": "queue-proxy",
                        "image": "queue",
                        "ports": [{ "name": "queue-port", "containerPort": 8012 }],
                        "resources": { "requests": { "cpu": "25m" } },
                        "readinessProbe": { "httpGet": { "port": 8012 } }
                    }
                ],
                "enableServiceLinks": false
            }
        })
    }

    fn run(annotations: &[(&str, &str)], config: &KinferConfig, pod: Value) -> (Value, Mutation) {
        let map: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let parsed = parse(&map).unwrap();
        let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
        let mutation = place(&parsed.spec, config, &typed).unwrap();
        let mut out = pod;
        json_patch::patch(&mut out, &mutation.patch)
            .unwrap_or_else(|e| panic!("patch does not apply: {e}\n{:#?}", mutation.patch));
        // The result is still a valid Pod.
        let _: Pod = serde_json::from_value(out.clone()).unwrap();
        (out, mutation)
    }

    fn gpu() -> Vec<(&'static str, &'static str)> {
        vec![("kinfer.dev/accelerator", "gpu")]
    }

    #[test]
    fn gpu_pod_gets_limit_toleration_and_runtime_class_only_on_user_container() {
        let before = knative_pod();
        let (pod, m) = run(&gpu(), &KinferConfig::default(), before.clone());
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"],
            json!({"nvidia.com/gpu": "1"})
        );
        assert_eq!(
            pod["spec"]["containers"][1], before["spec"]["containers"][1],
            "queue-proxy untouched"
        );
        assert_eq!(
            pod["spec"]["tolerations"],
            json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
        );
        assert_eq!(pod["spec"]["runtimeClassName"], "nvidia");
        assert!(pod["spec"].get("affinity").is_none());
        // The slash in the resource name is escaped in the pointer.
        let paths: Vec<String> = m
            .patch
            .iter()
            .map(|op| match op {
                PatchOperation::Add(a) => a.path.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            paths,
            [
                "/spec/containers/0/resources/limits",
                "/spec/tolerations",
                "/spec/runtimeClassName"
            ]
        );
    }

    #[test]
    fn resource_choice_table() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[("kinfer.dev/gpu-count", "2")], "nvidia.com/gpu", "2"),
            (
                &[("kinfer.dev/gpu-sharing", "time-sliced")],
                "nvidia.com/gpu.shared",
                "1",
            ),
            (
                &[("kinfer.dev/gpu-resource", "nvidia.com/mig-1g.10gb")],
                "nvidia.com/mig-1g.10gb",
                "1",
            ),
            (
                &[
                    ("kinfer.dev/gpu-resource", "nvidia.com/mig-3g.40gb"),
                    ("kinfer.dev/gpu-sharing", "time-sliced"),
                    ("kinfer.dev/gpu-count", "3"),
                ],
                "nvidia.com/mig-3g.40gb",
                "3",
            ),
        ];
        for (extra, resource, count) in cases {
            let mut ann = gpu();
            ann.extend_from_slice(extra);
            let (pod, _) = run(&ann, &KinferConfig::default(), knative_pod());
            assert_eq!(
                pod["spec"]["containers"][0]["resources"]["limits"],
                json!({ *resource: count }),
                "{extra:?}"
            );
        }
    }

    #[test]
    fn auto_places_like_gpu() {
        let (pod, _) = run(
            &[("kinfer.dev/accelerator", "auto")],
            &KinferConfig::default(),
            knative_pod(),
        );
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            "1"
        );
    }

    #[test]
    fn config_decides_names_and_can_switch_parts_off() {
        let config = KinferConfig {
            runtime_class_name: None,
            gpu_toleration: None,
            gpu_resource: "amd.com/gpu".into(),
            ..KinferConfig::default()
        };
        let (pod, m) = run(&gpu(), &config, knative_pod());
        assert_eq!(m.patch.len(), 1);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"],
            json!({"amd.com/gpu": "1"})
        );
        assert!(pod["spec"].get("tolerations").is_none());
        assert!(pod["spec"].get("runtimeClassName").is_none());
    }

    #[test]
    fn existing_settings_are_kept_and_reported() {
        let mut before = knative_pod();
        before["spec"]["containers"][0]["resources"] =
            json!({"limits": {"cpu": "2", "nvidia.com/gpu": "2"}});
        before["spec"]["tolerations"] = json!([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}]);
        before["spec"]["runtimeClassName"] = json!("nvidia-cdi");
        let (pod, m) = run(&gpu(), &KinferConfig::default(), before.clone());
        assert!(m.patch.is_empty(), "{:?}", m.patch);
        assert_eq!(pod, before);
        let w = m.warnings.join("\n");
        assert!(
            w.contains("container user-container already has limits nvidia.com/gpu: 2; kept (kinfer.dev/gpu-count asks for 1)"),
            "{w}"
        );
        assert!(
            w.contains("pod already tolerates nvidia.com/gpu (Equal NoSchedule); kept"),
            "{w}"
        );
        assert!(
            w.contains("pod already has runtimeClassName nvidia-cdi; kept"),
            "{w}"
        );
    }

    #[test]
    fn limits_added_next_to_existing_ones_and_requests_respected() {
        let mut before = knative_pod();
        before["spec"]["containers"][0]["resources"] = json!({"limits": {"memory": "1Gi"}});
        let (pod, m) = run(&gpu(), &KinferConfig::default(), before);
        assert!(m.warnings.is_empty());
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"],
            json!({"memory": "1Gi", "nvidia.com/gpu": "1"})
        );

        let mut before = knative_pod();
        before["spec"]["containers"][0]["resources"] = json!({"requests": {"nvidia.com/gpu": "2"}});
        let (pod, m) = run(&gpu(), &KinferConfig::default(), before);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}})
        );
        assert!(m.warnings[0].contains("already requests nvidia.com/gpu: 2"));

        let mut before = knative_pod();
        before["spec"]["containers"][0]["resources"] =
            json!({"limits": {"nvidia.com/mig-1g.10gb": "1"}});
        let (pod, m) = run(&gpu(), &KinferConfig::default(), before);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"],
            json!({"nvidia.com/mig-1g.10gb": "1"})
        );
        assert!(m.warnings[0].contains("already asks for nvidia.com/mig-1g.10gb; kept"));

        // No resources key at all.
        let mut before = knative_pod();
        before["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("resources");
        let (pod, _) = run(&gpu(), &KinferConfig::default(), before);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"limits": {"nvidia.com/gpu": "1"}})
        );
    }

    #[test]
    fn tolerations_are_appended_not_duplicated() {
        let mut before = knative_pod();
        before["spec"]["tolerations"] = json!([
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        ]);
        let (pod, _) = run(&gpu(), &KinferConfig::default(), before);
        let tolerations = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(tolerations.len(), 2);
        assert_eq!(tolerations[1]["key"], "nvidia.com/gpu");

        let mut before = knative_pod();
        before["spec"]["tolerations"] = json!([{"operator": "Exists"}]);
        let (pod, m) = run(&gpu(), &KinferConfig::default(), before);
        assert_eq!(pod["spec"]["tolerations"].as_array().unwrap().len(), 1);
        assert!(m.warnings.is_empty());
    }

    #[test]
    fn model_memory_affinity_table() {
        let expr = json!({"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40959"]});
        let zone = json!({"key": "zone", "operator": "In", "values": ["a"]});
        let anti =
            json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}});
        let cases: Vec<(Option<Value>, Value)> = vec![
            // No affinity at all.
            (
                None,
                json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}),
            ),
            // Knative's default pod anti-affinity, no node affinity.
            (
                Some(anti.clone()),
                json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
                       "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}),
            ),
            // Node affinity with only a preferred part.
            (
                Some(
                    json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}),
                ),
                json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [],
                       "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}),
            ),
            // Two ORed terms: the expression goes into each.
            (
                Some(
                    json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [zone]},
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}
                    ]}}}),
                ),
                json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [zone, expr]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}], "matchExpressions": [expr]}
                ]}}}),
            ),
        ];
        let mut ann = gpu();
        ann.push(("kinfer.dev/model-memory", "40Gi"));
        for (affinity, want) in cases {
            let mut before = knative_pod();
            if let Some(a) = affinity.clone() {
                before["spec"]["affinity"] = a;
            }
            let (pod, m) = run(&ann, &KinferConfig::default(), before);
            assert_eq!(pod["spec"]["affinity"], want, "from {affinity:?}");
            assert!(m.warnings.is_empty());
        }
    }

    #[test]
    fn user_memory_expression_is_kept() {
        let mut before = knative_pod();
        before["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["70000"]}]}
        ]}}});
        let mut ann = gpu();
        ann.push(("kinfer.dev/model-memory", "6Gi"));
        let (pod, m) = run(&ann, &KinferConfig::default(), before.clone());
        assert_eq!(pod["spec"]["affinity"], before["spec"]["affinity"]);
        assert!(m.warnings[0].contains("already has a node affinity on nvidia.com/gpu.memory; kept (kinfer.dev/model-memory asks for nvidia.com/gpu.memory > 6143)"), "{:?}", m.warnings);
    }

    #[test]
    fn wrapper_injection() {
        let mut before = knative_pod();
        before["spec"]["containers"][0]["command"] = json!(["python", "serve.py"]);
        before["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "models", "mountPath": "/models"}]);
        before["spec"]["containers"][0]["readinessProbe"] = json!({"tcpSocket": {"port": 8080}});
        before["spec"]["containers"][0]["securityContext"] = json!({"runAsNonRoot": true});
        before["spec"]["volumes"] = json!([{"name": "models", "emptyDir": {}}]);
        let (pod, m) = run(
            &[("kinfer.dev/handler", "app.model:predict")],
            &KinferConfig::default(),
            before.clone(),
        );
        let user = &pod["spec"]["containers"][0];
        assert_eq!(user["command"], json!(["/kinfer/bin/kinfer-wrapper"]));
        assert_eq!(
            user["args"],
            json!(["--handler", "app.model:predict", "--model-name", "hello"])
        );
        assert_eq!(user["image"], before["spec"]["containers"][0]["image"]);
        assert_eq!(user["env"], before["spec"]["containers"][0]["env"]);
        assert_eq!(user["ports"], before["spec"]["containers"][0]["ports"]);
        assert_eq!(
            user["readinessProbe"],
            before["spec"]["containers"][0]["readinessProbe"]
        );
        assert_eq!(
            user["volumeMounts"],
            json!([{"name": "models", "mountPath": "/models"},
                   {"name": "kinfer-wrapper", "mountPath": "/kinfer", "readOnly": true}])
        );
        assert_eq!(
            pod["spec"]["volumes"],
            json!([{"name": "models", "emptyDir": {}}, {"name": "kinfer-wrapper", "emptyDir": {}}])
        );
        assert_eq!(
            pod["spec"]["initContainers"],
            json!([{
                "name": "kinfer-wrapper-install",
                "image": "ghcr.io/kinfer/kinfer-wrapper:latest",
                "command": ["/kinfer-wrapper", "install", "/kinfer/bin"],
                "volumeMounts": [{"name": "kinfer-wrapper", "mountPath": "/kinfer"}],
                "securityContext": {"runAsNonRoot": true}
            }])
        );
        assert_eq!(
            pod["spec"]["containers"][1],
            before["spec"]["containers"][1]
        );
        assert!(pod["spec"].get("runtimeClassName").is_none(), "CPU pod");
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("instead of [\"python\", \"serve.py\"]"));
    }

    #[test]
    fn wrapper_on_a_bare_pod_and_with_gpu() {
        let mut before = knative_pod();
        before["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("serving.knative.dev/service");
        before["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "istio"}]);
        let (pod, m) = run(
            &[
                ("kinfer.dev/handler", "model:predict"),
                ("kinfer.dev/accelerator", "gpu"),
            ],
            &KinferConfig::default(),
            before,
        );
        assert!(m.warnings.is_empty());
        assert_eq!(
            pod["spec"]["containers"][0]["args"],
            json!(["--handler", "model:predict"])
        );
        assert_eq!(
            pod["spec"]["initContainers"][1]["name"],
            "kinfer-wrapper-install"
        );
        assert_eq!(pod["spec"]["initContainers"][0]["name"], "istio-init");
        assert_eq!(pod["spec"]["runtimeClassName"], "nvidia");
    }

    /// What the apiserver's ServiceAccount admission plugin does to a Pod with automounting
    /// on (`mountServiceAccountToken`, Kubernetes 1.37): the API token mounted into every
    /// container that has nothing at its path, and the projected volume added if missing.
    /// Returns whether the Pod changed.
    fn service_account_plugin(pod: &mut Value) -> bool {
        let before = pod.clone();
        let spec = &mut pod["spec"];
        let volume = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .find(|n| n.starts_with(SERVICE_ACCOUNT_VOLUME_PREFIX))
            .map(str::to_string);
        let name = volume
            .clone()
            .unwrap_or_else(|| format!("{SERVICE_ACCOUNT_VOLUME_PREFIX}x7k2q"));
        let mount =
            json!({"name": name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT_PATH});
        let mut needed = false;
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array_mut().into_iter().flatten() {
                let has = c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["mountPath"] == SERVICE_ACCOUNT_MOUNT_PATH);
                if !has {
                    if c.get("volumeMounts").is_none() {
                        c["volumeMounts"] = json!([]);
                    }
                    c["volumeMounts"]
                        .as_array_mut()
                        .unwrap()
                        .push(mount.clone());
                    needed = true;
                }
            }
        }
        if volume.is_none() && needed {
            if spec.get("volumes").is_none() {
                spec["volumes"] = json!([]);
            }
            spec["volumes"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": name, "projected": {"defaultMode": 420, "sources": []}}));
        }
        *pod != before
    }

    /// The wrapper's init container gets the API-token mount when the ServiceAccount plugin
    /// has already run, so the plugin's rerun after the patch changes nothing and the
    /// apiserver does not call the webhook a second time.
    #[test]
    fn service_account_plugin_rerun_is_a_noop_after_wrapper_injection() {
        let token = |name: &str| json!({"name": name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT_PATH});
        let wrapper_mount = json!({"name": "kinfer-wrapper", "mountPath": "/kinfer"});
        let admitted = |edit: &dyn Fn(&mut Value)| {
            let mut pod = knative_pod();
            edit(&mut pod);
            service_account_plugin(&mut pod);
            pod
        };
        type Case = (&'static str, Value, Vec<Value>);
        let cases: Vec<Case> = vec![
            (
                "a revision Pod as admitted: token in every container",
                admitted(&|_| {}),
                vec![wrapper_mount.clone(), token("kube-api-access-x7k2q")],
            ),
            (
                "another init container (istio-init) already there",
                admitted(&|p| {
                    p["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "istio"}])
                }),
                vec![wrapper_mount.clone(), token("kube-api-access-x7k2q")],
            ),
            (
                "the user's own token at that path: the plugin's volume still goes to the rest",
                admitted(&|p| {
                    p["spec"]["containers"][0]["volumeMounts"] =
                        json!([{"name": "my-token", "mountPath": SERVICE_ACCOUNT_MOUNT_PATH}]);
                    p["spec"]["volumes"] =
                        json!([{"name": "my-token", "secret": {"secretName": "t"}}]);
                }),
                vec![wrapper_mount.clone(), token("kube-api-access-x7k2q")],
            ),
            (
                "the volume's generated name is whatever the plugin chose",
                admitted(&|p| {
                    p["spec"]["volumes"] =
                        json!([{"name": "kube-api-access-abcde", "projected": {"sources": []}}]);
                }),
                vec![wrapper_mount.clone(), token("kube-api-access-abcde")],
            ),
        ];
        let handler = [("kinfer.dev/handler", "model:predict")];
        for (what, before, want) in cases {
            let (mut pod, _) = run(&handler, &KinferConfig::default(), before);
            let init = &pod["spec"]["initContainers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == WRAPPER_INIT_CONTAINER)
                .unwrap()
                .clone();
            assert_eq!(init["volumeMounts"], json!(want), "{what}");
            assert!(
                !service_account_plugin(&mut pod),
                "{what}: the plugin's rerun changed the Pod"
            );
            // And were the webhook called again anyway, it would answer with no patch.
            let (_, m) = run(&handler, &KinferConfig::default(), pod);
            assert!(m.patch.is_empty(), "{what}: {:?}", m.patch);
        }

        // Automounting off: the plugin mounted nothing, so the init container gets no token.
        let mut off = knative_pod();
        off["spec"]["automountServiceAccountToken"] = json!(false);
        let (pod, _) = run(&handler, &KinferConfig::default(), off);
        assert_eq!(
            pod["spec"]["initContainers"][0]["volumeMounts"],
            json!([wrapper_mount.clone()])
        );
        // A volume that only looks like the plugin's, mounted nowhere at the token path: no.
        let mut lookalike = knative_pod();
        lookalike["spec"]["volumes"] = json!([{"name": "kube-api-access-mine", "emptyDir": {}}]);
        let (pod, _) = run(&handler, &KinferConfig::default(), lookalike);
        assert_eq!(
            pod["spec"]["initContainers"][0]["volumeMounts"],
            json!([wrapper_mount])
        );
    }

    #[test]
    fn mutating_a_mutated_pod_changes_nothing() {
        let ann = [
            ("kinfer.dev/accelerator", "gpu"),
            ("kinfer.dev/model-memory", "6Gi"),
            ("kinfer.dev/handler", "model:predict"),
        ];
        let (once, _) = run(&ann, &KinferConfig::default(), knative_pod());
        let (twice, m) = run(&ann, &KinferConfig::default(), once.clone());
        assert_eq!(once, twice);
        assert!(m.patch.is_empty() && m.warnings.is_empty(), "{m:?}");
    }

    #[test]
    fn cpu_and_empty_specs_get_no_patch() {
        for ann in [vec![], vec![("kinfer.dev/accelerator", "cpu")]] {
            let (pod, m) = run(&ann, &KinferConfig::default(), knative_pod());
            assert!(m.patch.is_empty());
            assert_eq!(pod, knative_pod());
        }
    }

    #[test]
    fn user_container_choice() {
        let pod = |containers: Value, default: Option<&str>| -> Pod {
            let mut p = json!({"metadata": {}, "spec": {"containers": containers}});
            if let Some(d) = default {
                p["metadata"]["annotations"] = json!({DEFAULT_CONTAINER_ANNOTATION: d});
            }
            serde_json::from_value(p).unwrap()
        };
        let qp = json!({"name": "queue-proxy", "ports": [{"containerPort": 8012}]});
        // Custom name, queue-proxy first.
        assert_eq!(
            user_container(&pod(json!([qp, {"name": "my-model"}]), None)),
            Some(1)
        );
        // Multi-container: the one with the port serves.
        assert_eq!(
            user_container(&pod(
                json!([{"name": "side"}, {"name": "serve", "ports": [{"containerPort": 8080}]}, qp]),
                None
            )),
            Some(1)
        );
        // The default-container annotation wins, unless it names a sidecar.
        assert_eq!(
            user_container(&pod(
                json!([{"name": "a", "ports": [{"containerPort": 1}]}, {"name": "b"}, qp]),
                Some("b")
            )),
            Some(1)
        );
        assert_eq!(
            user_container(&pod(json!([qp, {"name": "b"}]), Some("queue-proxy"))),
            Some(1)
        );
        assert_eq!(user_container(&pod(json!([qp]), None)), None);
    }

    #[test]
    fn conflicts_are_errors() {
        let spec = parse(
            &[("kinfer.dev/handler".to_string(), "m:f".to_string())]
                .into_iter()
                .collect(),
        )
        .unwrap()
        .spec;
        let mut p = knative_pod();
        p["spec"]["volumes"] = json!([{"name": "kinfer-wrapper", "emptyDir": {}}]);
        let typed: Pod = serde_json::from_value(p).unwrap();
        assert_eq!(
            place(&spec, &KinferConfig::default(), &typed),
            Err(PlacementError::VolumeNameTaken)
        );
        let mut p = knative_pod();
        p["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "x", "mountPath": "/kinfer/"}]);
        let typed: Pod = serde_json::from_value(p).unwrap();
        let err = place(&spec, &KinferConfig::default(), &typed).unwrap_err();
        assert!(
            err.to_string()
                .contains("already mounts something at /kinfer")
        );
        let qp_only: Pod = serde_json::from_value(
            json!({"metadata": {}, "spec": {"containers": [{"name": "queue-proxy"}]}}),
        )
        .unwrap();
        assert_eq!(
            place(&spec, &KinferConfig::default(), &qp_only),
            Err(PlacementError::NoUserContainer)
        );
    }

    /// The label lands whatever metadata the template has, and a placed template stays as is.
    #[test]
    fn a_template_is_labelled_placed_once() {
        let spec = parse(&BTreeMap::from([(
            "kinfer.dev/accelerator".to_string(),
            "gpu".to_string(),
        )]))
        .unwrap()
        .spec;
        let config = KinferConfig::default();
        let containers = json!([{ "name": "user-container", "image": "hello" }]);
        for metadata in [
            None,
            Some(json!({})),
            Some(json!({ "labels": { "app": "hello" } })),
        ] {
            let mut template = json!({ "spec": { "containers": containers } });
            if let Some(m) = metadata {
                template["metadata"] = m;
            }
            let mut deployment = json!({ "spec": { "template": template.clone() } });
            let typed: PodTemplateSpec = serde_json::from_value(template).unwrap();
            let m = place_template(&spec, &config, &typed).unwrap();
            json_patch::patch(&mut deployment, &m.patch).unwrap();
            let placed = &deployment["spec"]["template"];
            assert_eq!(placed["metadata"]["labels"][PLACED_LABEL], PLACED_VALUE);
            assert_eq!(
                placed["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
                "1"
            );
            let again: PodTemplateSpec = serde_json::from_value(placed.clone()).unwrap();
            let m = place_template(&spec, &config, &again).unwrap();
            assert!(m.patch.is_empty(), "{:?}", m.patch);
        }
    }
}
