//! One round of the plugin, without I/O: the revisions and their pods' signals in, the frame
//! for the Knative autoscaler and the forecasts out. Keeps the state that spans rounds (the
//! last report of each revision, for holding it through a source outage; the forecast
//! smoothing) and logs why a revision's reported load changed.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kinfer_core::kpa::WireStatMessages;

use crate::discovery::DrivenRevision;
use crate::forecast::Holt;
use crate::metrics::Metrics;
use crate::policy::{self, Decision, KnativeReporters, Report};
use crate::publish::Forecasts;
use crate::signals::{PodKey, PodSignals};
use crate::sink;

struct Last {
    report: Report,
    kpa_pods: u32,
    driver: &'static str,
    at: Instant,
}

/// What one collection round produced.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// The stats for the Knative autoscaler.
    pub frame: WireStatMessages,
    /// Wanted pods per `(namespace, configuration)`, for the forecast.
    pub demand: HashMap<(String, String), f64>,
}

pub struct Engine {
    reporters: KnativeReporters,
    hold: Duration,
    /// Forecast steps: horizon / the 1 s between reports.
    forecast_steps: f64,
    metrics: Metrics,
    last: HashMap<(String, String), Last>,
    holts: HashMap<(String, String), Holt>,
    driven: BTreeSet<(String, String)>,
}

impl Engine {
    pub fn new(
        reporters: KnativeReporters,
        hold: Duration,
        horizon: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            reporters,
            hold,
            forecast_steps: horizon.as_secs_f64(),
            metrics,
            last: HashMap::new(),
            holts: HashMap::new(),
            driven: BTreeSet::new(),
        }
    }

    pub fn round(
        &mut self,
        revisions: &[DrivenRevision],
        signals: &HashMap<PodKey, PodSignals>,
        now: Instant,
    ) -> Round {
        let mut frame = WireStatMessages::default();
        let mut wanted_by_cfg: HashMap<(String, String), f64> = HashMap::new();
        let mut driven = BTreeSet::new();
        for rev in revisions {
            let key = (rev.namespace.clone(), rev.name.clone());
            driven.insert(key.clone());
            let pods: Vec<PodSignals> = rev
                .pods
                .iter()
                .map(|(k, _)| signals.get(k).copied().unwrap_or_default())
                .collect();
            let labels = [rev.namespace.as_str(), rev.name.as_str()];
            let report = match policy::decide(&rev.policy, &pods, self.reporters) {
                Ok(d) => {
                    self.record(rev, &d, now);
                    *wanted_by_cfg
                        .entry((rev.namespace.clone(), rev.configuration.clone()))
                        .or_default() += d.pods;
                    Some(d.report)
                }
                Err(why) => match self.last.get(&key) {
                    Some(last) if now.duration_since(last.at) <= self.hold => {
                        self.metrics.held.with_label_values(&labels).inc();
                        tracing::debug!(namespace = %rev.namespace, revision = %rev.name, reason = %why, "holding the last report");
                        Some(last.report)
                    }
                    Some(_) => {
                        tracing::warn!(namespace = %rev.namespace, revision = %rev.name, reason = %why, hold = ?self.hold, "no signals for longer than the hold: reports stop and Knative decides alone");
                        self.last.remove(&key);
                        None
                    }
                    None => None,
                },
            };
            if let Some(r) = report {
                frame
                    .messages
                    .push(sink::message(&rev.namespace, &rev.name, &r));
            }
        }
        for gone in self.driven.difference(&driven) {
            self.metrics.forget_revision(&gone.0, &gone.1);
            self.last.remove(gone);
            tracing::info!(namespace = %gone.0, revision = %gone.1, "no longer driving this revision");
        }
        self.metrics.revisions.set(driven.len() as i64);
        self.driven = driven;
        Round {
            frame,
            demand: wanted_by_cfg,
        }
    }

    /// Advances the demand forecast by one report (called once per second, with the round
    /// that was reported).
    pub fn forecast(&mut self, demand: &HashMap<(String, String), f64>) -> Forecasts {
        let mut forecasts = Forecasts::new();
        self.holts.retain(|k, _| demand.contains_key(k));
        for (cfg, &wanted) in demand {
            let holt = self.holts.entry(cfg.clone()).or_default();
            holt.update(wanted);
            let replicas = holt.forecast_replicas(self.forecast_steps);
            self.metrics
                .forecast_replicas
                .with_label_values(&[cfg.0.as_str(), cfg.1.as_str()])
                .set(f64::from(replicas));
            forecasts.insert(cfg.clone(), replicas);
        }
        forecasts
    }

    fn record(&mut self, rev: &DrivenRevision, d: &Decision, now: Instant) {
        let labels = [rev.namespace.as_str(), rev.name.as_str()];
        let kpa_pods = d.kpa_pods(rev.policy.kpa, self.reporters);
        let load = match rev.policy.kpa.metric {
            crate::annotations::KpaMetric::Concurrency => d.report.concurrency,
            crate::annotations::KpaMetric::Rps => d.report.request_count,
        };
        self.metrics
            .decision_pods
            .with_label_values(&labels)
            .set(d.pods);
        self.metrics
            .decision_kpa_pods
            .with_label_values(&labels)
            .set(f64::from(kpa_pods));
        self.metrics
            .reported_load
            .with_label_values(&labels)
            .set(load);
        let key = (rev.namespace.clone(), rev.name.clone());
        let changed = self
            .last
            .get(&key)
            .is_none_or(|l| l.kpa_pods != kpa_pods || l.driver != d.driver.as_str());
        if changed {
            tracing::info!(
                namespace = %rev.namespace,
                revision = %rev.name,
                mode = rev.policy.mode.as_str(),
                driver = d.driver.as_str(),
                pods = kpa_pods,
                wanted = format!("{:.2}", d.pods),
                requests = format!("{:.1}", d.requests),
                in_flight = format!("{:.1}", d.in_flight),
                queued = format!("{:.1}", d.queued),
                request_rate = format!("{:.1}", d.request_rate),
                gpu_busy = format!("{:.2}", d.gpu_busy),
                pods_reporting = d.pods_reporting,
                kpa_target = rev.policy.kpa.value,
                "reported load changed"
            );
        }
        self.last.insert(
            key,
            Last {
                report: d.report,
                kpa_pods,
                driver: d.driver.as_str(),
                at: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{KpaMetric, KpaTarget, Mode};
    use crate::policy::RevisionPolicy;

    fn rev(name: &str, cfg: &str, pods: &[&str]) -> DrivenRevision {
        DrivenRevision {
            namespace: "ns".into(),
            name: name.into(),
            configuration: cfg.into(),
            policy: RevisionPolicy {
                mode: Mode::Requests,
                gpu_target: 0.8,
                kpa: KpaTarget {
                    metric: KpaMetric::Concurrency,
                    value: 7.0,
                },
            },
            pods: pods.iter().map(|p| (PodKey::new("ns", *p), None)).collect(),
        }
    }

    fn in_flight(v: f64) -> PodSignals {
        PodSignals {
            in_flight: Some(v),
            ..PodSignals::default()
        }
    }

    fn engine() -> Engine {
        let m = Metrics::register(&prometheus::Registry::new()).unwrap();
        Engine::new(
            KnativeReporters::None,
            Duration::from_secs(3),
            Duration::from_secs(60),
            m,
        )
    }

    #[test]
    fn one_stat_per_revision_and_holds_through_an_outage() {
        let mut e = engine();
        let revs = [rev("a-1", "a", &["p1", "p2"]), rev("b-1", "b", &[])];
        let t0 = Instant::now();
        let signals: HashMap<_, _> = [
            (PodKey::new("ns", "p1"), in_flight(20.0)),
            (PodKey::new("ns", "p2"), in_flight(15.0)),
        ]
        .into();
        let round = e.round(&revs, &signals, t0);
        let forecasts = e.forecast(&round.demand);
        let frame = round.frame;
        assert_eq!(frame.messages.len(), 2);
        let a = frame.messages[0].stat.as_ref().unwrap();
        assert_eq!(frame.messages[0].name, "a-1");
        assert!((a.average_concurrent_requests - 35.0).abs() < 1e-6);
        assert_eq!(a.timestamp, 0);
        assert_eq!(
            frame.messages[1]
                .stat
                .as_ref()
                .unwrap()
                .average_concurrent_requests,
            0.0
        );
        assert_eq!(forecasts[&("ns".to_string(), "a".to_string())], 5);
        assert_eq!(
            e.metrics
                .decision_kpa_pods
                .with_label_values(&["ns", "a-1"])
                .get(),
            5.0
        );

        // The source goes quiet: the last report is repeated for the hold, then dropped.
        let none = HashMap::new();
        let Round { frame, .. } = e.round(&revs[..1], &none, t0 + Duration::from_secs(2));
        assert!(
            (frame.messages[0]
                .stat
                .as_ref()
                .unwrap()
                .average_concurrent_requests
                - 35.0)
                .abs()
                < 1e-6
        );
        let Round { frame, .. } = e.round(&revs[..1], &none, t0 + Duration::from_secs(4));
        assert!(frame.messages.is_empty());
        // b-1 is no longer driven: its series are gone.
        assert_eq!(e.metrics.revisions.get(), 1);
    }
}
