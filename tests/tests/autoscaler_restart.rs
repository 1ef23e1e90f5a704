//! The autoscaler plugin across a restart of the real Knative autoscaler: the local control
//! plane restarts Knative's components when they exit, as the kubelet restarts a Deployment's
//! container, and records each one's current PID in `$KINFER_CLUSTER_DIR/pids/`. This test
//! sends the autoscaler SIGTERM (what a rollout or a node drain does) mid-run: its stat
//! server goes away with the plugin's websocket, a new process takes the bucket lease and
//! serves again, and the plugin must reconnect by itself for scaling to resume.
//!
//! Its own test binary: the restart would disturb any other test scaling at that moment.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use kinfer_tests::autoscaling::{Load, bed, reaches};
use kinfer_tests::{knative, poll};
use serde_json::json;

fn autoscaler_pid() -> anyhow::Result<i32> {
    let dir = std::env::var("KINFER_CLUSTER_DIR").context("run through hack/with-cluster")?;
    let file = PathBuf::from(dir).join("pids/knative-autoscaler.pid");
    let pid = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
    Ok(pid.trim().parse()?)
}

fn process_alive(pid: i32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn scaling_resumes_after_the_knative_autoscaler_restarts() -> anyhow::Result<()> {
    let Some(bed) = bed("as-restart", Duration::from_secs(1)).await? else {
        return Ok(());
    };
    let revision = bed
        .revision(knative::service(
            "model",
            json!({
                "kinfer.dev/autoscaling": "requests",
                "autoscaling.knative.dev/target": "10",
                "autoscaling.knative.dev/window": "6s",
                "autoscaling.knative.dev/min-scale": "1",
            }),
        ))
        .await?;
    let plugin = bed.plugin().await?;
    let dep = format!("{revision}-deployment");
    bed.exporter.set(&revision, Load::requests(14.0));
    reaches(&bed.deployments, &dep, 2, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    let connects = plugin
        .metric("kinfer_autoscaler_plugin_autoscaler_connects_total")
        .await?
        .unwrap_or(0.0);

    // Restart Knative's autoscaler and wait for the old process to be gone and a new one
    // to hold its place.
    let old = autoscaler_pid()?;
    let rc = std::process::Command::new("kill")
        .args(["-TERM", &old.to_string()])
        .status()?;
    anyhow::ensure!(rc.success(), "kill -TERM {old} failed");
    poll(Duration::from_secs(30), || async {
        Ok(!process_alive(old) && autoscaler_pid()? != old)
    })
    .await
    .context("the Knative autoscaler did not restart")?;
    eprintln!(
        "knative autoscaler restarted: pid {old} → {}",
        autoscaler_pid()?
    );

    // The socket closed under the plugin, which notices and reconnects by itself.
    poll(Duration::from_secs(30), || async {
        Ok(plugin
            .metric("kinfer_autoscaler_plugin_autoscaler_connects_total")
            .await?
            .unwrap_or(0.0)
            > connects)
    })
    .await
    .with_context(|| format!("no reconnect; plugin log: {}", plugin.log.display()))?;
    assert!(
        plugin
            .metric("kinfer_autoscaler_plugin_send_failures_total")
            .await?
            .unwrap_or(0.0)
            >= 1.0,
        "the plugin never noticed the restart"
    );

    // The new autoscaler starts from no history; the next load step goes through it.
    bed.exporter.set(&revision, Load::requests(35.0));
    let t = reaches(&bed.deployments, &dep, 5, Duration::from_secs(60))
        .await
        .with_context(|| format!("plugin log: {}", plugin.log.display()))?;
    eprintln!("after the restart: {dep} replicas 5 in {t:.2?} after the load step");
    // And down again when the load falls.
    bed.exporter.set(&revision, Load::requests(14.0));
    reaches(&bed.deployments, &dep, 2, Duration::from_secs(90)).await?;
    Ok(())
}
