//! Option groups that every binary flattens into its own clap `Args`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::telemetry::LogFormat;

/// Logging and the admin server.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Address of the admin HTTP server that serves /healthz, /readyz and /metrics.
    #[arg(long, env = "KINFER_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `info,kube=debug`.
    #[arg(long, env = "KINFER_LOG", default_value = "info")]
    pub log: String,

    /// Log format: `plain` for people, `json` for log collectors.
    #[arg(long, env = "KINFER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

/// How to reach the Kubernetes API server.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Kubeconfig file. Without it the in-cluster service account is used, falling back to
    /// the default kubeconfig (~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context to use instead of the current one.
    #[arg(long, env = "KINFER_KUBE_CONTEXT")]
    pub context: Option<String>,
}
