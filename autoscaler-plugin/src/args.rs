//! Command-line flags (each with an environment variable).

use std::time::Duration;

use kinfer_core::{ClientArgs, CommonArgs};

use crate::policy::KnativeReporters;
use crate::signals::Signal;

/// Default PromQL per signal. Each must return one series per pod with `namespace` and `pod`
/// labels (add `label_replace` when your scrape config names them differently, e.g. DCGM's
/// `exported_pod` behind a ServiceMonitor).
pub const DEFAULT_IN_FLIGHT: &str = "sum by (namespace, pod) (kinfer_wrapper_requests_in_flight)";
pub const DEFAULT_QUEUED: &str = "sum by (namespace, pod) (kinfer_wrapper_queue_depth)";
pub const DEFAULT_REQUEST_RATE: &str =
    "sum by (namespace, pod) (rate(kinfer_wrapper_requests_total[30s]))";
pub const DEFAULT_LATENCY: &str = "sum by (namespace, pod) (rate(kinfer_wrapper_request_duration_seconds_sum[30s])) / sum by (namespace, pod) (rate(kinfer_wrapper_request_duration_seconds_count[30s]) > 0)";
pub const DEFAULT_GPU_UTIL: &str = "avg by (namespace, pod) (DCGM_FI_PROF_GR_ENGINE_ACTIVE) or avg by (namespace, pod) (DCGM_FI_DEV_GPU_UTIL) / 100";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// Query a Prometheus server (`--prometheus-url`).
    Prometheus,
    /// GET every pod's metrics endpoint (`--scrape-port`, `--scrape-path`).
    Scrape,
}

/// kinfer's GPU-aware load signal for Knative's autoscaler (KPA).
///
/// Reads load signals of opted-in revisions (annotation `kinfer.dev/autoscaling`) from
/// Prometheus or the pods' metric endpoints, turns them into the load the KPA should see, and
/// sends it over the KPA's own stat websocket, so Knative keeps its windows, scale-to-zero and
/// rate limits. Run one replica: the KPA adds up every report it gets in a second.
#[derive(Debug, clap::Parser)]
#[command(name = "kinfer-autoscaler-plugin", version)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub client: ClientArgs,

    /// The Knative autoscaler's stat websocket.
    #[arg(long, env = "KINFER_AUTOSCALER_URL", default_value = kinfer_core::kpa::DEFAULT_AUTOSCALER_URL)]
    pub autoscaler_url: String,

    /// Knative's namespace (for the `config-autoscaler` defaults).
    #[arg(
        long,
        env = "KINFER_KNATIVE_NAMESPACE",
        default_value = "knative-serving"
    )]
    pub knative_namespace: String,

    /// Drive only revisions in this namespace (default: all namespaces).
    #[arg(long, env = "KINFER_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Where the signals come from.
    #[arg(long, env = "KINFER_SOURCE", value_enum, default_value_t = SourceKind::Prometheus)]
    pub source: SourceKind,

    /// Prometheus' base URL.
    #[arg(
        long,
        env = "KINFER_PROMETHEUS_URL",
        default_value = "http://prometheus.monitoring.svc:9090"
    )]
    pub prometheus_url: String,

    /// PromQL for requests in each pod (served and queued).
    #[arg(long, env = "KINFER_QUERY_IN_FLIGHT", default_value = DEFAULT_IN_FLIGHT)]
    pub query_in_flight: String,
    /// PromQL for requests waiting for a worker in each pod.
    #[arg(long, env = "KINFER_QUERY_QUEUED", default_value = DEFAULT_QUEUED)]
    pub query_queued: String,
    /// PromQL for requests answered per second by each pod.
    #[arg(long, env = "KINFER_QUERY_REQUEST_RATE", default_value = DEFAULT_REQUEST_RATE)]
    pub query_request_rate: String,
    /// PromQL for each pod's mean request latency in seconds.
    #[arg(long, env = "KINFER_QUERY_LATENCY", default_value = DEFAULT_LATENCY)]
    pub query_latency: String,
    /// PromQL for each pod's GPU busy fraction (0..1).
    #[arg(long, env = "KINFER_QUERY_GPU_UTIL", default_value = DEFAULT_GPU_UTIL)]
    pub query_gpu_util: String,

    /// Port of the pods' metrics endpoint (`--source scrape`).
    #[arg(long, env = "KINFER_SCRAPE_PORT", default_value_t = 8080)]
    pub scrape_port: u16,
    /// Path of the pods' metrics endpoint (`--source scrape`).
    #[arg(long, env = "KINFER_SCRAPE_PATH", default_value = "/metrics")]
    pub scrape_path: String,
    /// Pods scraped at once (`--source scrape`).
    #[arg(long, env = "KINFER_SCRAPE_PARALLEL", default_value_t = 256)]
    pub scrape_parallel: usize,

    /// Whether Knative's own reporters (queue-proxy scraping, the activator) also count the
    /// requests at the pods: `active` reports the difference so nothing is counted twice;
    /// `none` when `target-burst-capacity` is -1 and no activator is in the path.
    #[arg(long, env = "KINFER_KNATIVE_REPORTERS", value_enum, default_value_t = KnativeReporters::Active)]
    pub knative_reporters: KnativeReporters,

    /// How often the pods' signals are read. Reports go once per second whatever this is
    /// (the KPA adds up a second's stats), but a load step goes out as soon as it is seen.
    /// A round that takes long stretches the interval to twice its own duration, so a large
    /// fleet slows collection down rather than taking the CPU.
    #[arg(long, env = "KINFER_COLLECT_INTERVAL", default_value = "250ms", value_parser = parse_duration)]
    pub collect_interval: Duration,
    /// How long one collection round may take before its stragglers are dropped.
    #[arg(long, env = "KINFER_SOURCE_TIMEOUT", default_value = "800ms", value_parser = parse_duration)]
    pub source_timeout: Duration,
    /// How long a revision's last report is repeated while its signals are missing (a source
    /// outage must not read as zero load and scale it away); then reports stop.
    #[arg(long, env = "KINFER_HOLD", default_value = "30s", value_parser = parse_duration)]
    pub hold: Duration,
    /// How far ahead the demand forecast looks.
    #[arg(long, env = "KINFER_FORECAST_HORIZON", default_value = "60s", value_parser = parse_duration)]
    pub forecast_horizon: Duration,
}

impl Args {
    pub fn queries(&self) -> Vec<(Signal, String)> {
        vec![
            (Signal::InFlight, self.query_in_flight.clone()),
            (Signal::Queued, self.query_queued.clone()),
            (Signal::RequestRate, self.query_request_rate.clone()),
            (Signal::Latency, self.query_latency.clone()),
            (Signal::GpuUtil, self.query_gpu_util.clone()),
        ]
        .into_iter()
        .filter(|(_, q)| !q.trim().is_empty())
        .collect()
    }
}

/// `250ms`, `1s`, `1.5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 500ms, 1s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn defaults_parse() {
        let a = Args::try_parse_from(["p"]).unwrap();
        assert_eq!(a.collect_interval, Duration::from_millis(250));
        assert_eq!(a.queries().len(), 5);
        assert_eq!(a.knative_reporters, KnativeReporters::Active);
        let a = Args::try_parse_from(["p", "--query-gpu-util", "", "--source", "scrape"]).unwrap();
        assert_eq!(a.queries().len(), 4);
        assert_eq!(a.source, SourceKind::Scrape);
    }
}
