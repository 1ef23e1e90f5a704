//! kinfer's autoscaler plugin: GPU-aware load signals for Knative's KPA.
//!
//! Several times a second: [`discovery`] says which revisions opted in
//! (`kinfer.dev/autoscaling`) and which pods they have; a source ([`prom`] or [`scrape`])
//! reads the pods' [`signals`]; [`policy`] turns them into the load to report so that the
//! KPA's own formula lands on the pod count the policy wants; [`sink`] frames it for the
//! KPA's stat websocket and [`pacing`] decides when (one frame per second); [`forecast`]
//! smooths the wanted pods into a per-Configuration demand forecast that [`publish`] writes
//! on WarmPools. [`run`] wires it together.

pub mod annotations;
pub mod args;
pub mod discovery;
pub mod engine;
pub mod forecast;
pub mod http;
pub mod metrics;
pub mod pacing;
pub mod policy;
pub mod prom;
pub mod publish;
pub mod run;
pub mod scrape;
pub mod signals;
pub mod sink;

pub use args::Args;
