//! kinfer's admission webhook for Knative Serving.
//!
//! - [`annotations`]: the `kinfer.dev/*` annotations → a typed [`annotations::KinferSpec`],
//!   with messages that name the annotation, the value and what is allowed.
//! - [`config`]: the `kinfer-config` ConfigMap → [`config::KinferConfig`].
//! - [`placement`]: spec × config × Pod → minimal JSON Patch + warnings (pure).

pub mod admission;
pub mod annotations;
pub mod config;
pub mod placement;
pub mod server;
pub mod tls;
