//! The decision: from the signals of a revision's pods to the stat the plugin reports, chosen
//! so that the KPA's own formula, `desired = ceil(window average / target)`, lands on the pod
//! count the GPU-aware policy wants. Pure: no I/O, no clock.
//!
//! ## Not counting twice
//!
//! Knative's autoscaler adds up every stat it gets for a revision in a second, and records
//! `averageConcurrentRequests - averageProxiedConcurrentRequests` (and the same for request
//! counts). Besides the plugin, two Knative reporters may see the same requests:
//!
//! * queue-proxy, scraped by the autoscaler unless `target-burst-capacity` is -1, reports the
//!   requests in its pod;
//! * the activator, in the request path when the revision's ServerlessService is in Proxy
//!   mode (always with `target-burst-capacity: -1`, otherwise at low or zero capacity),
//!   reports the requests it forwards (queue-proxy marks those as proxied, so the two never
//!   add up to more than one count).
//!
//! Either way Knative already counts about the requests the pods hold (`in_flight`). With
//! [`KnativeReporters::Active`] the plugin therefore reports its load as
//! `averageConcurrentRequests` and the pods' measured in-flight requests as
//! `averageProxiedConcurrentRequests`: the autoscaler records the difference, Knative's own
//! count is added back, and the total is the plugin's load. Requests the activator holds
//! while no pod can take them are not at any pod, so they stay counted (that is how a
//! revision scales from zero). With [`KnativeReporters::None`] (scraping off and no
//! activator in the path, e.g. the local control plane) the plugin reports its load alone.

use crate::annotations::{KpaMetric, KpaTarget, Mode};
use crate::signals::PodSignals;

/// Whether Knative's own reporters count the requests at the pods (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KnativeReporters {
    /// Queue-proxy scraping or the activator report these revisions' requests too: report the
    /// difference, so Knative's count plus the plugin's is the plugin's load.
    Active,
    /// Nothing else reports for these revisions: report the load as it is.
    None,
}

/// How the plugin drives one revision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RevisionPolicy {
    pub mode: Mode,
    /// GPU busy fraction a pod should run at (0..=1).
    pub gpu_target: f64,
    pub kpa: KpaTarget,
}

/// Which signal set the pod count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Requests,
    Gpu,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Requests => "requests",
            Driver::Gpu => "gpu",
        }
    }
}

/// The fields of Knative's `Stat` the plugin fills.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    pub concurrency: f64,
    pub proxied_concurrency: f64,
    pub request_count: f64,
    pub proxied_request_count: f64,
}

impl Report {
    /// What the autoscaler records from this stat for the revision's metric.
    pub fn recorded(&self, metric: KpaMetric) -> f64 {
        match metric {
            KpaMetric::Concurrency => self.concurrency - self.proxied_concurrency,
            KpaMetric::Rps => self.request_count - self.proxied_request_count,
        }
    }
}

/// The policy's verdict for one revision in one second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Pods that reported any signal.
    pub pods_reporting: usize,
    /// Requests in the system: Σ per pod of max(in flight, rate × latency).
    pub requests: f64,
    /// Σ in-flight requests measured at the pods (what Knative's reporters see).
    pub in_flight: f64,
    pub queued: f64,
    /// Σ requests per second.
    pub request_rate: f64,
    /// Σ GPU busy fraction over the pods that report one.
    pub gpu_busy: f64,
    /// Pods the policy wants (fractional; the KPA rounds up).
    pub pods: f64,
    pub driver: Driver,
    pub report: Report,
}

impl Decision {
    /// The pod count the KPA reaches from the plugin's report plus what Knative's reporters
    /// add (see the module docs), once the window holds only this load.
    pub fn kpa_pods(&self, kpa: KpaTarget, reporters: KnativeReporters) -> u32 {
        let knative_own = match (reporters, kpa.metric) {
            (KnativeReporters::None, _) => 0.0,
            (KnativeReporters::Active, KpaMetric::Concurrency) => self.in_flight,
            (KnativeReporters::Active, KpaMetric::Rps) => self.request_rate,
        };
        kpa_desired_pods(self.report.recorded(kpa.metric) + knative_own, kpa.value)
    }
}

/// Why no decision was made for a revision this second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoDecision {
    #[error("its pods report none of the signals mode {0} needs")]
    NoSignals(&'static str),
}

/// Knative's formula for the desired pod count (`pkg/autoscaler/scaling/autoscaler.go`,
/// before rate limits and min/max scale).
pub fn kpa_desired_pods(observed: f64, target: f64) -> u32 {
    (observed / target).ceil().max(0.0) as u32
}

/// Reported values are shrunk by this factor so that a whole pod count `n` reported as
/// `n × target` cannot become `n + 1` through floating-point rounding in the KPA's average.
const ROUND_DOWN: f64 = 1.0 - 1e-9;

/// Decides what to report for a revision whose pods reported `pods` (one entry per pod that
/// exists; a pod with no data is `PodSignals::default()`).
pub fn decide(
    policy: &RevisionPolicy,
    pods: &[PodSignals],
    reporters: KnativeReporters,
) -> Result<Decision, NoDecision> {
    let mut d = Decision {
        pods_reporting: 0,
        requests: 0.0,
        in_flight: 0.0,
        queued: 0.0,
        request_rate: 0.0,
        gpu_busy: 0.0,
        pods: 0.0,
        driver: Driver::Requests,
        report: Report::default(),
    };
    let (mut with_requests, mut with_gpu) = (0, 0);
    for p in pods {
        if p.is_empty() {
            continue;
        }
        d.pods_reporting += 1;
        let in_flight = clean(p.in_flight);
        let rate = clean(p.request_rate);
        // Little's law: requests in the system = arrival rate × time in the system.
        let littles = rate * clean(p.latency_seconds);
        if p.in_flight.is_some() || p.request_rate.is_some() {
            with_requests += 1;
        }
        d.requests += in_flight.max(littles);
        d.in_flight += in_flight;
        d.queued += clean(p.queued);
        d.request_rate += rate;
        if let Some(u) = p.gpu_util {
            with_gpu += 1;
            d.gpu_busy += clean(Some(u)).min(1.0);
        }
    }

    let requests_pods = match policy.kpa.metric {
        KpaMetric::Concurrency => d.requests / policy.kpa.value,
        KpaMetric::Rps => d.request_rate / policy.kpa.value,
    };
    let gpu_pods = d.gpu_busy / policy.gpu_target;
    // A revision with no pods has no load the plugin can see: report zero (the activator's
    // own report scales it from zero).
    let no_pods = pods.is_empty();
    (d.pods, d.driver) = match policy.mode {
        Mode::Requests if with_requests > 0 || no_pods => (requests_pods, Driver::Requests),
        Mode::Gpu if with_gpu > 0 || no_pods => (gpu_pods, Driver::Gpu),
        Mode::Combined if with_requests > 0 || with_gpu > 0 || no_pods => {
            if gpu_pods > requests_pods {
                (gpu_pods, Driver::Gpu)
            } else {
                (requests_pods, Driver::Requests)
            }
        }
        mode => return Err(NoDecision::NoSignals(mode.as_str())),
    };

    let load = d.pods * policy.kpa.value * ROUND_DOWN;
    let subtract = reporters == KnativeReporters::Active;
    d.report = match policy.kpa.metric {
        KpaMetric::Concurrency => Report {
            concurrency: load,
            proxied_concurrency: if subtract { d.in_flight } else { 0.0 },
            ..Report::default()
        },
        KpaMetric::Rps => Report {
            request_count: load,
            proxied_request_count: if subtract { d.request_rate } else { 0.0 },
            ..Report::default()
        },
    };
    Ok(d)
}

/// Negative, NaN and infinite values count as zero: a source glitch must not scale a
/// revision to a thousand pods.
fn clean(v: Option<f64>) -> f64 {
    match v {
        Some(v) if v.is_finite() && v > 0.0 => v,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONC_10: KpaTarget = KpaTarget {
        metric: KpaMetric::Concurrency,
        value: 7.0, // target 10 × utilization 0.7
    };

    fn policy(mode: Mode, kpa: KpaTarget) -> RevisionPolicy {
        RevisionPolicy {
            mode,
            gpu_target: 0.8,
            kpa,
        }
    }

    fn pod(in_flight: f64, queued: f64, rate: f64, latency: f64, gpu: Option<f64>) -> PodSignals {
        PodSignals {
            in_flight: Some(in_flight),
            queued: Some(queued),
            request_rate: Some(rate),
            latency_seconds: Some(latency),
            gpu_util: gpu,
        }
    }

    fn gpu_only(u: f64) -> PodSignals {
        PodSignals {
            gpu_util: Some(u),
            ..PodSignals::default()
        }
    }

    /// Signals → what is reported → the KPA's resulting pod count, for every accounting case.
    #[test]
    fn requests_mode_table() {
        const ALONE: KnativeReporters = KnativeReporters::None;
        const ACTIVE: KnativeReporters = KnativeReporters::Active;
        // (pods, reporters, expected reported concurrency, proxied, resulting KPA pods)
        let cases: Vec<(Vec<PodSignals>, KnativeReporters, f64, f64, u32)> = vec![
            // 35 requests in one pod (30 of them queued behind a batching server): 5 pods.
            (vec![pod(35.0, 30.0, 0.0, 0.0, None)], ALONE, 35.0, 0.0, 5),
            // The same with queue-proxy or the activator also counting the 35: the plugin
            // subtracts them, Knative adds them back, the total is still 35.
            (vec![pod(35.0, 30.0, 0.0, 0.0, None)], ACTIVE, 35.0, 35.0, 5),
            // Little's law beats a low in-flight sample: 20 req/s × 1.5 s = 30 requests.
            (vec![pod(2.0, 0.0, 20.0, 1.5, None)], ALONE, 30.0, 0.0, 5),
            (vec![pod(2.0, 0.0, 20.0, 1.5, None)], ACTIVE, 30.0, 2.0, 5),
            // Load spread over three pods adds up.
            (
                vec![
                    pod(7.0, 0.0, 0.0, 0.0, None),
                    pod(7.0, 0.0, 0.0, 0.0, None),
                    pod(7.0, 0.0, 0.0, 0.0, None),
                ],
                ALONE,
                21.0,
                0.0,
                3,
            ),
            // Exactly 14 requests is exactly 2 pods, not 3.
            (vec![pod(14.0, 0.0, 0.0, 0.0, None)], ALONE, 14.0, 0.0, 2),
            // Idle pods: zero, so the KPA may scale to zero.
            (vec![pod(0.0, 0.0, 0.0, 0.0, None)], ALONE, 0.0, 0.0, 0),
            (vec![pod(0.0, 0.0, 0.0, 0.0, None)], ACTIVE, 0.0, 0.0, 0),
            // No pods (scaled to zero): nothing to add; the activator's report wakes it.
            (vec![], ACTIVE, 0.0, 0.0, 0),
            // Garbage from a source counts as zero.
            (
                vec![pod(f64::NAN, -3.0, f64::INFINITY, 1.0, None)],
                ALONE,
                0.0,
                0.0,
                0,
            ),
        ];
        for (i, (pods, reporters, conc, proxied, kpa_pods)) in cases.into_iter().enumerate() {
            let p = policy(Mode::Requests, CONC_10);
            let d = decide(&p, &pods, reporters).unwrap();
            assert!(
                (d.report.concurrency - conc).abs() < 1e-6,
                "case {i}: {d:?}"
            );
            assert_eq!(d.report.proxied_concurrency, proxied, "case {i}: {d:?}");
            assert_eq!(d.report.request_count, 0.0);
            assert_eq!(d.driver, Driver::Requests);
            assert_eq!(d.kpa_pods(CONC_10, reporters), kpa_pods, "case {i}: {d:?}");
        }
    }

    #[test]
    fn gpu_mode_table() {
        // (GPU busy per pod, resulting pods at an 80% target)
        let cases: Vec<(Vec<f64>, u32)> = vec![
            (vec![0.8], 1),
            (vec![1.0], 2),                // saturated: 1.25 pods → 2
            (vec![1.0, 1.0], 3),           // 2.5 → 3
            (vec![0.8, 0.8, 0.8], 3),      // steady at target
            (vec![0.2, 0.2, 0.2, 0.2], 1), // 1.0 → 1
            (vec![0.0, 0.0], 0),
            (vec![1.7], 2), // a bad reading above 1 counts as 1
        ];
        for (utils, expected) in cases {
            let pods: Vec<_> = utils.iter().map(|u| gpu_only(*u)).collect();
            for reporters in [KnativeReporters::None, KnativeReporters::Active] {
                let d = decide(&policy(Mode::Gpu, CONC_10), &pods, reporters).unwrap();
                assert_eq!(d.driver, Driver::Gpu);
                assert_eq!(d.kpa_pods(CONC_10, reporters), expected, "{utils:?}: {d:?}");
            }
        }
    }

    #[test]
    fn gpu_mode_overrides_request_counts_knative_sees() {
        // 40 requests in flight would be 6 pods by concurrency, but the GPUs are only 60%
        // busy: the GPU policy wants 1.5 → 2 pods, so the plugin reports less than Knative
        // counts, and the sum lands on 2.
        let pods = [
            pod(20.0, 0.0, 0.0, 0.0, Some(0.6)),
            pod(20.0, 0.0, 0.0, 0.0, Some(0.6)),
        ];
        let d = decide(&policy(Mode::Gpu, CONC_10), &pods, KnativeReporters::Active).unwrap();
        assert!(d.report.recorded(KpaMetric::Concurrency) < 0.0, "{d:?}");
        assert_eq!(d.kpa_pods(CONC_10, KnativeReporters::Active), 2);
    }

    #[test]
    fn combined_takes_the_larger() {
        let p = policy(Mode::Combined, CONC_10);
        let busy_gpu = [
            pod(3.0, 0.0, 0.0, 0.0, Some(1.0)),
            pod(3.0, 0.0, 0.0, 0.0, Some(1.0)),
        ];
        let d = decide(&p, &busy_gpu, KnativeReporters::None).unwrap();
        assert_eq!(
            (d.driver, d.kpa_pods(CONC_10, KnativeReporters::None)),
            (Driver::Gpu, 3)
        );
        let queue = [pod(50.0, 40.0, 0.0, 0.0, Some(0.9))];
        let d = decide(&p, &queue, KnativeReporters::None).unwrap();
        assert_eq!(
            (d.driver, d.kpa_pods(CONC_10, KnativeReporters::None)),
            (Driver::Requests, 8)
        );
    }

    #[test]
    fn rps_metric_reports_request_counts() {
        let rps = KpaTarget {
            metric: KpaMetric::Rps,
            value: 14.0,
        };
        let pods = [
            pod(1.0, 0.0, 30.0, 0.1, None),
            pod(1.0, 0.0, 12.0, 0.1, None),
        ];
        let d = decide(
            &policy(Mode::Requests, rps),
            &pods,
            KnativeReporters::Active,
        )
        .unwrap();
        assert_eq!(d.report.concurrency, 0.0);
        assert!((d.report.request_count - 42.0).abs() < 1e-6);
        assert_eq!(d.report.proxied_request_count, 42.0);
        assert_eq!(d.kpa_pods(rps, KnativeReporters::Active), 3);
    }

    #[test]
    fn missing_signals_are_no_decision() {
        // Pods exist, but no DCGM series for them: do not report zero (that would scale the
        // revision away); the caller holds the last report.
        let pods = [pod(5.0, 0.0, 1.0, 1.0, None)];
        assert_eq!(
            decide(&policy(Mode::Gpu, CONC_10), &pods, KnativeReporters::None),
            Err(NoDecision::NoSignals("gpu"))
        );
        let silent = [PodSignals::default()];
        assert!(
            decide(
                &policy(Mode::Requests, CONC_10),
                &silent,
                KnativeReporters::None
            )
            .is_err()
        );
        assert!(
            decide(
                &policy(Mode::Combined, CONC_10),
                &silent,
                KnativeReporters::None
            )
            .is_err()
        );
    }

    #[test]
    fn whole_pod_counts_never_round_up() {
        for n in 1..200u32 {
            for target in [0.7, 7.0, 70.0, 2.8, 0.01, 140.0] {
                let kpa = KpaTarget {
                    metric: KpaMetric::Concurrency,
                    value: target,
                };
                let load = f64::from(n) * target;
                let d = decide(
                    &policy(Mode::Requests, kpa),
                    &[pod(load, 0.0, 0.0, 0.0, None)],
                    KnativeReporters::None,
                )
                .unwrap();
                // The KPA averages over a window of equal values, then divides.
                let avg = (0..60).map(|_| d.report.concurrency).sum::<f64>() / 60.0;
                assert_eq!(kpa_desired_pods(avg, target), n, "n={n} target={target}");
            }
        }
    }
}
