//! Start-up and shutdown shared by every binary: tracing, the kube client, the admin server
//! and the signal handler, in that order, so each component's `run` only wires its own work.

use tokio::task::JoinHandle;

use crate::admin::AdminServer;
use crate::args::{ClientArgs, CommonArgs};
use crate::kube_client;
use crate::shutdown::Shutdown;
use crate::telemetry;

pub struct Runtime {
    pub component: &'static str,
    pub client: kube::Client,
    pub admin: AdminServer,
    pub shutdown: Shutdown,
    admin_task: JoinHandle<()>,
}

impl Runtime {
    /// `component` names the binary in logs and prefixes its metrics (`kinfer_<component>_…`).
    pub async fn start(
        component: &'static str,
        common: &CommonArgs,
        client_args: &ClientArgs,
    ) -> anyhow::Result<Self> {
        telemetry::init(&common.log, common.log_format)?;
        tracing::info!(component, version = env!("CARGO_PKG_VERSION"), "starting");
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals();

        let admin = AdminServer::new(&format!("kinfer_{}", component.replace('-', "_")))?;
        let api_gate = admin.readiness.gate("kubernetes-api");
        let signal = shutdown.clone();
        let (_, server) = admin
            .bind(common.admin_addr, async move { signal.signaled().await })
            .await?;
        let admin_task = tokio::spawn(server);

        let client = kube_client::client(client_args).await?;
        let version = kube_client::check_connection(&client).await?;
        tracing::info!(%version, "connected to the Kubernetes API server");
        api_gate.open();

        Ok(Self {
            component,
            client,
            admin,
            shutdown,
            admin_task,
        })
    }

    /// Waits for SIGTERM/SIGINT (or an internal trigger), then lets the admin server finish.
    pub async fn wait_for_shutdown(self) -> anyhow::Result<()> {
        self.shutdown.signaled().await;
        self.admin_task.await?;
        tracing::info!(component = self.component, "stopped");
        Ok(())
    }
}
