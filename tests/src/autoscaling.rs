//! The autoscaler plugin's test bed: a loopback exporter that plays a namespace's revision
//! pods with the HTTP wrapper's and DCGM's metric names, Debian's Prometheus scraping it, and
//! the plugin binary feeding the real Knative autoscaler. Used by the plugin's end-to-end
//! tests and its reaction benchmark.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::{Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::{client, free_port, namespace, pods, poll, wait_for, workspace_binary};

/// Load of one revision, as the sum over its pods; the exporter spreads it evenly over the
/// revision's running pods, as a load balancer would.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub in_flight: f64,
    pub queued: f64,
    /// GPU-seconds of work per second; each pod's GPU is at most 100% busy.
    pub gpu_busy: Option<f64>,
}

impl Load {
    /// Requests in flight at the revision's pods, none queued, no GPU.
    pub fn requests(in_flight: f64) -> Self {
        Self {
            in_flight,
            ..Self::default()
        }
    }
}

/// Plays the pods of the namespace's revisions on a loopback metrics endpoint.
pub struct Exporter {
    pub port: u16,
    load: Arc<Mutex<HashMap<String, Load>>>,
}

impl Exporter {
    pub async fn start(client: Client, ns: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let load: Arc<Mutex<HashMap<String, Load>>> = Default::default();
        let pods_now: Arc<Mutex<Vec<(String, String)>>> = Default::default();
        {
            let pods_now = pods_now.clone();
            let pods_ns = ns.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(list) = pods(&client, &pods_ns, "serving.knative.dev/revision").await
                    {
                        let running = list
                            .iter()
                            .filter(|p| {
                                p.metadata.deletion_timestamp.is_none()
                                    && p.status.as_ref().and_then(|s| s.phase.as_deref())
                                        == Some("Running")
                            })
                            .map(|p| {
                                (
                                    p.name_any(),
                                    p.labels()["serving.knative.dev/revision"].clone(),
                                )
                            })
                            .collect();
                        *pods_now.lock().unwrap() = running;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
        }
        {
            let load = load.clone();
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let body = {
                        let pods = pods_now.lock().unwrap().clone();
                        let load = load.lock().unwrap().clone();
                        exposition(&ns, &pods, &load)
                    };
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = conn.read(&mut buf).await;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(resp.as_bytes()).await;
                    });
                }
            });
        }
        Ok(Self { port, load })
    }

    pub fn set(&self, revision: &str, load: Load) {
        self.load.lock().unwrap().insert(revision.to_string(), load);
    }
}

/// The wrapper's gauges and DCGM's GPU gauge for each pod, labelled as Prometheus'
/// Kubernetes discovery and the DCGM exporter label them.
pub fn exposition(ns: &str, pods: &[(String, String)], load: &HashMap<String, Load>) -> String {
    let mut counts: HashMap<&str, f64> = HashMap::new();
    for (_, rev) in pods {
        *counts.entry(rev).or_default() += 1.0;
    }
    let mut out = String::from(
        "# TYPE kinfer_wrapper_requests_in_flight gauge\n# TYPE kinfer_wrapper_queue_depth gauge\n# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n",
    );
    for (i, (pod, rev)) in pods.iter().enumerate() {
        let l = load.get(rev).copied().unwrap_or_default();
        let n = counts[rev.as_str()];
        let labels = format!("namespace=\"{ns}\",pod=\"{pod}\"");
        out.push_str(&format!(
            "kinfer_wrapper_requests_in_flight{{{labels}}} {}\n",
            l.in_flight / n
        ));
        out.push_str(&format!(
            "kinfer_wrapper_queue_depth{{{labels}}} {}\n",
            l.queued / n
        ));
        if let Some(busy) = l.gpu_busy {
            let util = (busy / n).min(1.0) * 100.0;
            out.push_str(&format!(
                "DCGM_FI_DEV_GPU_UTIL{{gpu=\"0\",UUID=\"GPU-{i:08x}\",device=\"nvidia0\",modelName=\"NVIDIA L4\",container=\"user-container\",{labels}}} {util}\n"
            ));
        }
    }
    out
}

/// A minimal HTTP GET over loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP status")?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one sample in a text exposition, e.g. `name{labels}`.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn logs_dir(ns: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/autoscaler-plugin-tests")
        .join(ns);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Debian's Prometheus, scraping the exporter every `scrape_interval`.
pub async fn start_prometheus(
    dir: &std::path::Path,
    exporter_port: u16,
    scrape_interval: Duration,
) -> anyhow::Result<Option<(Child, u16)>> {
    let Some(binary) = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        eprintln!(
            "SKIPPED: prometheus is not installed (apt-get install prometheus; .ci/run installs it)"
        );
        return Ok(None);
    };
    let port = free_port()?;
    let config = dir.join("prometheus.yml");
    let every = format!("{}ms", scrape_interval.as_millis());
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: {every}\n  evaluation_interval: {every}\nscrape_configs:\n  - job_name: revision-pods\n    honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let child = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting prometheus")?;
    poll(Duration::from_secs(60), || async {
        Ok(matches!(http_get(port, "/-/ready").await, Ok((200, _))))
    })
    .await
    .context("prometheus did not become ready")?;
    Ok(Some((child, port)))
}

/// The plugin binary, driving the test namespace only.
pub struct Plugin {
    _child: Child,
    pub admin_port: u16,
    pub log: PathBuf,
}

impl Plugin {
    pub async fn start(
        dir: &std::path::Path,
        ns: &str,
        prometheus_port: u16,
        autoscaler: &str,
    ) -> anyhow::Result<Self> {
        let binary =
            workspace_binary("kinfer-autoscaler-plugin", "kinfer-autoscaler-plugin").await?;
        let admin_port = free_port()?;
        let log = dir.join("plugin.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--namespace", ns])
            .args([
                "--prometheus-url",
                &format!("http://127.0.0.1:{prometheus_port}"),
            ])
            .args(["--autoscaler-url", &format!("ws://{autoscaler}")])
            .args(["--knative-reporters", "none"])
            .args(["--forecast-horizon", "30s"])
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting the plugin")?;
        poll(Duration::from_secs(60), || async {
            Ok(matches!(
                http_get(admin_port, "/readyz").await,
                Ok((200, _))
            ))
        })
        .await
        .with_context(|| format!("the plugin did not become ready; log: {}", log.display()))?;
        Ok(Self {
            _child: child,
            admin_port,
            log,
        })
    }

    pub async fn metric(&self, series: &str) -> anyhow::Result<Option<f64>> {
        let (_, body) = http_get(self.admin_port, "/metrics").await?;
        Ok(sample(&body, series))
    }
}

pub async fn replicas(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<Option<i32>> {
    Ok(deployments.get(name).await?.spec.replicas)
}

/// Waits until the Deployment's replicas equal `n`, returning how long it took.
pub async fn reaches(
    deployments: &Api<Deployment>,
    name: &str,
    n: i32,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    wait_for(deployments, name, timeout, |d| d.spec.replicas == Some(n)).await?;
    Ok(start.elapsed())
}

pub struct Bed {
    pub client: Client,
    pub ns: String,
    pub deployments: Api<Deployment>,
    pub exporter: Exporter,
    _prometheus: Child,
    pub prometheus_port: u16,
    pub dir: PathBuf,
}

impl Bed {
    /// The plugin binary for this bed's namespace, feeding the cluster's Knative autoscaler.
    pub async fn plugin(&self) -> anyhow::Result<Plugin> {
        let autoscaler = crate::knative::autoscaler_addr(&self.client).await?;
        Plugin::start(&self.dir, &self.ns, self.prometheus_port, &autoscaler).await
    }

    /// Creates a Knative Service in the bed's namespace, waits until it is Ready and returns
    /// its revision.
    pub async fn revision(&self, svc: kube::api::DynamicObject) -> anyhow::Result<String> {
        let svc = crate::knative::create_ready(&self.client, &self.ns, svc).await?;
        crate::knative::status_str(&svc, "latestReadyRevisionName")
            .context("a Ready Service names its revision")
    }
}

/// A namespace, an exporter for its revisions' pods and a Prometheus scraping it every
/// `scrape_interval`; `None` (the caller skips) when Prometheus is not installed.
pub async fn bed(test: &str, scrape_interval: Duration) -> anyhow::Result<Option<Bed>> {
    let client = client().await?;
    let ns = namespace(&client, test).await?;
    let dir = logs_dir(&ns)?;
    let exporter = Exporter::start(client.clone(), ns.clone()).await?;
    let Some((prometheus, prometheus_port)) =
        start_prometheus(&dir, exporter.port, scrape_interval).await?
    else {
        return Ok(None);
    };
    Ok(Some(Bed {
        deployments: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        exporter,
        _prometheus: prometheus,
        prometheus_port,
        dir,
    }))
}
