//! The opt-in annotations on a Knative Service's revision template (they reach the Revision),
//! and the Knative autoscaling settings that decide how the KPA turns a reported load into
//! pods. Pure: no I/O.

use std::collections::BTreeMap;

/// Opts a revision in and picks the signal: `requests`, `gpu` or `combined`; `off` (or no
/// annotation) leaves the revision to Knative alone.
pub const AUTOSCALING: &str = "kinfer.dev/autoscaling";
/// GPU busy percentage a pod should run at (1-100, default 80), for `gpu` and `combined`.
pub const AUTOSCALING_GPU_TARGET: &str = "kinfer.dev/autoscaling-gpu-target";

pub const DEFAULT_GPU_TARGET: f64 = 0.8;

const KPA_CLASS: &str = "kpa.autoscaling.knative.dev";

/// Which load the plugin reports for a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Requests in the system (in flight plus queued at the pods, or arrival rate × service
    /// time by Little's law, whichever is larger), so a batching server's hidden queue counts.
    Requests,
    /// GPU busy time: pods = total GPU busy fraction / the GPU target.
    Gpu,
    /// The larger of the two.
    Combined,
}

impl Mode {
    pub const ALLOWED: &'static [&'static str] = &["requests", "gpu", "combined", "off"];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Requests => "requests",
            Mode::Gpu => "gpu",
            Mode::Combined => "combined",
        }
    }
}

/// `kinfer.dev/autoscaling`: `Ok(None)` for `off`.
pub fn parse_mode(value: &str) -> Result<Option<Mode>, String> {
    match value {
        "requests" => Ok(Some(Mode::Requests)),
        "gpu" => Ok(Some(Mode::Gpu)),
        "combined" => Ok(Some(Mode::Combined)),
        "off" => Ok(None),
        other => Err(format!(
            "annotation {AUTOSCALING}: invalid value {other:?}: allowed: {}",
            Mode::ALLOWED.join(", ")
        )),
    }
}

/// `kinfer.dev/autoscaling-gpu-target`: a percentage, returned as a fraction.
pub fn parse_gpu_target(value: &str) -> Result<f64, String> {
    match value.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (1.0..=100.0).contains(&p) => Ok(p / 100.0),
        _ => Err(format!(
            "annotation {AUTOSCALING_GPU_TARGET}: invalid value {value:?}: allowed: a percentage from 1 to 100, e.g. 80"
        )),
    }
}

/// The KPA metric of a revision (`autoscaling.knative.dev/metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KpaMetric {
    Concurrency,
    Rps,
}

/// The per-pod value the KPA divides the observed load by: `desired = ceil(load / value)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KpaTarget {
    pub metric: KpaMetric,
    pub value: f64,
}

/// Cluster defaults from Knative's `config-autoscaler` ConfigMap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnativeDefaults {
    pub container_concurrency_target_default: f64,
    pub container_concurrency_target_fraction: f64,
    pub rps_target_default: f64,
    pub rps_target_fraction: f64,
}

impl Default for KnativeDefaults {
    fn default() -> Self {
        Self {
            container_concurrency_target_default: 100.0,
            container_concurrency_target_fraction: 0.7,
            rps_target_default: 200.0,
            rps_target_fraction: 0.7,
        }
    }
}

impl KnativeDefaults {
    /// Reads the keys Knative reads (`pkg/autoscaler/config/config.go`); bad values keep the
    /// default, as Knative would refuse them.
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Self {
        let mut d = Self::default();
        let num = |k: &str| data.get(k).and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(v) = num("container-concurrency-target-default").filter(|v| *v > 0.0) {
            d.container_concurrency_target_default = v;
        }
        if let Some(mut v) = num("container-concurrency-target-percentage") {
            if v > 1.0 {
                v /= 100.0;
            }
            if v > 0.0 && v <= 1.0 {
                d.container_concurrency_target_fraction = v;
            }
        }
        if let Some(v) = num("requests-per-second-target-default").filter(|v| *v >= 0.01) {
            d.rps_target_default = v;
        }
        d
    }
}

/// The KPA's target for a revision, as `ResolveMetricTarget` in Knative's
/// `pkg/reconciler/autoscaling/resources/target.go` computes it.
pub fn kpa_target(
    annotations: &BTreeMap<String, String>,
    container_concurrency: i64,
    defaults: &KnativeDefaults,
) -> Result<KpaTarget, String> {
    let get = |k: &str| annotations.get(&format!("autoscaling.knative.dev/{k}"));
    if let Some(class) = get("class")
        && class != KPA_CLASS
    {
        return Err(format!(
            "autoscaling.knative.dev/class is {class}: the plugin feeds only the KPA ({KPA_CLASS})"
        ));
    }
    let metric = match get("metric").map(String::as_str) {
        None | Some("concurrency") => KpaMetric::Concurrency,
        Some("rps") => KpaMetric::Rps,
        Some(other) => {
            return Err(format!(
                "autoscaling.knative.dev/metric is {other}: the KPA scales only on concurrency or rps"
            ));
        }
    };
    let (mut total, mut fraction) = match metric {
        KpaMetric::Concurrency if container_concurrency > 0 => (
            container_concurrency as f64,
            defaults.container_concurrency_target_fraction,
        ),
        KpaMetric::Concurrency => (
            defaults.container_concurrency_target_default,
            defaults.container_concurrency_target_fraction,
        ),
        KpaMetric::Rps => (defaults.rps_target_default, defaults.rps_target_fraction),
    };
    if let Some(t) = get("target").and_then(|v| v.parse::<f64>().ok()) {
        total = t;
        if metric == KpaMetric::Concurrency && container_concurrency > 0 {
            total = t.min(container_concurrency as f64);
        }
    }
    if let Some(p) = get("target-utilization-percentage").and_then(|v| v.parse::<f64>().ok()) {
        fraction = p / 100.0;
    }
    Ok(KpaTarget {
        metric,
        value: (total * fraction).max(0.01),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("gpu"), Ok(Some(Mode::Gpu)));
        assert_eq!(parse_mode("requests"), Ok(Some(Mode::Requests)));
        assert_eq!(parse_mode("combined"), Ok(Some(Mode::Combined)));
        assert_eq!(parse_mode("off"), Ok(None));
        let err = parse_mode("GPU").unwrap_err();
        assert!(
            err.contains("kinfer.dev/autoscaling") && err.contains("\"GPU\""),
            "{err}"
        );
        assert!(err.contains("requests, gpu, combined, off"), "{err}");
    }

    #[test]
    fn gpu_targets() {
        assert_eq!(parse_gpu_target("80"), Ok(0.8));
        assert_eq!(parse_gpu_target("100%"), Ok(1.0));
        assert!(parse_gpu_target("0").is_err());
        assert!(parse_gpu_target("150").is_err());
        assert!(parse_gpu_target("NaN").is_err());
    }

    #[test]
    fn targets_follow_knatives_resolution() {
        let d = KnativeDefaults::default();
        type Case<'a> = (&'a [(&'a str, &'a str)], i64, KpaMetric, f64);
        let cases: &[Case] = &[
            (&[], 0, KpaMetric::Concurrency, 70.0),
            (&[], 4, KpaMetric::Concurrency, 2.8),
            (
                &[("autoscaling.knative.dev/target", "10")],
                0,
                KpaMetric::Concurrency,
                7.0,
            ),
            // The annotation cannot exceed containerConcurrency.
            (
                &[("autoscaling.knative.dev/target", "10")],
                4,
                KpaMetric::Concurrency,
                2.8,
            ),
            (
                &[
                    ("autoscaling.knative.dev/target", "10"),
                    (
                        "autoscaling.knative.dev/target-utilization-percentage",
                        "50",
                    ),
                ],
                0,
                KpaMetric::Concurrency,
                5.0,
            ),
            (
                &[("autoscaling.knative.dev/metric", "rps")],
                0,
                KpaMetric::Rps,
                140.0,
            ),
            (
                &[
                    ("autoscaling.knative.dev/metric", "rps"),
                    ("autoscaling.knative.dev/target", "20"),
                ],
                2,
                KpaMetric::Rps,
                14.0,
            ),
            (
                &[("autoscaling.knative.dev/target", "0.001")],
                0,
                KpaMetric::Concurrency,
                0.01,
            ),
        ];
        for (a, cc, metric, value) in cases {
            let t = kpa_target(&ann(a), *cc, &d).unwrap();
            assert_eq!(t.metric, *metric, "{a:?}");
            assert!(
                (t.value - value).abs() < 1e-9,
                "{a:?} cc={cc}: {} != {value}",
                t.value
            );
        }
    }

    #[test]
    fn other_classes_and_metrics_are_refused() {
        let d = KnativeDefaults::default();
        let hpa = ann(&[(
            "autoscaling.knative.dev/class",
            "hpa.autoscaling.knative.dev",
        )]);
        assert!(
            kpa_target(&hpa, 0, &d)
                .unwrap_err()
                .contains("only the KPA")
        );
        let cpu = ann(&[("autoscaling.knative.dev/metric", "cpu")]);
        assert!(kpa_target(&cpu, 0, &d).unwrap_err().contains("cpu"));
    }

    #[test]
    fn config_map_defaults() {
        let d = KnativeDefaults::from_config_map(&ann(&[
            ("container-concurrency-target-default", "10"),
            ("container-concurrency-target-percentage", "50"),
            ("requests-per-second-target-default", "bad"),
        ]));
        assert_eq!(d.container_concurrency_target_default, 10.0);
        assert_eq!(d.container_concurrency_target_fraction, 0.5);
        assert_eq!(d.rps_target_default, 200.0);
    }
}
