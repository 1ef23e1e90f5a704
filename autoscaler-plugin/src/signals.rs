//! The load signals the plugin reads for each pod, whatever the source.

use std::collections::HashMap;
use std::fmt;

/// A pod, by namespace and name: the key every source reports under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub pod: String,
}

impl PodKey {
    pub fn new(namespace: impl Into<String>, pod: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            pod: pod.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.pod)
    }
}

/// One kind of signal. Each has its own PromQL query (see `args`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// Requests in the pod, being served or waiting (`kinfer_wrapper_requests_in_flight`).
    InFlight,
    /// Requests waiting for a worker: the part of `InFlight` a batching server hides
    /// (`kinfer_wrapper_queue_depth`).
    Queued,
    /// Requests answered per second.
    RequestRate,
    /// Mean seconds from receiving a request to answering it.
    Latency,
    /// GPU busy fraction, 0..1 (`DCGM_FI_PROF_GR_ENGINE_ACTIVE`, or `DCGM_FI_DEV_GPU_UTIL`/100).
    GpuUtil,
}

impl Signal {
    pub const ALL: [Signal; 5] = [
        Signal::InFlight,
        Signal::Queued,
        Signal::RequestRate,
        Signal::Latency,
        Signal::GpuUtil,
    ];

    /// The `signal` label of the plugin's metrics.
    pub fn name(self) -> &'static str {
        match self {
            Signal::InFlight => "in_flight",
            Signal::Queued => "queued",
            Signal::RequestRate => "request_rate",
            Signal::Latency => "latency",
            Signal::GpuUtil => "gpu_util",
        }
    }
}

/// What one pod reported; `None` where the source has no value for it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PodSignals {
    pub in_flight: Option<f64>,
    pub queued: Option<f64>,
    pub request_rate: Option<f64>,
    pub latency_seconds: Option<f64>,
    pub gpu_util: Option<f64>,
}

impl PodSignals {
    pub fn set(&mut self, signal: Signal, value: f64) {
        let slot = match signal {
            Signal::InFlight => &mut self.in_flight,
            Signal::Queued => &mut self.queued,
            Signal::RequestRate => &mut self.request_rate,
            Signal::Latency => &mut self.latency_seconds,
            Signal::GpuUtil => &mut self.gpu_util,
        };
        *slot = Some(value);
    }

    pub fn is_empty(&self) -> bool {
        *self == PodSignals::default()
    }
}

/// Per signal, the value of each pod the source knows about.
pub type SignalValues = HashMap<Signal, HashMap<PodKey, f64>>;

/// Turns per-signal maps into per-pod signals.
pub fn by_pod(values: &SignalValues) -> HashMap<PodKey, PodSignals> {
    let mut pods: HashMap<PodKey, PodSignals> = HashMap::new();
    for (signal, per_pod) in values {
        for (pod, value) in per_pod {
            pods.entry(pod.clone()).or_default().set(*signal, *value);
        }
    }
    pods
}
