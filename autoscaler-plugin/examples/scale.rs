//! Scale check without a cluster: 1000 revisions of 10 pods each. Per round, the five
//! Prometheus answers (10 000 series each, as JSON) are parsed and the engine decides and
//! frames every revision. Prints the time per round and the process's peak RSS.
//!
//!     cargo run --release -p kinfer-autoscaler-plugin --example scale

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kinfer_autoscaler_plugin::annotations::{KpaMetric, KpaTarget, Mode};
use kinfer_autoscaler_plugin::discovery::DrivenRevision;
use kinfer_autoscaler_plugin::engine::Engine;
use kinfer_autoscaler_plugin::metrics::Metrics;
use kinfer_autoscaler_plugin::policy::{KnativeReporters, RevisionPolicy};
use kinfer_autoscaler_plugin::prom::parse_vector;
use kinfer_autoscaler_plugin::signals::{self, PodKey, Signal, SignalValues};
use prost::Message;

fn answer(revisions: usize, pods: usize, round: usize) -> Vec<u8> {
    let mut s = String::from(r#"{"status":"success","data":{"resultType":"vector","result":["#);
    for r in 0..revisions {
        for p in 0..pods {
            if r + p > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                r#"{{"metric":{{"namespace":"ns-{}","pod":"rev-{r}-deployment-abc-{p}"}},"value":[1767225600.5,"{}"]}}"#,
                r % 50,
                (r + p + round) % 13
            ));
        }
    }
    s.push_str("]}}");
    s.into_bytes()
}

fn main() {
    let (n_rev, n_pods, rounds) = (1000, 10, 30);
    let revisions: Vec<DrivenRevision> = (0..n_rev)
        .map(|r| DrivenRevision {
            namespace: format!("ns-{}", r % 50),
            name: format!("rev-{r}"),
            configuration: format!("cfg-{r}"),
            policy: RevisionPolicy {
                mode: Mode::Combined,
                gpu_target: 0.8,
                kpa: KpaTarget {
                    metric: KpaMetric::Concurrency,
                    value: 7.0,
                },
            },
            pods: (0..n_pods)
                .map(|p| {
                    (
                        PodKey::new(
                            format!("ns-{}", r % 50),
                            format!("rev-{r}-deployment-abc-{p}"),
                        ),
                        None,
                    )
                })
                .collect(),
        })
        .collect();
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let mut engine = Engine::new(
        KnativeReporters::Active,
        Duration::from_secs(30),
        Duration::from_secs(60),
        metrics,
    );
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    let mut bytes = 0;
    for round in 0..rounds {
        let bodies: Vec<_> = (0..5).map(|i| answer(n_rev, n_pods, round + i)).collect();
        let start = Instant::now();
        let mut values = SignalValues::new();
        for (signal, body) in Signal::ALL.iter().zip(&bodies) {
            values.insert(*signal, parse_vector(body).unwrap().values);
        }
        let by_pod: HashMap<_, _> = signals::by_pod(&values);
        let r = engine.round(&revisions, &by_pod, Instant::now());
        engine.forecast(&r.demand);
        bytes = r.frame.encode_to_vec().len();
        let took = start.elapsed();
        worst = worst.max(took);
        total += took;
    }
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mean = total / rounds as u32;
    // The plugin collects every --collect-interval (250 ms), stretched to twice a round's
    // duration when rounds take longer: the share of a core that collection takes.
    let interval = Duration::from_millis(250).max(mean * 2);
    println!(
        "{n_rev} revisions × {n_pods} pods: mean {mean:.1?} per round, worst {worst:.1?}; collect interval {interval:.0?} → {:.0}% of a core; frame {bytes} bytes; peak {rss}",
        100.0 * mean.as_secs_f64() / interval.as_secs_f64()
    );
}
