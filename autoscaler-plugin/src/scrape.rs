//! The direct source, for clusters without Prometheus: GET each pod's metrics endpoint (the
//! HTTP wrapper's `/metrics` on the user port by default) and read the wrapper's metrics, or
//! queue-proxy's, or DCGM gauges a pod exposes. Counters become rates from one scrape to the
//! next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;

use crate::http::HttpClient;
use crate::signals::{PodKey, Signal, SignalValues};

/// The metric names read from a pod's text exposition.
pub const IN_FLIGHT: &[&str] = &["kinfer_wrapper_requests_in_flight"];
pub const QUEUED: &[&str] = &["kinfer_wrapper_queue_depth"];
pub const REQUESTS_TOTAL: &[&str] = &["kinfer_wrapper_requests_total"];
pub const DURATION_SUM: &[&str] = &["kinfer_wrapper_request_duration_seconds_sum"];
pub const DURATION_COUNT: &[&str] = &["kinfer_wrapper_request_duration_seconds_count"];
pub const GPU_ENGINE_ACTIVE: &str = "DCGM_FI_PROF_GR_ENGINE_ACTIVE";
pub const GPU_UTIL_PERCENT: &str = "DCGM_FI_DEV_GPU_UTIL";

/// The sums of the interesting metrics of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scraped {
    pub in_flight: Option<f64>,
    pub queued: Option<f64>,
    pub requests_total: Option<f64>,
    pub duration_sum: Option<f64>,
    pub duration_count: Option<f64>,
    /// Mean over the pod's GPUs, 0..1.
    pub gpu_util: Option<f64>,
}

/// Parses the Prometheus text format, summing the series of each metric we read. Lines that
/// do not parse are skipped.
pub fn parse_text(body: &str) -> Scraped {
    let mut s = Scraped::default();
    let (mut engine, mut engine_n, mut util, mut util_n) = (0.0, 0, 0.0, 0);
    let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let rest = match rest.strip_prefix('{') {
            Some(r) => match r.rfind('}') {
                Some(end) => &r[end + 1..],
                None => continue,
            },
            None => rest,
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        match name {
            n if IN_FLIGHT.contains(&n) => add(&mut s.in_flight, value),
            n if QUEUED.contains(&n) => add(&mut s.queued, value),
            n if REQUESTS_TOTAL.contains(&n) => add(&mut s.requests_total, value),
            n if DURATION_SUM.contains(&n) => add(&mut s.duration_sum, value),
            n if DURATION_COUNT.contains(&n) => add(&mut s.duration_count, value),
            GPU_ENGINE_ACTIVE => {
                engine += value;
                engine_n += 1;
            }
            GPU_UTIL_PERCENT => {
                util += value / 100.0;
                util_n += 1;
            }
            _ => {}
        }
    }
    // The profiling counter works on MIG too; the utilisation gauge is the fallback.
    if engine_n > 0 {
        s.gpu_util = Some(engine / f64::from(engine_n));
    } else if util_n > 0 {
        s.gpu_util = Some(util / f64::from(util_n));
    }
    s
}

/// Turns two scrapes of a pod into signals: gauges from the newer one, rates from the
/// difference (nothing when a counter went backwards, i.e. the process restarted).
pub fn signals_between(
    prev: Option<(&Scraped, Instant)>,
    now: (&Scraped, Instant),
) -> Vec<(Signal, f64)> {
    let (cur, at) = now;
    let mut out = Vec::new();
    if let Some(v) = cur.in_flight {
        out.push((Signal::InFlight, v));
    }
    if let Some(v) = cur.queued {
        out.push((Signal::Queued, v));
    }
    if let Some(v) = cur.gpu_util {
        out.push((Signal::GpuUtil, v));
    }
    if let Some((prev, then)) = prev {
        let dt = at.saturating_duration_since(then).as_secs_f64();
        let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        };
        if dt > 0.0
            && let Some(d) = delta(prev.requests_total, cur.requests_total)
        {
            out.push((Signal::RequestRate, d / dt));
        }
        if let (Some(sum), Some(count)) = (
            delta(prev.duration_sum, cur.duration_sum),
            delta(prev.duration_count, cur.duration_count),
        ) && count > 0.0
        {
            out.push((Signal::Latency, sum / count));
        }
    }
    out
}

/// Scrapes pods directly.
#[derive(Clone)]
pub struct ScrapeSource {
    pub port: u16,
    pub path: String,
    pub http: HttpClient,
    pub parallel: usize,
    last: Arc<Mutex<HashMap<PodKey, (Scraped, Instant)>>>,
}

/// The outcome of one round: signals, and the pods whose endpoint failed.
pub struct ScrapeRound {
    pub values: SignalValues,
    pub failed: Vec<(PodKey, String)>,
}

impl ScrapeSource {
    pub fn new(port: u16, path: String, http: HttpClient, parallel: usize) -> Self {
        Self {
            port,
            path,
            http,
            parallel: parallel.max(1),
            last: Default::default(),
        }
    }

    /// Scrapes every pod (`(pod, IP)`) at most `parallel` at a time.
    pub async fn collect(&self, pods: Vec<(PodKey, String)>) -> ScrapeRound {
        let results: Vec<_> = futures::stream::iter(pods)
            .map(|(key, ip)| async move {
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip
                };
                let url = format!("http://{host}:{}{}", self.port, self.path);
                let r = self.http.get(&url, "text/plain").await;
                (key, r, Instant::now())
            })
            .buffer_unordered(self.parallel)
            .collect()
            .await;
        let mut round = ScrapeRound {
            values: SignalValues::new(),
            failed: Vec::new(),
        };
        let mut last = self.last.lock().expect("scrape state poisoned");
        let mut seen = HashMap::with_capacity(results.len());
        for (key, r, at) in results {
            match r {
                Ok(body) => {
                    let scraped = parse_text(&String::from_utf8_lossy(&body));
                    let prev = last.get(&key).map(|(s, t)| (s, *t));
                    for (signal, v) in signals_between(prev, (&scraped, at)) {
                        round
                            .values
                            .entry(signal)
                            .or_default()
                            .insert(key.clone(), v);
                    }
                    seen.insert(key, (scraped, at));
                }
                Err(e) => round.failed.push((key, e.to_string())),
            }
        }
        // Forget pods that are gone; keep the last good scrape of pods that failed this time.
        for (key, _) in &round.failed {
            if let Some(v) = last.remove(key) {
                seen.insert(key.clone(), v);
            }
        }
        *last = seen;
        round
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WRAPPER: &str = r#"# HELP kinfer_wrapper_requests_in_flight Inference requests being served
# TYPE kinfer_wrapper_requests_in_flight gauge
kinfer_wrapper_requests_in_flight 12
# TYPE kinfer_wrapper_queue_depth gauge
kinfer_wrapper_queue_depth 8
kinfer_wrapper_requests_total{code="200",protocol="v2"} 100
kinfer_wrapper_requests_total{code="500",protocol="v1"} 4
kinfer_wrapper_request_duration_seconds_bucket{protocol="v2",le="0.5"} 90
kinfer_wrapper_request_duration_seconds_sum{protocol="v2"} 52
kinfer_wrapper_request_duration_seconds_count{protocol="v2"} 104
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-1",pod="p",namespace="n",container="c"} 50
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-2",pod="p",namespace="n",container="c"} 100
not a metric line
broken{label="x" 3
"#;

    #[test]
    fn reads_the_wrappers_names() {
        let s = parse_text(WRAPPER);
        assert_eq!(s.in_flight, Some(12.0));
        assert_eq!(s.queued, Some(8.0));
        assert_eq!(s.requests_total, Some(104.0));
        assert_eq!(s.duration_sum, Some(52.0));
        assert_eq!(s.duration_count, Some(104.0));
        assert_eq!(s.gpu_util, Some(0.75));
    }

    #[test]
    fn engine_active_wins_over_util() {
        let s = parse_text(
            "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\"} 90\nDCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu=\"0\"} 0.4\n",
        );
        assert_eq!(s.gpu_util, Some(0.4));
        assert_eq!(parse_text(""), Scraped::default());
    }

    #[test]
    fn counters_become_rates() {
        let t0 = Instant::now();
        let a = parse_text(WRAPPER);
        let mut b = a.clone();
        b.requests_total = Some(124.0);
        b.duration_sum = Some(62.0);
        b.duration_count = Some(124.0);
        let got = signals_between(Some((&a, t0)), (&b, t0 + Duration::from_secs(2)));
        assert!(got.contains(&(Signal::RequestRate, 10.0)), "{got:?}");
        assert!(got.contains(&(Signal::Latency, 0.5)), "{got:?}");
        // A restarted process (counter reset) gives no rate rather than a negative one.
        let mut reset = a.clone();
        reset.requests_total = Some(3.0);
        let got = signals_between(Some((&a, t0)), (&reset, t0 + Duration::from_secs(1)));
        assert!(
            !got.iter().any(|(s, _)| *s == Signal::RequestRate),
            "{got:?}"
        );
        // First scrape: gauges only.
        let got = signals_between(None, (&a, t0));
        assert_eq!(got.len(), 3);
    }

    #[tokio::test]
    async fn scrapes_pods_and_reports_failures() {
        use warp::Filter;
        let route = warp::path!("metrics").map(|| WRAPPER);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        let src = ScrapeSource::new(
            port,
            "/metrics".into(),
            HttpClient::new(Duration::from_secs(2)),
            8,
        );
        let ok = PodKey::new("n", "ok");
        let bad = PodKey::new("n", "bad");
        let round = src
            .collect(vec![
                (ok.clone(), "127.0.0.1".into()),
                (bad.clone(), "127.0.0.2".into()),
            ])
            .await;
        assert_eq!(round.values[&Signal::InFlight][&ok], 12.0);
        assert!(!round.values[&Signal::InFlight].contains_key(&bad));
        assert_eq!(round.failed.len(), 1);
        assert_eq!(round.failed[0].0, bad);
    }
}
