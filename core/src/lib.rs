//! Plumbing that every kinfer binary shares: command-line option groups, tracing set-up,
//! the admin HTTP server (`/healthz`, `/readyz`, `/metrics`), the Kubernetes client and
//! graceful shutdown. Component logic lives in the component crates.

pub mod admin;
pub mod args;
pub mod kpa;
pub mod kube_client;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod warmpool;

pub use admin::{AdminServer, Readiness};
pub use args::{ClientArgs, CommonArgs};
pub use runtime::Runtime;
pub use shutdown::Shutdown;
