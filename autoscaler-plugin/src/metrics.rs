//! The plugin's own metrics, under `kinfer_autoscaler_plugin_` on the admin server.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    /// Per-pod values read, by source and signal.
    pub signals_read: IntCounterVec,
    /// Failed reads, by source, signal and reason.
    pub source_errors: IntCounterVec,
    /// Frames handed to the websocket sender and stats in them.
    pub frames_sent: IntCounter,
    pub stats_sent: IntCounter,
    /// Connection failures and failed sends to the Knative autoscaler.
    pub send_failures: IntCounter,
    pub connects: IntCounter,
    pub connected: IntGauge,
    /// Revisions the plugin drives now.
    pub revisions: IntGauge,
    /// Per revision: the pods the policy wants, the KPA's resulting count, and the load
    /// recorded by the autoscaler from the plugin's stat.
    pub decision_pods: GaugeVec,
    pub decision_kpa_pods: GaugeVec,
    pub reported_load: GaugeVec,
    /// Revisions whose last report was repeated because their signals were missing.
    pub held: IntCounterVec,
    pub forecast_replicas: GaugeVec,
    pub forecast_writes: IntCounterVec,
    pub loop_seconds: Histogram,
    /// Seconds the last collection took.
    pub last_collect_seconds: Gauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let rev = &["namespace", "revision"];
        let m = Self {
            signals_read: IntCounterVec::new(
                Opts::new("signals_read_total", "Per-pod signal values read"),
                &["source", "signal"],
            )?,
            source_errors: IntCounterVec::new(
                Opts::new("source_errors_total", "Failed signal reads"),
                &["source", "signal", "reason"],
            )?,
            frames_sent: IntCounter::new(
                "frames_sent_total",
                "WireStatMessages frames sent to the Knative autoscaler",
            )?,
            stats_sent: IntCounter::new(
                "stats_sent_total",
                "Revision stats sent to the Knative autoscaler",
            )?,
            send_failures: IntCounter::new(
                "send_failures_total",
                "Failed connections or sends to the Knative autoscaler",
            )?,
            connects: IntCounter::new(
                "autoscaler_connects_total",
                "Websocket connections made to the Knative autoscaler",
            )?,
            connected: IntGauge::new(
                "autoscaler_connected",
                "1 while the websocket to the Knative autoscaler is up",
            )?,
            revisions: IntGauge::new("revisions", "Revisions the plugin drives")?,
            decision_pods: GaugeVec::new(
                Opts::new(
                    "decision_pods",
                    "Pods the GPU-aware policy wants (fractional)",
                ),
                rev,
            )?,
            decision_kpa_pods: GaugeVec::new(
                Opts::new(
                    "decision_kpa_pods",
                    "Pods the KPA's formula gives for the load reported, before its rate limits and min/max scale",
                ),
                rev,
            )?,
            reported_load: GaugeVec::new(
                Opts::new(
                    "reported_load",
                    "Load the plugin reports (concurrency or requests per second, before subtracting what Knative counts itself)",
                ),
                rev,
            )?,
            held: IntCounterVec::new(
                Opts::new(
                    "held_reports_total",
                    "Seconds a revision's last report was repeated because its signals were missing",
                ),
                rev,
            )?,
            forecast_replicas: GaugeVec::new(
                Opts::new(
                    "forecast_replicas",
                    "Replicas the Configuration is forecast to need within the horizon",
                ),
                &["namespace", "configuration"],
            )?,
            forecast_writes: IntCounterVec::new(
                Opts::new(
                    "forecast_writes_total",
                    "WarmPool status writes of the forecast",
                ),
                &["result"],
            )?,
            loop_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "loop_duration_seconds",
                    "Time of one collection and decision round",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
            )?,
            last_collect_seconds: Gauge::new(
                "last_collect_seconds",
                "Seconds the last signal collection took",
            )?,
        };
        registry.register(Box::new(m.signals_read.clone()))?;
        registry.register(Box::new(m.source_errors.clone()))?;
        registry.register(Box::new(m.frames_sent.clone()))?;
        registry.register(Box::new(m.stats_sent.clone()))?;
        registry.register(Box::new(m.send_failures.clone()))?;
        registry.register(Box::new(m.connects.clone()))?;
        registry.register(Box::new(m.connected.clone()))?;
        registry.register(Box::new(m.revisions.clone()))?;
        registry.register(Box::new(m.decision_pods.clone()))?;
        registry.register(Box::new(m.decision_kpa_pods.clone()))?;
        registry.register(Box::new(m.reported_load.clone()))?;
        registry.register(Box::new(m.held.clone()))?;
        registry.register(Box::new(m.forecast_replicas.clone()))?;
        registry.register(Box::new(m.forecast_writes.clone()))?;
        registry.register(Box::new(m.loop_seconds.clone()))?;
        registry.register(Box::new(m.last_collect_seconds.clone()))?;
        Ok(m)
    }

    /// Drops the per-revision series of a revision the plugin no longer drives.
    pub fn forget_revision(&self, namespace: &str, revision: &str) {
        for g in [
            &self.decision_pods,
            &self.decision_kpa_pods,
            &self.reported_load,
        ] {
            let _ = g.remove_label_values(&[namespace, revision]);
        }
        let _ = self.held.remove_label_values(&[namespace, revision]);
    }
}
