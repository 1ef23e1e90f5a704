//! The autoscaler plugin end to end: a real Prometheus (Debian's `prometheus`, run here as a
//! child process on loopback) scrapes a test exporter that plays the revision's pods with the
//! HTTP wrapper's and DCGM's metric names; the plugin (the real binary) queries it and feeds
//! the real Knative autoscaler over its stat websocket; the assertions are on the revision's
//! Deployment, which only the KPA scales.
//!
//! The local control plane runs Knative with `target-burst-capacity: -1` and no activator, so
//! nothing else reports load: the plugin runs with `--knative-reporters none`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use kinfer_tests::knative::{self, ready};
use kinfer_tests::{client, free_port, namespace, pods, poll, wait_for, workspace_binary};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Creates a Service, waits until it is Ready, returns its revision.
async fn ready_revision(client: &Client, ns: &str, svc: DynamicObject) -> anyhow::Result<String> {
    let services = knative::services(client, ns);
    let name = svc.metadata.name.clone().unwrap();
    services.create(&PostParams::default(), &svc).await?;
    let svc = wait_for(&services, &name, Duration::from_secs(120), ready).await?;
    Ok(knative::status_str(&svc, "latestReadyRevisionName").unwrap())
}

/// Load of one revision, as the sum over its pods; the exporter spreads it evenly over the
/// revision's running pods, as a load balancer would.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    in_flight: f64,
    queued: f64,
    /// GPU-seconds of work per second; each pod's GPU is at most 100% busy.
    gpu_busy: Option<f64>,
}

/// Plays the pods of the namespace's revisions on a loopback metrics endpoint.
struct Exporter {
    port: u16,
    load: Arc<Mutex<HashMap<String, Load>>>,
}

impl Exporter {
    async fn start(client: Client, ns: String) -> anyhow::Result<Self> {
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

    fn set(&self, revision: &str, load: Load) {
        self.load.lock().unwrap().insert(revision.to_string(), load);
    }
}

/// The wrapper's gauges and DCGM's GPU gauge for each pod, labelled as Prometheus'
/// Kubernetes discovery and the DCGM exporter label them.
fn exposition(ns: &str, pods: &[(String, String)], load: &HashMap<String, Load>) -> String {
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
async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
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
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn logs_dir(ns: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/autoscaler-plugin-tests")
        .join(ns);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Debian's Prometheus, scraping `targets` every second.
async fn start_prometheus(
    dir: &std::path::Path,
    exporter_port: u16,
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
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: revision-pods\n    honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n"
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
struct Plugin {
    _child: Child,
    admin_port: u16,
    log: PathBuf,
}

impl Plugin {
    async fn start(
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

    async fn metric(&self, series: &str) -> anyhow::Result<Option<f64>> {
        let (_, body) = http_get(self.admin_port, "/metrics").await?;
        Ok(sample(&body, series))
    }
}

async fn replicas(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<Option<i32>> {
    Ok(deployments.get(name).await?.spec.replicas)
}

/// Waits until the Deployment's replicas equal `n`, returning how long it took.
async fn reaches(
    deployments: &Api<Deployment>,
    name: &str,
    n: i32,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    wait_for(deployments, name, timeout, |d| d.spec.replicas == Some(n)).await?;
    Ok(start.elapsed())
}

struct Bed {
    client: Client,
    ns: String,
    deployments: Api<Deployment>,
    exporter: Exporter,
    _prometheus: Child,
    prometheus_port: u16,
    dir: PathBuf,
}

async fn bed(test: &str) -> anyhow::Result<Option<Bed>> {
    let client = client().await?;
    let ns = namespace(&client, test).await?;
    let dir = logs_dir(&ns)?;
    let exporter = Exporter::start(client.clone(), ns.clone()).await?;
    let Some((prometheus, prometheus_port)) = start_prometheus(&dir, exporter.port).await? else {
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

#[tokio::test]
async fn requests_mode_scales_the_revision_and_leaves_others_alone() -> anyhow::Result<()> {
    let Some(bed) = bed("as-requests").await? else {
        return Ok(());
    };
    // Revision names are known in advance (`<service>-00001`), so the load and the plugin
    // are in place before the revisions exist: a revision at zero has no pods to report
    // (waking it is the activator's job, and the local control plane has none).
    let (driven, plain) = ("model-00001".to_string(), "plain-00001".to_string());
    bed.exporter.set(
        &plain,
        Load {
            in_flight: 100.0,
            queued: 90.0,
            gpu_busy: None,
        },
    );
    bed.exporter.set(
        &driven,
        Load {
            in_flight: 14.0,
            queued: 0.0,
            gpu_busy: None,
        },
    );
    let plugin = Plugin::start(
        &bed.dir,
        &bed.ns,
        bed.prometheus_port,
        &knative::autoscaler_addr(&bed.client).await?,
    )
    .await?;
    // Not opted in: Knative alone decides; min-scale 1 keeps it at one pod, whatever load the
    // exporter claims for it.
    ready_revision(
        &bed.client,
        &bed.ns,
        knative::service(
            "plain",
            json!({
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "1",
            }),
        ),
    )
    .await?;
    ready_revision(
        &bed.client,
        &bed.ns,
        knative::service(
            "model",
            json!({
                "kinfer.dev/autoscaling": "requests",
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "0",
            }),
        ),
    )
    .await?;
    let driven_dep = format!("{driven}-deployment");
    let plain_dep = format!("{plain}-deployment");
    // 14 requests: ceil(14 / (10 × 0.7)) = 2 pods.
    reaches(&bed.deployments, &driven_dep, 2, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;

    // Step: 35 requests in the pods, 30 of them queued behind a batching server → 5 pods.
    bed.exporter.set(
        &driven,
        Load {
            in_flight: 35.0,
            queued: 30.0,
            gpu_busy: None,
        },
    );
    let up = reaches(&bed.deployments, &driven_dep, 5, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    eprintln!(
        "reaction: load step 14 → 35 at the source to {driven_dep} replicas 5 in {up:.2?} (Prometheus scrape 1s, plugin interval 1s)"
    );
    // Held while the load lasts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(replicas(&bed.deployments, &driven_dep).await?, Some(5));
    assert_eq!(
        plugin
            .metric(&format!(
                r#"kinfer_autoscaler_plugin_decision_kpa_pods{{namespace="{}",revision="{driven}"}}"#,
                bed.ns
            ))
            .await?,
        Some(5.0)
    );
    assert!(
        plugin
            .metric("kinfer_autoscaler_plugin_stats_sent_total")
            .await?
            .unwrap_or(0.0)
            >= 5.0
    );

    // A second step: 14 requests → 2 pods.
    bed.exporter.set(
        &driven,
        Load {
            in_flight: 14.0,
            queued: 0.0,
            gpu_busy: None,
        },
    );
    let down = reaches(&bed.deployments, &driven_dep, 2, Duration::from_secs(90)).await?;
    eprintln!("load step 35 → 14: {driven_dep} replicas 2 in {down:.2?}");

    // The load stops: scale to zero.
    bed.exporter.set(&driven, Load::default());
    let zero = reaches(&bed.deployments, &driven_dep, 0, Duration::from_secs(180)).await?;
    eprintln!("load stopped: {driven_dep} scaled to zero in {zero:.2?}");

    // The plain revision never moved.
    assert_eq!(replicas(&bed.deployments, &plain_dep).await?, Some(1));
    assert_eq!(
        plugin.metric(&format!(r#"kinfer_autoscaler_plugin_decision_kpa_pods{{namespace="{}",revision="{plain}"}}"#, bed.ns)).await?,
        None
    );
    Ok(())
}

#[tokio::test]
async fn gpu_mode_converges_on_gpu_busy_time_and_publishes_a_forecast() -> anyhow::Result<()> {
    let Some(bed) = bed("as-gpu").await? else {
        return Ok(());
    };
    let revision = ready_revision(
        &bed.client,
        &bed.ns,
        knative::service(
            "llm",
            json!({
                "kinfer.dev/autoscaling": "gpu",
                "kinfer.dev/autoscaling-gpu-target": "80",
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "0",
            }),
        ),
    )
    .await?;
    // A WarmPool for the Configuration, when the CRD is installed.
    let wp_api: Api<DynamicObject> = Api::namespaced_with(
        bed.client.clone(),
        &bed.ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("kinfer.dev", "v1alpha1", "WarmPool"),
            "warmpools",
        ),
    );
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kinfer.dev/v1alpha1", "kind": "WarmPool",
        "metadata": { "name": "llm-pool" },
        "spec": { "configurationRef": { "name": "llm" }, "minReady": 0, "sizing": "predictive" }
    }))?;
    let have_pool = match wp_api.create(&PostParams::default(), &pool).await {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            eprintln!("the WarmPool CRD is not installed: checking the forecast metric only");
            false
        }
        Err(e) => return Err(e.into()),
    };

    let plugin = Plugin::start(
        &bed.dir,
        &bed.ns,
        bed.prometheus_port,
        &knative::autoscaler_addr(&bed.client).await?,
    )
    .await?;
    let dep = format!("{revision}-deployment");
    // 2.4 GPUs' worth of work, few requests in flight (a batching server): at an 80% target
    // that is 3 pods. Each pod's GPU is at most 100% busy, so from one pod the plugin first
    // sees 1.0 (→ 2 pods), then 2 × 1.0 (→ 3), then 3 × 0.8 (→ 3, steady).
    bed.exporter.set(
        &revision,
        Load {
            in_flight: 3.0,
            queued: 0.0,
            gpu_busy: Some(2.4),
        },
    );
    let up = reaches(&bed.deployments, &dep, 3, Duration::from_secs(90))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    eprintln!("gpu mode: 2.4 busy GPUs → {dep} replicas 3 in {up:.2?}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        replicas(&bed.deployments, &dep).await?,
        Some(3),
        "no overshoot once at 80% busy"
    );

    let gauge = format!(
        r#"kinfer_autoscaler_plugin_forecast_replicas{{configuration="llm",namespace="{}"}}"#,
        bed.ns
    );
    poll(Duration::from_secs(30), || async {
        Ok(plugin.metric(&gauge).await? == Some(3.0))
    })
    .await
    .context("forecast gauge")?;
    if have_pool {
        let pool = wait_for(&wp_api, "llm-pool", Duration::from_secs(30), |p| {
            p.data
                .pointer("/status/demandForecast/replicas")
                .and_then(|v| v.as_i64())
                == Some(3)
        })
        .await?;
        let f = &pool.data["status"]["demandForecast"];
        assert_eq!(f["horizonSeconds"], 30);
        assert_eq!(f["source"], "prometheus");
        assert!(f["observedAt"].as_str().unwrap().ends_with('Z'), "{f}");
        let managers: Vec<_> = pool
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.manager)
            .collect();
        assert!(
            managers.contains(&"kinfer-autoscaler-plugin".to_string()),
            "{managers:?}"
        );
    }

    bed.exporter.set(
        &revision,
        Load {
            in_flight: 0.0,
            queued: 0.0,
            gpu_busy: Some(0.0),
        },
    );
    reaches(&bed.deployments, &dep, 0, Duration::from_secs(180)).await?;
    Ok(())
}

/// A TCP proxy in front of the Knative autoscaler that can drop every connection and refuse
/// new ones for a while, as an autoscaler restart does (its stat server goes away, closing the
/// plugin's websocket, and comes back on the same address).
struct Flaky {
    port: u16,
    down: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Flaky {
    async fn start(upstream: String) -> anyhow::Result<Self> {
        let port = free_port()?;
        let (down, _) = tokio::sync::watch::channel(false);
        let down = Arc::new(down);
        let d = down.clone();
        tokio::spawn(async move {
            loop {
                // Listen only while up.
                let mut rx = d.subscribe();
                let _ = rx.wait_for(|down| !*down).await;
                let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                loop {
                    tokio::select! {
                        _ = rx.wait_for(|down| *down) => break,
                        accepted = listener.accept() => {
                            let Ok((mut conn, _)) = accepted else { continue };
                            let upstream = upstream.clone();
                            let mut rx = d.subscribe();
                            tokio::spawn(async move {
                                let Ok(mut up) = TcpStream::connect(&upstream).await else { return };
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                                    _ = rx.wait_for(|down| *down) => {}
                                }
                            });
                        }
                    }
                }
            }
        });
        Ok(Self { port, down })
    }

    fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

#[tokio::test]
async fn scaling_resumes_after_the_autoscaler_connection_drops() -> anyhow::Result<()> {
    let Some(bed) = bed("as-fault").await? else {
        return Ok(());
    };
    let revision = ready_revision(
        &bed.client,
        &bed.ns,
        knative::service(
            "model",
            json!({
                "kinfer.dev/autoscaling": "requests",
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "1",
            }),
        ),
    )
    .await?;
    let flaky = Flaky::start(knative::autoscaler_addr(&bed.client).await?).await?;
    let plugin = Plugin::start(
        &bed.dir,
        &bed.ns,
        bed.prometheus_port,
        &format!("127.0.0.1:{}", flaky.port),
    )
    .await?;
    let dep = format!("{revision}-deployment");
    bed.exporter.set(
        &revision,
        Load {
            in_flight: 14.0,
            queued: 0.0,
            gpu_busy: None,
        },
    );
    reaches(&bed.deployments, &dep, 2, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    let connects = plugin
        .metric("kinfer_autoscaler_plugin_autoscaler_connects_total")
        .await?
        .unwrap_or(0.0);

    // The stat server goes away for 5 s: the socket closes, reconnects are refused.
    flaky.set_down(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        plugin
            .metric("kinfer_autoscaler_plugin_send_failures_total")
            .await?
            .unwrap_or(0.0)
            >= 1.0
    );
    flaky.set_down(false);
    // Back: the plugin reconnects on its own and the next load step goes through.
    bed.exporter.set(
        &revision,
        Load {
            in_flight: 35.0,
            queued: 0.0,
            gpu_busy: None,
        },
    );
    let t = reaches(&bed.deployments, &dep, 5, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    eprintln!("after the outage: {dep} replicas 5 in {t:.2?} after the stat server came back");
    let reconnects = plugin
        .metric("kinfer_autoscaler_plugin_autoscaler_connects_total")
        .await?
        .unwrap_or(0.0);
    assert!(
        reconnects > connects,
        "connects before {connects}, after {reconnects}"
    );
    Ok(())
}
