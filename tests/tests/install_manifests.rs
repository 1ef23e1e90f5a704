//! The install (`kubectl apply -k manifests/`) on a cluster of its own, and each component
//! run under its own ServiceAccount's credentials: the RBAC must be enough for its main path
//! and no broader than the rules a reader can justify.
//!
//! Ignored in the shared integration run (its cluster already runs kinfer as local
//! processes); `make install-test` runs it with `--ignored` in a fresh cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kinfer_tests::{client, poll};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("kubectl").args(args).output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Every object of the kustomization, as kubectl renders it.
fn rendered_objects() -> anyhow::Result<Vec<Value>> {
    let manifests = repo_root().join("manifests");
    let yaml = kubectl(&["kustomize", manifests.to_str().unwrap()])?;
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

#[test]
#[ignore = "needs a cluster of its own: make install-test"]
fn rbac_has_no_wildcards() -> anyhow::Result<()> {
    for obj in rendered_objects()? {
        let kind = obj["kind"].as_str().unwrap_or_default();
        if kind != "Role" && kind != "ClusterRole" {
            continue;
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        for rule in obj["rules"].as_array().context("rules")? {
            for field in ["verbs", "resources", "apiGroups"] {
                let values = rule[field].as_array().context(field)?;
                assert!(
                    values.iter().all(|v| v != "*"),
                    "{kind} {name} has a wildcard in {field}: {rule}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster of its own: make install-test"]
async fn install_creates_every_object() -> anyhow::Result<()> {
    let manifests = repo_root().join("manifests");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        manifests.to_str().unwrap(),
    ])?;
    for obj in rendered_objects()? {
        let kind = obj["kind"].as_str().unwrap();
        let name = obj["metadata"]["name"].as_str().unwrap();
        let mut args = vec!["get", kind, name, "-o", "name"];
        if let Some(ns) = obj["metadata"]["namespace"].as_str() {
            args.extend(["-n", ns]);
        }
        // CRDs and API groups resolve by kind.group; plain kinds resolve as they are.
        let api_version = obj["apiVersion"].as_str().unwrap();
        let qualified;
        if let Some((group, _)) = api_version.split_once('/')
            && !group.ends_with(".k8s.io")
            && group != "apps"
            && group != "policy"
        {
            qualified = format!("{kind}.{group}");
            args[1] = &qualified;
        }
        kubectl(&args).with_context(|| format!("{kind} {name} was not created"))?;
    }
    Ok(())
}

/// A kubeconfig that authenticates as the ServiceAccount with a TokenRequest token.
async fn service_account_kubeconfig(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued: TokenRequest = sas
        .create_subresource("token", name, &PostParams::default(), &request)
        .await?;
    let token = issued.status.context("token status")?.token;
    let admin: Value =
        serde_yaml::from_str(&std::fs::read_to_string(std::env::var("KUBECONFIG")?)?)?;
    let cluster = &admin["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "local", "cluster": cluster }],
        "users": [{ "name": name, "user": { "token": token } }],
        "contexts": [{ "name": name, "context": { "cluster": "local", "user": name } }],
        "current-context": name,
    });
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

struct Component(Child);

impl Drop for Component {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &str, kubeconfig: &Path, log: &Path, args: &[&str]) -> anyhow::Result<Component> {
    let path = repo_root().join("target/debug").join(binary);
    let child = Command::new(&path)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    Ok(Component(child))
}

async fn wait_ready(admin: &str, log: &Path) -> anyhow::Result<()> {
    poll(Duration::from_secs(60), || async {
        let ready = tokio::net::TcpStream::connect(admin).await.is_ok()
            && http_get_status(admin, "/readyz").await? == 200;
        Ok(ready)
    })
    .await
    .with_context(|| {
        format!(
            "not ready; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    Ok(())
}

async fn http_get_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

#[tokio::test]
#[ignore = "needs a cluster of its own: make install-test"]
async fn webhook_runs_under_its_own_service_account() -> anyhow::Result<()> {
    let client = client().await?;
    let manifests = repo_root().join("manifests");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        manifests.to_str().unwrap(),
    ])?;
    let dir = tempdir()?;
    let kubeconfig =
        service_account_kubeconfig(&client, "kinfer-system", "kinfer-webhook", &dir).await?;
    let log = dir.join("webhook.log");
    // Its main path with its own credentials: issue the certificate into its Secret, watch
    // kinfer-config, register both webhook configurations, then admit.
    let _webhook = start(
        "kinfer-webhook",
        &kubeconfig,
        &log,
        &[
            "--namespace=kinfer-system",
            "--listen=127.0.0.1:19443",
            "--admin-addr=127.0.0.1:19401",
        ],
    )?;
    wait_ready("127.0.0.1:19401", &log).await?;
    let secret = kubectl(&[
        "get",
        "secret",
        "-n",
        "kinfer-system",
        "kinfer-webhook-tls",
        "-o",
        "name",
    ])?;
    assert_eq!(secret.trim(), "secret/kinfer-webhook-tls");
    let mutating = kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "kinfer-webhook",
        "-o",
        "jsonpath={.webhooks[0].clientConfig.caBundle}",
    ])?;
    assert!(!mutating.is_empty(), "caBundle not patched");
    let log_text = std::fs::read_to_string(&log)?;
    assert!(
        !log_text.contains("forbidden"),
        "the webhook hit a permission error:\n{log_text}"
    );
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kinfer-install-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test]
#[ignore = "needs a cluster of its own: make install-test"]
async fn autoscaler_plugin_runs_under_its_own_service_account() -> anyhow::Result<()> {
    let client = client().await?;
    let manifests = repo_root().join("manifests");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        manifests.to_str().unwrap(),
    ])?;
    // Something for it to read: an opted-in Service and a WarmPool to publish a forecast on.
    let objects = r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: rbac-check, namespace: default}
spec:
  template:
    metadata:
      annotations: {kinfer.dev/autoscaling: requests}
    spec:
      containers: [{image: dev.local/model}]
---
apiVersion: kinfer.dev/v1alpha1
kind: WarmPool
metadata: {name: rbac-check, namespace: default}
spec: {configurationRef: {name: rbac-check}, minReady: 0}
"#;
    let path = tempdir()?.join("objects.yaml");
    std::fs::write(&path, objects)?;
    kubectl(&["apply", "-f", path.to_str().unwrap()])?;
    let dir = tempdir()?;
    let kubeconfig =
        service_account_kubeconfig(&client, "kinfer-system", "kinfer-autoscaler-plugin", &dir)
            .await?;
    let log = dir.join("plugin.log");
    let _plugin = start(
        "kinfer-autoscaler-plugin",
        &kubeconfig,
        &log,
        &[
            "--source=scrape",
            "--knative-reporters=none",
            "--autoscaler-url=ws://10.255.255.1:8080",
            "--admin-addr=127.0.0.1:19402",
        ],
    )?;
    wait_ready("127.0.0.1:19402", &log).await?;
    // A few rounds of its loop: revision and pod watches, Knative's defaults, WarmPool list.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log_text = std::fs::read_to_string(&log)?;
    assert!(
        !log_text.contains("forbidden") && !log_text.contains("Forbidden"),
        "the plugin hit a permission error:\n{log_text}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster of its own: make install-test"]
async fn pool_controller_runs_under_its_own_service_account() -> anyhow::Result<()> {
    let client = client().await?;
    let manifests = repo_root().join("manifests");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        manifests.to_str().unwrap(),
    ])?;
    let objects = r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: pool-rbac, namespace: default}
spec:
  template:
    spec:
      containers: [{image: dev.local/model}]
---
apiVersion: kinfer.dev/v1alpha1
kind: WarmPool
metadata: {name: pool-rbac, namespace: default}
spec: {configurationRef: {name: pool-rbac}, minReady: 1}
"#;
    let dir = tempdir()?;
    let path = dir.join("pool-objects.yaml");
    std::fs::write(&path, objects)?;
    kubectl(&["apply", "-f", path.to_str().unwrap()])?;
    let kubeconfig =
        service_account_kubeconfig(&client, "kinfer-system", "kinfer-pool-controller", &dir)
            .await?;
    let log = dir.join("pool-controller.log");
    // Its main path with its own credentials: leader election, the pool watch, a warm pod
    // built from the revision's ReplicaSet, the pool's status.
    let _controller = start(
        "kinfer-pool-controller",
        &kubeconfig,
        &log,
        &[
            "--lease-namespace=kinfer-system",
            "--admin-addr=127.0.0.1:19403",
        ],
    )?;
    wait_ready("127.0.0.1:19403", &log).await?;
    poll(Duration::from_secs(90), || async {
        let ready = kubectl(&[
            "get",
            "wp",
            "pool-rbac",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ])?;
        Ok(ready.trim() == "1")
    })
    .await
    .with_context(|| {
        format!(
            "no warm pod; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    let log_text = std::fs::read_to_string(&log)?;
    assert!(
        !log_text.contains("forbidden") && !log_text.contains("Forbidden"),
        "the pool controller hit a permission error:\n{log_text}"
    );
    Ok(())
}
