//! kinfer's admission webhook for Knative Serving.
//!
//! Pure decisions:
//! - [`annotations`]: the `kinfer.dev/*` annotations → a typed [`annotations::KinferSpec`],
//!   with messages that name the annotation, the value and what is allowed.
//! - [`config`]: the `kinfer-config` ConfigMap → [`config::KinferConfig`].
//! - [`placement`]: spec × config × Pod (or a Deployment's pod template) → minimal JSON
//!   Patch + warnings.
//!
//! Edges:
//! - [`admission`]: the warp routes (`POST /mutate-deployments`, `POST /mutate-pods`,
//!   `POST /validate-services`).
//! - [`tls`], [`cert_store`], [`server`]: certificates, their Secret, the rustls listener.
//! - [`webhook_config`]: the webhook configurations, built in code and applied.
//! - [`args`], [`run`]: flags and wiring.

#![forbid(unsafe_code)]

pub mod admission;
pub mod annotations;
pub mod args;
pub mod cert_store;
pub mod config;
pub mod placement;
pub mod run;
pub mod server;
pub mod tls;
pub mod webhook_config;

#[cfg(test)]
mod fake_api;

pub use args::Args;
