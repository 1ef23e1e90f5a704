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
    apply_install()?;
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

/// `kubectl apply -k manifests/`, server-side, as an admin would install kinfer.
fn apply_install() -> anyhow::Result<()> {
    let manifests = repo_root().join("manifests");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        manifests.to_str().unwrap(),
    ])?;
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kinfer-install-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn apply_yaml(name: &str, yaml: &str) -> anyhow::Result<()> {
    let path = tempdir()?.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    kubectl(&["apply", "-f", path.to_str().unwrap()])?;
    Ok(())
}

/// A kinfer binary run after the install under its own ServiceAccount's token (the binary
/// and its ServiceAccount share a name); killed when dropped.
struct AsServiceAccount {
    child: Child,
    log: PathBuf,
}

impl AsServiceAccount {
    /// Starts it with `--admin-addr admin` and `args`, and waits until its /readyz is green.
    async fn start(name: &str, admin: &str, args: &[&str]) -> anyhow::Result<Self> {
        let client = client().await?;
        apply_install()?;
        let dir = tempdir()?;
        let kubeconfig = service_account_kubeconfig(&client, "kinfer-system", name, &dir).await?;
        let log = dir.join(format!("{name}.log"));
        let path = repo_root().join("target/debug").join(name);
        let child = Command::new(&path)
            .arg(format!("--admin-addr={admin}"))
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let component = Self { child, log };
        poll(Duration::from_secs(60), || async {
            Ok(http_get_status(admin, "/readyz").await.unwrap_or(0) == 200)
        })
        .await
        .with_context(|| format!("{name} not ready; log:\n{}", component.log_text()))?;
        Ok(component)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails when any API call it made was refused.
    fn assert_no_permission_errors(&self) {
        let log = self.log_text();
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "permission error:\n{log}"
        );
    }
}

impl Drop for AsServiceAccount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    // Its main path with its own credentials: issue the certificate into its Secret, watch
    // kinfer-config, register both webhook configurations.
    let webhook = AsServiceAccount::start(
        "kinfer-webhook",
        "127.0.0.1:19401",
        &["--namespace=kinfer-system", "--listen=127.0.0.1:19443"],
    )
    .await?;
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
    let ca_bundle = kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "kinfer-webhook",
        "-o",
        "jsonpath={.webhooks[0].clientConfig.caBundle}",
    ])?;
    assert!(!ca_bundle.is_empty(), "caBundle not patched");
    webhook.assert_no_permission_errors();
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster of its own: make install-test"]
async fn autoscaler_plugin_runs_under_its_own_service_account() -> anyhow::Result<()> {
    // Something for it to read: an opted-in Service and a WarmPool to publish a forecast on.
    apply_install()?;
    apply_yaml(
        "plugin-objects",
        r#"
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
"#,
    )?;
    let plugin = AsServiceAccount::start(
        "kinfer-autoscaler-plugin",
        "127.0.0.1:19402",
        &[
            "--source=scrape",
            "--knative-reporters=none",
            "--autoscaler-url=ws://10.255.255.1:8080",
        ],
    )
    .await?;
    // A few rounds of its loop: revision and pod watches, Knative's defaults, WarmPool list.
    tokio::time::sleep(Duration::from_secs(5)).await;
    plugin.assert_no_permission_errors();
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster of its own: make install-test"]
async fn pool_controller_runs_under_its_own_service_account() -> anyhow::Result<()> {
    apply_install()?;
    apply_yaml(
        "pool-objects",
        r#"
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
"#,
    )?;
    // Its main path with its own credentials: leader election, the pool watch, a warm pod
    // built from the revision's ReplicaSet, the pool's status.
    let controller = AsServiceAccount::start(
        "kinfer-pool-controller",
        "127.0.0.1:19403",
        &["--lease-namespace=kinfer-system"],
    )
    .await?;
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
    .with_context(|| format!("no warm pod; log:\n{}", controller.log_text()))?;
    controller.assert_no_permission_errors();
    Ok(())
}
