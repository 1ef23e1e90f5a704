//! The webhook's failure policy and certificate rotation on the local control plane
//! (`hack/with-cluster --kinfer`). Its own test binary because it disturbs the webhook: it
//! stops the one with-cluster started (SIGSTOP, always SIGCONT again) and starts a second
//! instance with short-lived certificates. The two tests here take turns (one lock), since
//! both change what happens to every kinfer Pod in the cluster.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Secret, Service};
use kinfer_tests::knative::{self, ready};
use kinfer_tests::{client, namespace, pod_ready, pods, poll, wait_for};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

static TURNS: Mutex<()> = Mutex::const_new(());

/// Failure policy for Deployments, Pods and Services, as webhook/README.md documents it.
const DEPLOYMENT_WEBHOOK: &str = "deployments.kinfer.dev";
const POD_WEBHOOK: &str = "pods.kinfer.dev";
const SERVICE_WEBHOOK: &str = "services.kinfer.dev";

/// The with-cluster webhook, stopped while this lives; continued on drop, also when the test
/// fails or panics.
struct Stopped(u32);

impl Stopped {
    fn webhook() -> anyhow::Result<Self> {
        let pid: u32 = std::env::var("KINFER_WEBHOOK_PID")
            .context("KINFER_WEBHOOK_PID is not set: run through `hack/with-cluster --kinfer`")?
            .parse()?;
        signal(pid, "STOP")?;
        Ok(Self(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Err(e) = signal(self.0, "CONT") {
            eprintln!("could not continue the webhook (pid {}): {e:#}", self.0);
        }
    }
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid}: {status}");
    }
    Ok(())
}

/// A Pod template in the Pod webhook's scope: a Knative revision label and a kinfer
/// annotation (a CPU handler, so it needs no GPU but is visibly mutated).
fn kinfer_pod_template(revision: &str) -> serde_json::Value {
    json!({
        "metadata": {
            "labels": { "app": revision, "serving.knative.dev/revision": revision },
            "annotations": { "kinfer.dev/handler": "model:predict" }
        },
        "spec": { "containers": [{ "name": "user-container", "image": "dev.local/model" }] }
    })
}

fn kinfer_pod(name: &str) -> Pod {
    let mut pod = kinfer_pod_template("direct");
    pod["metadata"]["name"] = json!(name);
    serde_json::from_value(pod).unwrap()
}

fn has_wrapper(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|i| i.iter().any(|c| c.name == "kinfer-wrapper-install"))
}

fn deployment(name: &str, template: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": template["metadata"]["labels"]["app"] } },
            "template": template,
        }
    }))
    .unwrap()
}

/// A Deployment shaped like the one Knative makes for a revision: the revision label on the
/// Deployment itself (the Deployment webhook's objectSelector) and on its Pods.
fn revision_deployment(name: &str, replicas: i32) -> Deployment {
    let mut d = deployment(name, kinfer_pod_template(name));
    d.metadata.labels =
        Some([("serving.knative.dev/revision".to_string(), name.to_string())].into());
    d.spec.replicas = Some(replicas);
    d
}

fn template_has_wrapper(d: &Deployment) -> bool {
    let template = &d.spec.template;
    let placed = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.get("kinfer.dev/placed"))
        .is_some();
    let init = template
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref());
    placed && init.is_some_and(|i| i.iter().any(|c| c.name == "kinfer-wrapper-install"))
}

/// Ready Pods with the wrapper, of the Deployment whose Pods are labelled `app=<app>`.
async fn ready_wrapped_pods(client: &kube::Client, ns: &str, app: &str) -> anyhow::Result<usize> {
    let list = pods(client, ns, &format!("app={app}")).await?;
    Ok(list
        .iter()
        .filter(|p| pod_ready(p) && has_wrapper(p))
        .count())
}

#[tokio::test]
async fn knatives_spec_rewrite_is_placed_again() -> anyhow::Result<()> {
    let _turn = TURNS.lock().await;
    let client = client().await?;
    let ns = namespace(&client, "admit-rewrite").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let created = deployments
        .create(&PostParams::default(), &revision_deployment("rev", 0))
        .await?;
    assert!(template_has_wrapper(&created), "{created:?}");
    // Knative's drift update puts its own (unplaced) spec back when its wanted Deployment
    // changes, e.g. a new queue-proxy image: the webhook places it again.
    let mut rewritten = created.clone();
    // Unconditional (the Deployment controller writes its status meanwhile).
    rewritten.metadata.resource_version = None;
    let mut template: k8s_openapi::api::core::v1::PodTemplateSpec =
        serde_json::from_value(kinfer_pod_template("rev"))?;
    template.spec.as_mut().unwrap().containers[0].image = Some("dev.local/model:v2".into());
    rewritten.spec.template = template;
    let updated = deployments
        .replace("rev", &PostParams::default(), &rewritten)
        .await?;
    assert!(template_has_wrapper(&updated), "{updated:?}");
    let image = &updated.spec.template.spec.as_ref().unwrap().containers[0].image;
    assert_eq!(image.as_deref(), Some("dev.local/model:v2"));
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_outage_blocks_only_kinfer_pods_and_services() -> anyhow::Result<()> {
    let _turn = TURNS.lock().await;
    let client = client().await?;
    let ns = namespace(&client, "admit-outage").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let services = knative::services(&client, &ns);

    // A revision placed before the outage.
    let placed = deployments
        .create(&PostParams::default(), &revision_deployment("placed", 1))
        .await?;
    assert!(template_has_wrapper(&placed), "{placed:?}");
    poll(Duration::from_secs(60), || async {
        Ok(ready_wrapped_pods(&client, &ns, "placed").await? == 1)
    })
    .await
    .context("the placed revision's first Pod")?;

    let stopped = Stopped::webhook()?;
    let started = Instant::now();

    // Outside the scope: a plain Deployment and a Knative Service without kinfer annotations
    // are never sent to the webhook.
    let plain = async {
        let template = json!({
            "metadata": { "labels": { "app": "plain" } },
            "spec": { "containers": [{ "name": "app", "image": "dev.local/app" }] }
        });
        deployments
            .create(&PostParams::default(), &deployment("plain", template))
            .await?;
        wait_for(&deployments, "plain", Duration::from_secs(60), |d| {
            d.status.as_ref().and_then(|s| s.ready_replicas) == Some(1)
        })
        .await?;
        poll(Duration::from_secs(10), || async {
            Ok(pods(&client, &ns, "app=plain").await?.iter().any(pod_ready))
        })
        .await?;
        anyhow::Ok(())
    };
    let plain_ksvc = async {
        services
            .create(
                &PostParams::default(),
                &knative::service("plain-ksvc", json!({})),
            )
            .await?;
        wait_for(&services, "plain-ksvc", Duration::from_secs(90), ready).await?;
        anyhow::Ok(())
    };
    // Inside it, fail closed: the kinfer Service is refused with the apiserver's error, a
    // kinfer Pod is not created, and a ReplicaSet's kinfer Pod waits.
    let kinfer_ksvc = async {
        let err = services
            .create(
                &PostParams::default(),
                &knative::service("wrapped", json!({ "kinfer.dev/handler": "model:predict" })),
            )
            .await
            .expect_err("a kinfer Service must not be admitted without the webhook");
        anyhow::Ok(err.to_string())
    };
    let kinfer_pod_create = async {
        let err = pod_api
            .create(&PostParams::default(), &kinfer_pod("direct-0"))
            .await
            .expect_err("a kinfer Pod must not be admitted without the webhook");
        anyhow::Ok(err.to_string())
    };
    let waiting = async {
        deployments
            .create(
                &PostParams::default(),
                &deployment("waits", kinfer_pod_template("waits")),
            )
            .await?;
        // The ReplicaSet reports why it cannot create its Pod.
        let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        let deadline = Instant::now() + Duration::from_secs(40);
        let message = loop {
            let list = rs_api
                .list(&kube::api::ListParams::default().labels("app=waits"))
                .await?;
            let failure = list.items.iter().find_map(|rs| {
                rs.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| {
                        c.type_.as_deref() == Some("ReplicaFailure")
                            && c.status.as_deref() == Some("True")
                    })
                    .map(|c| c.message.clone().unwrap_or_default())
            });
            if let Some(m) = failure {
                break m;
            }
            if Instant::now() > deadline {
                bail!("the ReplicaSet never reported ReplicaFailure");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(pods(&client, &ns, "app=waits").await?.is_empty());
        anyhow::Ok(message)
    };
    // A placed revision scales, as the KPA scales it (a patch of the Deployment's replicas):
    // the patch leaves the template alone, so it is not sent to the webhook, and the new Pod,
    // made from the placed template, is not sent either.
    let scale_placed = async {
        deployments
            .patch(
                "placed",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
            )
            .await?;
        poll(Duration::from_secs(30), || async {
            Ok(ready_wrapped_pods(&client, &ns, "placed").await? == 2)
        })
        .await?;
        anyhow::Ok(())
    };
    // A new revision waits: its Deployment is refused (Knative retries and says why).
    let new_revision = async {
        let err = deployments
            .create(
                &PostParams::default(),
                &revision_deployment("new-revision", 1),
            )
            .await
            .expect_err("a new kinfer revision's Deployment must not be admitted unplaced");
        anyhow::Ok(err.to_string())
    };
    let (plain, plain_ksvc, kinfer_ksvc, kinfer_pod_create, waiting, scale_placed, new_revision) = tokio::join!(
        plain,
        plain_ksvc,
        kinfer_ksvc,
        kinfer_pod_create,
        waiting,
        scale_placed,
        new_revision
    );
    let outage = started.elapsed();
    drop(stopped);
    plain.context("plain Deployment during the outage")?;
    plain_ksvc.context("Knative Service without kinfer annotations during the outage")?;
    eprintln!("outside the scope, all Ready within {outage:?} of the outage");
    scale_placed.context("scaling a placed revision during the outage")?;
    let message = new_revision?;
    assert!(
        message.contains(&format!("failed calling webhook \"{DEPLOYMENT_WEBHOOK}\"")),
        "{message}"
    );

    let message = kinfer_ksvc?;
    assert!(
        message.contains(&format!("failed calling webhook \"{SERVICE_WEBHOOK}\"")),
        "{message}"
    );
    assert!(services.get_opt("wrapped").await?.is_none());
    let message = kinfer_pod_create?;
    assert!(
        message.contains(&format!("failed calling webhook \"{POD_WEBHOOK}\"")),
        "{message}"
    );
    let message = waiting?;
    assert!(
        message.contains(&format!("failed calling webhook \"{POD_WEBHOOK}\"")),
        "{message}"
    );

    // Back up: the waiting Pod appears, placed by the webhook (the ReplicaSet retried).
    let back = Instant::now();
    poll(Duration::from_secs(60), || async {
        Ok(pods(&client, &ns, "app=waits")
            .await?
            .iter()
            .any(has_wrapper))
    })
    .await
    .context("the kinfer Pod did not appear after the webhook came back")?;
    eprintln!(
        "the waiting kinfer Pod was created {:?} after the webhook came back",
        back.elapsed()
    );
    services
        .create(
            &PostParams::default(),
            &knative::service("wrapped", json!({ "kinfer.dev/handler": "model:predict" })),
        )
        .await
        .context("a kinfer Service once the webhook is back")?;

    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}

const ROTATION: &str = "kinfer-webhook-rotation";
// Ports none of with-cluster's components use.
const ROTATION_LISTEN: &str = "10.255.255.1:9453";
const ROTATION_ADMIN: &str = "127.0.0.1:9413";

/// A second kinfer-webhook with 20 s certificates checked every 2 s, behind its own Service
/// and with its own webhook configurations. On drop its configurations are deleted first
/// (so no kinfer Pod is sent to a dead webhook), then it is stopped.
struct SecondWebhook {
    child: Child,
    log: std::path::PathBuf,
}

impl SecondWebhook {
    fn start() -> anyhow::Result<Self> {
        let bin = std::env::var_os("KINFER_WEBHOOK_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/debug/kinfer-webhook")
            });
        let dir = std::env::var_os("KINFER_CLUSTER_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let log = dir.join("logs").join(format!("{ROTATION}.log"));
        std::fs::create_dir_all(log.parent().unwrap())?;
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            .args([
                "--namespace",
                "kinfer-system",
                "--service-name",
                ROTATION,
                "--tls-secret-name",
                &format!("{ROTATION}-tls"),
                "--configuration-name",
                ROTATION,
                "--listen",
                ROTATION_LISTEN,
                "--admin-addr",
                ROTATION_ADMIN,
                "--cert-lifetime-seconds",
                "20",
                "--cert-check-seconds",
                "2",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, log })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for SecondWebhook {
    fn drop(&mut self) {
        let deleted = Command::new("kubectl")
            .args([
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "mutatingwebhookconfiguration,validatingwebhookconfiguration",
                ROTATION,
            ])
            .stdout(Stdio::null())
            .status();
        if !deleted.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("could not delete the webhook configurations {ROTATION}: {deleted:?}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "-n",
                "kinfer-system",
                "service,endpoints",
                ROTATION,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "-n",
                "kinfer-system",
                "secret",
                &format!("{ROTATION}-tls"),
            ])
            .stdout(Stdio::null())
            .status();
    }
}

/// One plain HTTP/1.0 GET on the admin port.
async fn admin_get(path: &str) -> anyhow::Result<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(ROTATION_ADMIN).await?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// Pod admissions the second webhook answered, by result.
async fn pod_admissions() -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let (_, text) = admin_get("/metrics").await?;
    let mut by_result = std::collections::BTreeMap::new();
    for line in text.lines() {
        if !line.starts_with("kinfer_webhook_admissions_total{") || !line.contains("mutate-pods") {
            continue;
        }
        let result = line
            .split("result=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_string();
        let n: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
        *by_result.entry(result).or_insert(0) += n as u64;
    }
    Ok(by_result)
}

/// The certificate the second webhook presents in a TLS handshake, as PEM.
fn served_certificate() -> anyhow::Result<String> {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "openssl s_client -connect {ROTATION_LISTEN} -servername {ROTATION}.kinfer-system.svc </dev/null 2>/dev/null | openssl x509"
            ),
        ])
        .output()?;
    let pem = String::from_utf8(out.stdout)?;
    if !pem.contains("BEGIN CERTIFICATE") {
        bail!(
            "no certificate from {ROTATION_LISTEN}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(pem.trim().to_string())
}

#[tokio::test]
async fn certificate_rotation_keeps_admissions_working() -> anyhow::Result<()> {
    let _turn = TURNS.lock().await;
    let client = client().await?;
    let system = "kinfer-system";
    // Its Service, pointing at the local process like the main webhook's.
    let params = PatchParams::apply("kinfer-tests").force();
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": ROTATION, "namespace": system },
        "spec": { "ports": [{ "name": "https", "port": 443, "targetPort": 9453 }] }
    }))?;
    Api::<Service>::namespaced(client.clone(), system)
        .patch(ROTATION, &params, &Patch::Apply(&service))
        .await?;
    let endpoints: Endpoints = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": { "name": ROTATION, "namespace": system },
        "subsets": [{ "addresses": [{ "ip": "10.255.255.1" }], "ports": [{ "name": "https", "port": 9453 }] }]
    }))?;
    Api::<Endpoints>::namespaced(client.clone(), system)
        .patch(ROTATION, &params, &Patch::Apply(&endpoints))
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), system);
    let secret_name = format!("{ROTATION}-tls");
    secrets
        .delete(&secret_name, &DeleteParams::default())
        .await
        .ok();

    let second = SecondWebhook::start()?;
    poll(Duration::from_secs(30), || async {
        Ok(admin_get("/readyz").await.is_ok_and(|(s, _)| s == 200))
    })
    .await
    .with_context(|| format!("{ROTATION} not ready; log:\n{}", second.log_tail()))?;

    let ns = namespace(&client, "admit-rotation").await?;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let serving_cert = || async {
        let s = secrets.get(&secret_name).await?;
        let crt = s
            .data
            .unwrap_or_default()
            .remove("tls.crt")
            .unwrap_or_default();
        anyhow::Ok(String::from_utf8(crt.0)?.trim().to_string())
    };
    let first_cert = serving_cert().await?;
    let first_served = served_certificate()?;
    assert_eq!(first_served, first_cert);
    let before = pod_admissions().await?;

    // Create a kinfer Pod every second until the certificate has been renewed twice, and a
    // few more after that; every one must be admitted (through both webhooks).
    let start = Instant::now();
    let mut certs = vec![first_cert];
    let mut created = 0u64;
    let mut after_last_rotation = 0;
    while certs.len() < 3 || after_last_rotation < 3 {
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} certificate(s) in 60 s; log:\n{}",
                certs.len(),
                second.log_tail()
            );
        }
        let name = format!("rot-{created}");
        let pod = pod_api
            .create(&PostParams::default(), &kinfer_pod(&name))
            .await
            .with_context(|| {
                format!(
                    "creating {name} {:?} after the start, {} rotation(s) so far",
                    start.elapsed(),
                    certs.len() - 1
                )
            })?;
        assert!(has_wrapper(&pod), "{name} was not mutated");
        created += 1;
        after_last_rotation += 1;
        let cert = serving_cert().await?;
        if certs.last() != Some(&cert) {
            eprintln!("certificate renewed {:?} after the start", start.elapsed());
            certs.push(cert);
            after_last_rotation = 0;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let after = pod_admissions().await?;
    eprintln!(
        "{created} Pods admitted over {} rotations in {:?}; second webhook: {before:?} -> {after:?}",
        certs.len() - 1,
        start.elapsed()
    );
    let count =
        |m: &std::collections::BTreeMap<String, u64>, r: &str| m.get(r).copied().unwrap_or(0);
    let answered: u64 = ["patched", "allowed"]
        .iter()
        .map(|r| count(&after, r) - count(&before, r))
        .sum();
    assert!(answered >= created, "{before:?} -> {after:?}");
    for bad in ["denied", "bad_request", "too_large"] {
        assert_eq!(count(&after, bad), count(&before, bad), "{bad}");
    }
    // What it serves is what the Secret holds now (a renewal may land in between: retry),
    // not the first certificate.
    let deadline = Instant::now() + Duration::from_secs(6);
    let served = loop {
        let served = served_certificate()?;
        if served == serving_cert().await? {
            break served;
        }
        if Instant::now() > deadline {
            bail!("the served certificate is not the one in the Secret");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_ne!(served, first_served);
    assert!(
        std::fs::read_to_string(&second.log)?
            .matches("serving the renewed webhook certificate")
            .count()
            >= 2
    );

    drop(second);
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}
