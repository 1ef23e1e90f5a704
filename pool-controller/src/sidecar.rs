//! Before a handed-off pod may take traffic, its mesh sidecar must serve the revision it was
//! handed to. One interface, two implementations: [`NoMesh`] (nothing to wait for) and
//! [`Istio`], which reads the sidecar's Envoy configuration through the Envoy admin API
//! (port 15000, reached over a port-forward through the API server, as `istioctl` does) and
//! waits until Envoy has an inbound cluster for the revision's private Service: istiod pushes
//! one once the pod's new labels put it behind that Service.

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The sidecar container Istio injects.
pub const ISTIO_PROXY: &str = "istio-proxy";
/// Envoy's admin port in Istio's sidecar (bound to localhost in the pod).
pub const ENVOY_ADMIN_PORT: u16 = 15000;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("the sidecar's Envoy admin API is unreachable: {0}")]
    Unreachable(String),
    #[error(
        "the sidecar has no inbound cluster for {host} after {waited:?}: istiod has not pushed the revision's configuration to it (clusters seen: {seen})"
    )]
    NotSynced {
        host: String,
        waited: Duration,
        seen: String,
    },
}

impl SidecarError {
    /// The reason of the pool's condition and of the Warning event.
    pub fn reason(&self) -> &'static str {
        match self {
            SidecarError::Unreachable(_) => "SidecarUnreachable",
            SidecarError::NotSynced { .. } => "SidecarNotSynced",
        }
    }
}

/// Waits until the pod's sidecar serves `service_host` (the revision's private Service, e.g.
/// `m-00001-private.ns.svc.cluster.local`), or fails with a reason a user can act on.
pub trait SidecarVerifier: Send + Sync {
    fn verify<'a>(
        &'a self,
        pod: &'a Pod,
        service_host: &'a str,
    ) -> BoxFuture<'a, Result<(), SidecarError>>;
    fn name(&self) -> &'static str;
}

/// No mesh: a handed-off pod serves the revision as soon as it is labelled.
pub struct NoMesh;

impl SidecarVerifier for NoMesh {
    fn verify<'a>(&'a self, _: &'a Pod, _: &'a str) -> BoxFuture<'a, Result<(), SidecarError>> {
        Box::pin(async { Ok(()) })
    }
    fn name(&self) -> &'static str {
        "none"
    }
}

/// Where an Envoy admin API is.
#[derive(Clone)]
pub enum EnvoyAdmin {
    /// A pod's sidecar, through the API server's port-forward.
    PortForward { pods: Box<Api<Pod>>, pod: String },
    /// An address this process can connect to (a local Envoy, in tests).
    Direct(SocketAddr),
}

impl EnvoyAdmin {
    /// `GET path` on the admin API; the body when the status is 200.
    pub async fn get(&self, path: &str) -> Result<String, SidecarError> {
        let unreachable = |e: &dyn std::fmt::Display| SidecarError::Unreachable(e.to_string());
        match self {
            EnvoyAdmin::Direct(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| unreachable(&e))?;
                http_get(stream, path).await
            }
            EnvoyAdmin::PortForward { pods, pod } => {
                let mut pf = pods
                    .portforward(pod, &[ENVOY_ADMIN_PORT])
                    .await
                    .map_err(|e| unreachable(&e))?;
                let stream = pf
                    .take_stream(ENVOY_ADMIN_PORT)
                    .ok_or_else(|| unreachable(&"no port-forward stream"))?;
                let body = http_get(stream, path).await;
                pf.abort();
                body
            }
        }
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close` (Envoy's admin API refuses HTTP/1.0);
/// reads to the end and decodes a chunked body.
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
) -> Result<String, SidecarError> {
    let unreachable = |e: &dyn std::fmt::Display| SidecarError::Unreachable(e.to_string());
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| unreachable(&e))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| unreachable(&e))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| unreachable(&"malformed HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(unreachable(&format!("GET {path}: HTTP {status}")));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        dechunk(body).ok_or_else(|| unreachable(&"malformed chunked body"))
    } else {
        Ok(body.to_string())
    }
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Whether an Envoy `config_dump` holds an inbound cluster for `host`: Istio names inbound
/// clusters `inbound|PORT||` and lists the Services the pod serves in the cluster's
/// `istio` filter metadata.
pub fn inbound_cluster_for(config_dump: &Value, host: &str) -> bool {
    clusters(config_dump).any(|c| {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        name.starts_with("inbound|")
            && c.pointer("/metadata/filter_metadata/istio/services")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|s| s.get("host").and_then(Value::as_str) == Some(host))
    })
}

fn clusters(config_dump: &Value) -> impl Iterator<Item = &Value> {
    config_dump
        .get("configs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|cfg| {
            // A full dump nests clusters in a ClustersConfigDump; a `?resource=` dump lists
            // the DynamicCluster entries themselves.
            let nested = ["dynamic_active_clusters", "static_clusters"]
                .into_iter()
                .filter_map(move |k| cfg.get(k).and_then(Value::as_array))
                .flatten();
            std::iter::once(cfg).chain(nested)
        })
        .filter_map(|c| c.get("cluster"))
}

fn cluster_names(config_dump: &Value) -> String {
    let names: Vec<&str> = clusters(config_dump)
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Polls the admin API until the inbound cluster for `host` appears, up to `timeout`.
pub async fn wait_for_inbound_cluster(
    admin: &EnvoyAdmin,
    host: &str,
    timeout: Duration,
    every: Duration,
) -> Result<(), SidecarError> {
    let start = tokio::time::Instant::now();
    loop {
        let result = admin
            .get("/config_dump?resource=dynamic_active_clusters")
            .await
            .and_then(|body| {
                serde_json::from_str::<Value>(&body)
                    .map_err(|e| SidecarError::Unreachable(format!("config_dump is not JSON: {e}")))
            });
        let waited = start.elapsed();
        match result {
            Ok(dump) if inbound_cluster_for(&dump, host) => return Ok(()),
            Ok(dump) if waited >= timeout => {
                return Err(SidecarError::NotSynced {
                    host: host.into(),
                    waited,
                    seen: cluster_names(&dump),
                });
            }
            Err(e) if waited >= timeout => return Err(e),
            _ => tokio::time::sleep(every).await,
        }
    }
}

/// Istio: verify through the sidecar's Envoy admin API.
pub struct Istio {
    pub client: kube::Client,
    pub timeout: Duration,
}

impl SidecarVerifier for Istio {
    fn verify<'a>(
        &'a self,
        pod: &'a Pod,
        service_host: &'a str,
    ) -> BoxFuture<'a, Result<(), SidecarError>> {
        Box::pin(async move {
            if !has_istio_proxy(pod) {
                return Ok(());
            }
            let admin = EnvoyAdmin::PortForward {
                pods: Box::new(Api::namespaced(
                    self.client.clone(),
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                )),
                pod: pod.metadata.name.clone().unwrap_or_default(),
            };
            wait_for_inbound_cluster(
                &admin,
                service_host,
                self.timeout,
                Duration::from_millis(100),
            )
            .await
        })
    }
    fn name(&self) -> &'static str {
        "istio"
    }
}

/// Whether the pod runs Istio's sidecar (as a container, or a native sidecar init container).
pub fn has_istio_proxy(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| c.name == ISTIO_PROXY)
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == ISTIO_PROXY)
    })
}

/// The revision's private Service host, which Istio lists on the inbound cluster.
pub fn private_service_host(revision: &str, namespace: &str) -> String {
    format!("{revision}-private.{namespace}.svc.cluster.local")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_inbound_cluster_for_the_service() {
        let dump = json!({"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "dynamic_active_clusters": [
                {"cluster": {"name": "outbound|80||m-00001-private.ns.svc.cluster.local"}},
                {"cluster": {"name": "inbound|8012||", "metadata": {"filter_metadata": {"istio": {
                    "services": [{"host": "m-00001-private.ns.svc.cluster.local", "name": "m-00001-private", "namespace": "ns"}]
                }}}}}
            ]
        }]});
        assert!(inbound_cluster_for(
            &dump,
            "m-00001-private.ns.svc.cluster.local"
        ));
        assert!(!inbound_cluster_for(
            &dump,
            "m-00002-private.ns.svc.cluster.local"
        ));
        assert!(!inbound_cluster_for(&json!({}), "x"));
        // `?resource=dynamic_active_clusters` lists the entries themselves.
        let entries = json!({"configs": [
            {"cluster": {"name": "inbound|8012||", "metadata": {"filter_metadata": {"istio": {
                "services": [{"host": "h"}]}}}}}
        ]});
        assert!(inbound_cluster_for(&entries, "h"));
    }

    #[test]
    fn decodes_chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_deref(),
            Some("hello world")
        );
        assert_eq!(dechunk("zz\r\n"), None);
    }

    #[test]
    fn only_pods_with_the_sidecar_are_checked() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "user-container"}, {"name": "istio-proxy"}]}
        }))
        .unwrap();
        assert!(has_istio_proxy(&pod));
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "user-container"}]}
        }))
        .unwrap();
        assert!(!has_istio_proxy(&pod));
    }
}
