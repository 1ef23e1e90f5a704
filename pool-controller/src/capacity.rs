//! How many more pods of one shape the cluster can hold: CPU, memory, GPUs (any extended
//! resource) and pod slots on the nodes the pod could land on. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Amounts by resource name, in milli-units (so `100m` CPU is 100 and `1Gi` is 1Gi × 1000).
pub type Resources = BTreeMap<String, i128>;

/// A quantity in milli-units; `None` when it does not parse.
pub fn milli(q: &Quantity) -> Option<i128> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let (num, exp): (&str, i32) = match suffix.find(['e', 'E']) {
        Some(0) => (num, suffix[1..].parse().ok()?),
        _ => (num, 0),
    };
    let suffix = if exp != 0 { "" } else { suffix };
    let factor: f64 = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return None,
    };
    let value: f64 = num.parse().ok()?;
    Some((value * factor * 10f64.powi(exp) * 1000.0).ceil() as i128)
}

/// What a pod asks the scheduler for: the larger of its containers' sum and any init
/// container, plus overhead; one pod slot.
pub fn requests(spec: &PodSpec) -> Resources {
    let container_requests = |c: &k8s_openapi::api::core::v1::Container| {
        let mut r = Resources::new();
        if let Some(res) = &c.resources {
            // Limits stand in for missing requests, as the API server defaults them.
            for (k, v) in res.limits.iter().flatten() {
                r.insert(k.clone(), milli(v).unwrap_or(0));
            }
            for (k, v) in res.requests.iter().flatten() {
                r.insert(k.clone(), milli(v).unwrap_or(0));
            }
        }
        r
    };
    let mut total = Resources::new();
    for c in &spec.containers {
        for (k, v) in container_requests(c) {
            *total.entry(k).or_default() += v;
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, v) in container_requests(c) {
            let e = total.entry(k).or_default();
            *e = (*e).max(v);
        }
    }
    for (k, v) in spec.overhead.iter().flatten() {
        *total.entry(k.clone()).or_default() += milli(v).unwrap_or(0);
    }
    total.insert("pods".into(), 1000);
    total
}

fn tolerates(tolerations: &[Toleration], key: &str, value: Option<&str>, effect: &str) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == effect);
        let key_ok = t.key.as_deref().is_none_or(|k| k.is_empty() || k == key);
        let op = t.operator.as_deref().unwrap_or("Equal");
        let value_ok = op == "Exists" || t.value.as_deref().unwrap_or("") == value.unwrap_or("");
        effect_ok && key_ok && value_ok
    })
}

/// Whether `spec` may land on `node`: schedulable, nodeSelector matches, NoSchedule and
/// NoExecute taints tolerated. (Node affinity is not modelled; the count is then an upper
/// bound, which the pending-pods correction in [`room`] catches.)
pub fn eligible(node: &Node, spec: &PodSpec) -> bool {
    let node_spec = node.spec.as_ref();
    if node_spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        return false;
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    node_spec
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tolerations, &t.key, t.value.as_deref(), &t.effect))
}

fn active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed"))
}

/// Pods the scheduler could not place for lack of room (PodScheduled False, Unschedulable).
pub fn waiting_for_room(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
}

/// More pods shaped like `spec` that fit on the nodes it may land on, less the real pods
/// (`is_ours` false) that wait for room. Negative when real pods wait and nothing fits.
/// `pods` may be owned or shared (`Arc<Pod>`, as the controller's cache hands them out).
pub fn room<P: std::borrow::Borrow<Pod>>(
    spec: &PodSpec,
    nodes: &[Node],
    pods: &[P],
    is_ours: impl Fn(&Pod) -> bool,
) -> i32 {
    let want = requests(spec);
    let mut used: BTreeMap<&str, Resources> = BTreeMap::new();
    for pod in pods.iter().map(|p| p.borrow()).filter(|p| active(p)) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            continue;
        };
        let entry = used.entry(node).or_default();
        for (k, v) in requests(pod.spec.as_ref().unwrap()) {
            *entry.entry(k).or_default() += v;
        }
    }
    let mut fit: i64 = 0;
    for node in nodes.iter().filter(|n| eligible(n, spec)) {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let allocatable = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .cloned()
            .unwrap_or_default();
        let empty = Resources::new();
        let used = used.get(name).unwrap_or(&empty);
        let mut on_node = i64::MAX;
        for (resource, amount) in want.iter().filter(|(_, v)| **v > 0) {
            let free = allocatable
                .get(resource)
                .and_then(milli)
                .unwrap_or(0)
                .saturating_sub(used.get(resource).copied().unwrap_or(0));
            on_node = on_node.min((free.max(0) / amount) as i64);
        }
        fit = fit.saturating_add(on_node);
    }
    let waiting = pods
        .iter()
        .map(|p| p.borrow())
        .filter(|p| waiting_for_room(p) && !is_ours(p))
        .count() as i64;
    (fit - waiting).clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, alloc: serde_json::Value, extra: serde_json::Value) -> Node {
        let mut n = json!({
            "metadata": {"name": name, "labels": {"pool": "gpu"}},
            "spec": {},
            "status": {"allocatable": alloc},
        });
        if let Some(taints) = extra.get("taints") {
            n["spec"]["taints"] = taints.clone();
        }
        serde_json::from_value(n).unwrap()
    }

    fn pod_on(node: Option<&str>, req: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": req}}]},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn spec(req: serde_json::Value, extra: serde_json::Value) -> PodSpec {
        let mut s = json!({"containers": [{"name": "c", "resources": {"requests": req}}]});
        if let Some(t) = extra.get("tolerations") {
            s["tolerations"] = t.clone();
        }
        serde_json::from_value(s).unwrap()
    }

    #[test]
    fn quantities() {
        let q = |s: &str| milli(&Quantity(s.into()));
        assert_eq!(q("100m"), Some(100));
        assert_eq!(q("2"), Some(2000));
        assert_eq!(q("1Gi"), Some(1024 * 1024 * 1024 * 1000));
        assert_eq!(q("1k"), Some(1_000_000));
        assert_eq!(q("1e3"), Some(1_000_000));
        assert_eq!(q("0.5"), Some(500));
        assert_eq!(q("12x"), None);
    }

    #[test]
    fn room_table() {
        let gpu_node = |name| {
            node(
                name,
                json!({"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2", "pods": "110"}),
                json!({}),
            )
        };
        let tainted = node(
            "t",
            json!({"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "4", "pods": "110"}),
            json!({"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]}),
        );
        let gpu_pod = json!({"cpu": "1", "memory": "4Gi", "nvidia.com/gpu": "1"});
        struct Case {
            name: &'static str,
            spec: PodSpec,
            nodes: Vec<Node>,
            pods: Vec<Pod>,
            room: i32,
        }
        let cases = vec![
            Case {
                name: "two empty nodes with 2 GPUs each hold 4 one-GPU pods",
                spec: spec(gpu_pod.clone(), json!({})),
                nodes: vec![gpu_node("a"), gpu_node("b")],
                pods: vec![],
                room: 4,
            },
            Case {
                name: "used GPUs count",
                spec: spec(gpu_pod.clone(), json!({})),
                nodes: vec![gpu_node("a"), gpu_node("b")],
                pods: vec![pod_on(Some("a"), json!({"nvidia.com/gpu": "2"}))],
                room: 2,
            },
            Case {
                name: "memory can be the limit",
                spec: spec(json!({"memory": "20Gi"}), json!({})),
                nodes: vec![gpu_node("a")],
                pods: vec![],
                room: 1,
            },
            Case {
                name: "a tainted node counts only for pods that tolerate it",
                spec: spec(gpu_pod.clone(), json!({})),
                nodes: vec![tainted.clone()],
                pods: vec![],
                room: 0,
            },
            Case {
                name: "tolerating pods fit on it",
                spec: spec(
                    gpu_pod.clone(),
                    json!({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}),
                ),
                nodes: vec![tainted],
                pods: vec![],
                room: 4,
            },
            Case {
                name: "real pods waiting for room come first",
                spec: spec(gpu_pod.clone(), json!({})),
                nodes: vec![gpu_node("a")],
                pods: vec![
                    pod_on(Some("a"), json!({"nvidia.com/gpu": "2"})),
                    serde_json::from_value(json!({
                        "metadata": {"name": "waiting"},
                        "spec": {"containers": [{"name": "c"}]},
                        "status": {"phase": "Pending", "conditions": [
                            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                        ]},
                    }))
                    .unwrap(),
                ],
                room: -1,
            },
        ];
        for c in cases {
            assert_eq!(
                room(&c.spec, &c.nodes, &c.pods, |_| false),
                c.room,
                "{}",
                c.name
            );
        }
    }
}
