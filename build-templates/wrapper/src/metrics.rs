//! Prometheus metrics, under the `kinfer_wrapper_` prefix. The autoscaler plugin reads
//! in-flight requests and queue depth as load signals.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Inference requests received and not yet answered.
    pub in_flight: IntGauge,
    /// Requests waiting for a worker.
    pub queue_depth: IntGauge,
    /// Requests per handler call.
    pub batch_size: Histogram,
    /// Seconds from receiving an inference request to answering it, by protocol.
    pub request_duration: HistogramVec,
    /// Seconds per handler call, as the worker pipe sees it.
    pub handler_duration: Histogram,
    /// Inference requests answered, by protocol and HTTP status code.
    pub requests: IntCounterVec,
    /// Failed requests by kind (bad_request, not_found, too_large, handler, worker_died,
    /// unavailable, internal).
    pub errors: IntCounterVec,
    pub workers_ready: IntGauge,
    pub worker_restarts: IntCounter,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new_custom(Some("kinfer_wrapper".into()), None)?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let latency_buckets = prometheus::exponential_buckets(0.0005, 2.0, 16)?;
        let m = Metrics {
            in_flight: IntGauge::new("requests_in_flight", "Inference requests being served")?,
            queue_depth: IntGauge::new("queue_depth", "Inference requests waiting for a worker")?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new("batch_size", "Requests combined into one handler call")
                    .buckets(prometheus::exponential_buckets(1.0, 2.0, 10)?),
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "request_duration_seconds",
                    "Time from receiving an inference request to answering it",
                )
                .buckets(latency_buckets.clone()),
                &["protocol"],
            )?,
            handler_duration: Histogram::with_opts(
                HistogramOpts::new("handler_duration_seconds", "Time per handler call")
                    .buckets(latency_buckets),
            )?,
            requests: IntCounterVec::new(
                Opts::new("requests_total", "Inference requests answered"),
                &["protocol", "code"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("errors_total", "Failed inference requests by kind"),
                &["kind"],
            )?,
            workers_ready: IntGauge::new(
                "workers_ready",
                "Python workers ready to run the handler",
            )?,
            worker_restarts: IntCounter::new(
                "worker_restarts_total",
                "Python workers restarted after exiting",
            )?,
            registry,
        };
        m.registry.register(Box::new(m.in_flight.clone()))?;
        m.registry.register(Box::new(m.queue_depth.clone()))?;
        m.registry.register(Box::new(m.batch_size.clone()))?;
        m.registry.register(Box::new(m.request_duration.clone()))?;
        m.registry.register(Box::new(m.handler_duration.clone()))?;
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.errors.clone()))?;
        m.registry.register(Box::new(m.workers_ready.clone()))?;
        m.registry.register(Box::new(m.worker_restarts.clone()))?;
        Ok(m)
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<(String, Vec<u8>), prometheus::Error> {
        let encoder = TextEncoder::new();
        let mut body = Vec::new();
        encoder.encode(&self.registry.gather(), &mut body)?;
        Ok((encoder.format_type().to_string(), body))
    }
}

/// Counts a request as in flight for as long as it lives, including when the client hangs up
/// and the handler future is dropped.
pub struct InFlight(IntGauge);

impl InFlight {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
