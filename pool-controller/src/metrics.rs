//! The controller's Prometheus metrics (registered in the admin server's registry, so they
//! are served as `kinfer_pool_controller_*`).

use prometheus::{
    CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub handoffs: IntCounterVec,
    pub hits: IntCounterVec,
    pub misses: IntCounterVec,
    pub warm_pod_seconds: CounterVec,
    pub warm_pods: IntGaugeVec,
    pub desired_pods: IntGaugeVec,
    /// From the handoff patch to the pod's served gate opening (then it is Ready).
    pub handoff_to_ready: HistogramVec,
    pub reconcile_errors: IntCounterVec,
    /// How long a pass takes (all of it: handoffs, gates, refill, status).
    pub reconcile_seconds: Histogram,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let pool = &["namespace", "pool"];
        let m = Self {
            handoffs: IntCounterVec::new(
                Opts::new("handoffs_total", "Warm pods handed to a revision"),
                pool,
            )?,
            hits: IntCounterVec::new(
                Opts::new("hits_total", "Revision scale-up pods served by a warm pod"),
                pool,
            )?,
            misses: IntCounterVec::new(
                Opts::new(
                    "misses_total",
                    "Revision scale-up pods that started cold because no warm pod was ready",
                ),
                pool,
            )?,
            warm_pod_seconds: CounterVec::new(
                Opts::new("warm_pod_seconds_total", "Seconds of loaded warm pods held"),
                pool,
            )?,
            warm_pods: IntGaugeVec::new(
                Opts::new("warm_pods", "Warm pods by state (loaded, loading)"),
                &["namespace", "pool", "state"],
            )?,
            desired_pods: IntGaugeVec::new(
                Opts::new("desired_warm_pods", "The pool size the sizing policy chose"),
                pool,
            )?,
            handoff_to_ready: HistogramVec::new(
                HistogramOpts::new(
                    "handoff_to_ready_seconds",
                    "Time from handing a warm pod off to opening its served gate",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                pool,
            )?,
            reconcile_errors: IntCounterVec::new(
                Opts::new("reconcile_errors_total", "Failed reconciles by error kind"),
                &["kind"],
            )?,
            reconcile_seconds: Histogram::with_opts(
                HistogramOpts::new("reconcile_seconds", "Time a reconcile pass takes").buckets(
                    vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ],
                ),
            )?,
        };
        registry.register(Box::new(m.handoffs.clone()))?;
        registry.register(Box::new(m.hits.clone()))?;
        registry.register(Box::new(m.misses.clone()))?;
        registry.register(Box::new(m.warm_pod_seconds.clone()))?;
        registry.register(Box::new(m.warm_pods.clone()))?;
        registry.register(Box::new(m.desired_pods.clone()))?;
        registry.register(Box::new(m.handoff_to_ready.clone()))?;
        registry.register(Box::new(m.reconcile_errors.clone()))?;
        registry.register(Box::new(m.reconcile_seconds.clone()))?;
        Ok(m)
    }
}
