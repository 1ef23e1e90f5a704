//! Helpers shared by the integration tests. Every test runs against the cluster that
//! `hack/with-cluster` started (through `KUBECONFIG`), in a namespace of its own.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

/// A client for the test cluster. Fails with a hint when the test was not started through
/// `hack/with-cluster`.
pub async fn client() -> anyhow::Result<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        bail!(
            "KUBECONFIG is not set: run integration tests through `make integration` or `hack/with-cluster cargo test -p kinfer-tests`"
        );
    }
    Client::try_default()
        .await
        .context("building a client from KUBECONFIG")
}

/// Creates a namespace named after the test, unique per run.
pub async fn namespace(client: &Client, test: &str) -> anyhow::Result<String> {
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let name = format!("{}-{suffix:x}", test.replace('_', "-"));
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([("kinfer.dev/test".to_string(), test.to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    // Pods cannot be created before the namespace's default ServiceAccount exists.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), &name);
    poll(Duration::from_secs(30), || async {
        Ok(sas.get_opt("default").await?.is_some())
    })
    .await
    .context("default ServiceAccount")?;
    Ok(name)
}

/// Polls `check` every 100 ms until it returns true; fails after `timeout`.
pub async fn poll<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the object exists and `cond` holds for it; returns the object.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    cond: impl Fn(&K) -> bool,
) -> anyhow::Result<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let start = Instant::now();
    loop {
        let obj = api.get_opt(name).await?;
        if let Some(obj) = obj.as_ref().filter(|o| cond(o)) {
            return Ok(obj.clone());
        }
        if start.elapsed() > timeout {
            bail!("{name}: condition not met within {timeout:?}; last seen: {obj:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn pod_condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod_condition(pod, "Ready").as_deref() == Some("True")
}

/// Pods of the namespace that match a label selector.
pub async fn pods(client: &Client, ns: &str, selector: &str) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

/// The scheduler's verdict on a pod it could not place: `Some(message)` when the pod's
/// PodScheduled condition is False with reason Unschedulable.
pub fn unschedulable_message(pod: &Pod) -> Option<String> {
    let cond = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled")?;
    (cond.status == "False" && cond.reason.as_deref() == Some("Unschedulable"))
        .then(|| cond.message.clone().unwrap_or_default())
}

pub mod autoscaling;

/// Knative Serving objects, read through the dynamic API (Knative ships no Rust types).
pub mod knative {
    use std::time::Duration;

    use anyhow::Context;
    use k8s_openapi::api::core::v1::Endpoints;
    use kube::Client;
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};

    pub fn api(
        client: &Client,
        ns: &str,
        group: &str,
        version: &str,
        kind: &str,
    ) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        Api::namespaced_with(client.clone(), ns, &resource)
    }

    pub fn services(client: &Client, ns: &str) -> Api<DynamicObject> {
        api(client, ns, "serving.knative.dev", "v1", "Service")
    }
    pub fn routes(client: &Client, ns: &str) -> Api<DynamicObject> {
        api(client, ns, "serving.knative.dev", "v1", "Route")
    }
    pub fn revisions(client: &Client, ns: &str) -> Api<DynamicObject> {
        api(client, ns, "serving.knative.dev", "v1", "Revision")
    }
    pub fn pod_autoscalers(client: &Client, ns: &str) -> Api<DynamicObject> {
        api(
            client,
            ns,
            "autoscaling.internal.knative.dev",
            "v1alpha1",
            "PodAutoscaler",
        )
    }

    /// The status of a condition, e.g. `Ready`, once the status reflects the latest spec.
    pub fn condition(obj: &DynamicObject, kind: &str) -> Option<String> {
        let status = obj.data.get("status")?;
        let observed = status.get("observedGeneration").and_then(|g| g.as_i64());
        if observed != obj.metadata.generation {
            return None;
        }
        status
            .get("conditions")?
            .as_array()?
            .iter()
            .find(|c| c.get("type").and_then(|t| t.as_str()) == Some(kind))
            .and_then(|c| c.get("status")?.as_str().map(str::to_string))
    }

    pub fn ready(obj: &DynamicObject) -> bool {
        condition(obj, "Ready").as_deref() == Some("True")
    }

    /// A Knative Service with these revision-template annotations and one container.
    pub fn service(name: &str, annotations: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": { "name": name },
            "spec": { "template": {
                "metadata": { "annotations": annotations },
                "spec": { "containers": [{ "image": "dev.local/model" }] }
            }}
        }))
        .expect("a valid Service")
    }

    /// Creates the Service and waits until it is Ready; returns it.
    pub async fn create_ready(
        client: &Client,
        ns: &str,
        svc: DynamicObject,
    ) -> anyhow::Result<DynamicObject> {
        let services = services(client, ns);
        let name = svc.metadata.name.clone().expect("a named Service");
        services.create(&PostParams::default(), &svc).await?;
        crate::wait_for(&services, &name, Duration::from_secs(120), ready).await
    }

    /// The KPA stat server's `ip:port`, found the way an in-cluster client would: from the
    /// `autoscaler` Service's endpoints in knative-serving.
    pub async fn autoscaler_addr(client: &Client) -> anyhow::Result<String> {
        let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "knative-serving");
        let ep = endpoints.get("autoscaler").await?;
        let subset = ep
            .subsets
            .as_ref()
            .and_then(|s| s.first())
            .context("no subsets")?;
        let ip = &subset
            .addresses
            .as_ref()
            .and_then(|a| a.first())
            .context("no address")?
            .ip;
        let port = subset
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .context("no port")?
            .port;
        Ok(format!("{ip}:{port}"))
    }

    /// The KPA stat websocket's URL.
    pub async fn autoscaler_url(client: &Client) -> anyhow::Result<String> {
        Ok(format!("ws://{}", autoscaler_addr(client).await?))
    }

    /// Reports `concurrency` for the revision to the KPA once a second, as one revision-wide
    /// total, until the returned token is cancelled (or dropped and cancelled by the caller).
    pub fn feed_kpa(
        url: String,
        ns: &str,
        revision: &str,
        concurrency: f64,
    ) -> tokio_util::sync::CancellationToken {
        use kinfer_core::kpa::{StatSender, WireStatMessage, WireStatMessages};
        let stop = tokio_util::sync::CancellationToken::new();
        let sender = StatSender::spawn(url, stop.clone(), None);
        let (ns, revision, token) = (ns.to_string(), revision.to_string(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !token.is_cancelled() {
                tick.tick().await;
                sender.send(WireStatMessages {
                    messages: vec![WireStatMessage::concurrency(
                        &ns,
                        &revision,
                        "kinfer-test",
                        concurrency,
                    )],
                });
            }
        });
        stop
    }

    /// A string field of the object's status, e.g. `latestReadyRevisionName`.
    pub fn status_str(obj: &DynamicObject, field: &str) -> Option<String> {
        obj.data
            .get("status")?
            .get(field)?
            .as_str()
            .map(str::to_string)
    }
}

/// The pool controller as a local process, watching one test namespace only (so parallel
/// tests never share one), with its leader-election Lease in that namespace.
pub mod pool {
    use std::path::PathBuf;
    use std::process::Stdio;
    use std::time::Duration;

    use anyhow::{Context, bail};
    use tokio::process::{Child, Command};

    fn workspace() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// Builds `kinfer-pool-controller` (a no-op when it is up to date) and returns its path.
    pub async fn binary() -> anyhow::Result<PathBuf> {
        static BUILT: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
        BUILT
            .get_or_try_init(|| async {
                let status = Command::new(env!("CARGO"))
                    .args(["build", "-q", "--offline", "-p", "kinfer-pool-controller"])
                    .current_dir(workspace())
                    .status()
                    .await
                    .context("running cargo build -p kinfer-pool-controller")?;
                if !status.success() {
                    bail!("cargo build -p kinfer-pool-controller failed");
                }
                Ok(workspace().join("target/debug/kinfer-pool-controller"))
            })
            .await
            .cloned()
    }

    /// The controller's log: `$KINFER_CLUSTER_DIR/pool-controller-<ns>.log` (kept with the
    /// cluster's state for post-mortems), else discarded.
    fn log_file(ns: &str) -> anyhow::Result<Stdio> {
        Ok(match std::env::var_os("KINFER_CLUSTER_DIR") {
            Some(dir) => {
                let path = PathBuf::from(dir).join(format!("pool-controller-{ns}.log"));
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?
                    .into()
            }
            None => Stdio::null(),
        })
    }

    pub struct PoolController {
        child: Child,
        pub admin: String,
    }

    impl PoolController {
        /// Starts the controller for `ns` and waits until its /readyz is green (it holds the
        /// Lease and its WarmPool cache has synced).
        pub async fn start(ns: &str) -> anyhow::Result<Self> {
            Self::start_with_env(ns, &[]).await
        }

        /// A controller for every namespace (benchmarks that span many namespaces), with
        /// its Lease in `lease_ns`.
        pub async fn start_cluster_wide(lease_ns: &str) -> anyhow::Result<Self> {
            Self::spawn(lease_ns, None, &[]).await
        }

        /// Like [`Self::start`], with extra environment (e.g. `KINFER_POOL_CRASH_AFTER`).
        pub async fn start_with_env(ns: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
            Self::spawn(ns, Some(ns), env).await
        }

        async fn spawn(
            lease_ns: &str,
            watch_ns: Option<&str>,
            env: &[(&str, &str)],
        ) -> anyhow::Result<Self> {
            let ns = lease_ns;
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                l.local_addr()?.port()
            };
            let admin = format!("127.0.0.1:{port}");
            let child = Command::new(binary().await?)
                .args(watch_ns.map(|w| ["--namespace", w]).into_iter().flatten())
                .args([
                    "--admin-addr",
                    &admin,
                    "--lease-namespace",
                    ns,
                    "--lease-duration-seconds",
                    "3",
                    "--log",
                    "info,kube=warn",
                ])
                .envs(env.iter().copied())
                .stdout(log_file(ns)?)
                .kill_on_drop(true)
                .spawn()
                .context("starting kinfer-pool-controller")?;
            let me = Self { child, admin };
            me.wait_ready().await?;
            Ok(me)
        }

        async fn wait_ready(&self) -> anyhow::Result<()> {
            let url = format!("{}/readyz", self.admin);
            crate::poll(Duration::from_secs(60), || async {
                Ok(http_get(&url)
                    .await
                    .map(|(code, _)| code == 200)
                    .unwrap_or(false))
            })
            .await
            .context("pool controller /readyz")?;
            Ok(())
        }

        /// The controller's Prometheus metrics text.
        pub async fn metrics(&self) -> anyhow::Result<String> {
            Ok(http_get(&format!("{}/metrics", self.admin)).await?.1)
        }

        /// Waits for the process to exit on its own (e.g. at a crash point).
        pub async fn wait_exit(mut self, timeout: Duration) -> anyhow::Result<()> {
            tokio::time::timeout(timeout, self.child.wait())
                .await
                .context("the pool controller did not exit")??;
            Ok(())
        }

        /// SIGKILL: no chance to clean up or release the Lease.
        pub async fn kill(mut self) -> anyhow::Result<()> {
            self.child.kill().await?;
            Ok(())
        }
    }

    async fn http_get(addr_path: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, path) = addr_path.split_once('/').unwrap_or((addr_path, ""));
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        Ok((code, body))
    }
}

/// A workspace binary, built on first use (`cargo build -p PACKAGE --bin BIN`), for tests that
/// run a kinfer component as a child process. Returns its path.
pub async fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<std::path::PathBuf> {
    static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = BUILD.lock().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = tokio::process::Command::new(cargo)
        .current_dir(root)
        .args(["build", "--offline", "--quiet", "-p", package, "--bin", bin])
        .status()
        .await
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p {package} --bin {bin} failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug").join(bin))
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
