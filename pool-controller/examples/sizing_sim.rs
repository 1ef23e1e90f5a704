//! Benchmark 2 of the pool controller: pool sizing by simulation, no cluster.
//!
//!   cargo run --release -p kinfer-pool-controller --example sizing_sim
//!
//! Replays a synthetic two-day trace of apps shaped like the Azure Functions trace (steady,
//! diurnal, bursty and rare apps; Shahrad et al., ATC'20) through several pool-sizing
//! policies and prints, per policy, the cold-start rate (scale-up pods that found no loaded
//! warm pod) and the warm pod-seconds held (loading or loaded). A new warm pod takes the
//! model's load time (20 s) before it can be handed off; a handed-off pod is replaced at once.

use kinfer_core::warmpool::Sizing;
use kinfer_pool_controller::sizing::{self, Input, ScaleUp};

const LOAD: f64 = 20.0;
const DAY: usize = 86_400;
const DURATION: usize = 2 * DAY;
const TICK: usize = 10;

/// xorshift64*: deterministic pseudo-random numbers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

/// Replicas an app needs at each second.
fn trace(kind: &str, seed: u64) -> Vec<i32> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut d = vec![0; DURATION];
    match kind {
        "steady" => {
            let mut level = 2i32;
            for (t, v) in d.iter_mut().enumerate() {
                if t % 300 == 0 {
                    level = (level + if rng.next() < 0.5 { -1 } else { 1 }).clamp(1, 4);
                }
                *v = level;
            }
        }
        "diurnal" => {
            let phase = rng.range(0.0, 3600.0);
            for (t, v) in d.iter_mut().enumerate() {
                let x = ((t as f64 + phase) / DAY as f64 * std::f64::consts::TAU).sin();
                *v = (2.5 + 2.5 * x).round() as i32; // 0..5, zero at night
            }
        }
        "bursty" => {
            let mut t = rng.range(600.0, 3600.0) as usize;
            while t < DURATION {
                let pods = rng.range(2.0, 4.99) as i32;
                let len = rng.range(120.0, 300.0) as usize;
                for v in d.iter_mut().skip(t).take(len) {
                    *v = pods;
                }
                t += len + rng.range(1200.0, 3600.0) as usize;
            }
        }
        "rare" => {
            // Once every two to three hours, for a few minutes.
            let mut t = rng.range(0.0, 7200.0) as usize;
            while t < DURATION {
                let len = rng.range(60.0, 240.0) as usize;
                for v in d.iter_mut().skip(t).take(len) {
                    *v = 1;
                }
                t += len + rng.range(7200.0, 10800.0) as usize;
            }
        }
        _ => unreachable!(),
    }
    d
}

#[derive(Clone, Copy, Debug)]
enum Policy {
    Fixed(i32),
    OpenWhiskReactive,
    HybridHistogram,
    Kinfer,
}

impl Policy {
    fn name(self) -> String {
        match self {
            Policy::Fixed(n) => format!("fixed pool of {n} (Fission)"),
            Policy::OpenWhiskReactive => "OpenWhisk reactive prewarm".into(),
            Policy::HybridHistogram => "hybrid histogram (SitW)".into(),
            Policy::Kinfer => "kinfer predictive".into(),
        }
    }
}

#[derive(Default)]
struct Outcome {
    scale_up_pods: u64,
    cold: u64,
    warm_pod_seconds: f64,
}

/// State for the hybrid-histogram policy: idle times in one-minute bins over four hours.
struct Histogram {
    bins: [u32; 240],
    oob: u32,
    idle_since: Option<usize>,
}

impl Histogram {
    fn window(&self) -> (f64, f64) {
        let n: u32 = self.bins.iter().sum();
        let total = n + self.oob;
        let mean = n as f64 / 240.0;
        let var = self
            .bins
            .iter()
            .map(|&b| (b as f64 - mean).powi(2))
            .sum::<f64>()
            / 240.0;
        let cv = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
        if total < 3 || cv < 2.0 || self.oob * 2 >= total.max(1) {
            // Not representative: keep warm for the whole range (the fixed fallback).
            return (0.0, 4.0 * 3600.0);
        }
        let pct = |p: f64| {
            let target = (p * n as f64).ceil() as u32;
            let mut acc = 0;
            for (i, &b) in self.bins.iter().enumerate() {
                acc += b;
                if acc >= target.max(1) {
                    return i as f64;
                }
            }
            239.0
        };
        let head = pct(0.05) * 60.0;
        let tail = (pct(0.99) + 1.0) * 60.0;
        (head * 0.9, tail * 1.1 - head * 0.9)
    }
}

fn simulate(policy: Policy, demand: &[i32]) -> Outcome {
    let mut out = Outcome::default();
    // Warm pods: the second each becomes loaded.
    let mut pool: Vec<f64> = Vec::new();
    let mut scale_ups: Vec<ScaleUp> = Vec::new();
    let mut cold_in_tick = 0;
    let mut ow_desired = 1;
    let mut hist = Histogram {
        bins: [0; 240],
        oob: 0,
        idle_since: Some(0),
    };
    let mut desired = 0;
    for t in 0..demand.len() {
        let now = t as f64;
        let prev = if t == 0 { 0 } else { demand[t - 1] };
        let cur = demand[t];
        if cur > prev {
            let k = cur - prev;
            out.scale_up_pods += k as u64;
            scale_ups.push(ScaleUp { at: now, pods: k });
            let mut handed = 0;
            pool.sort_by(f64::total_cmp);
            while handed < k && pool.first().is_some_and(|&r| r <= now) {
                pool.remove(0);
                handed += 1;
            }
            out.cold += (k - handed) as u64;
            cold_in_tick += k - handed;
            if prev == 0
                && let Some(since) = hist.idle_since.take()
            {
                let minutes = (t - since) / 60;
                if minutes < 240 {
                    hist.bins[minutes] += 1;
                } else {
                    hist.oob += 1;
                }
            }
        }
        if cur == 0 && prev > 0 {
            hist.idle_since = Some(t);
        }
        if t % TICK == 0 || cur > prev {
            if t % 60 == 0 {
                // OpenWhisk: min(max(minCount, coldStarts / threshold * increment), maxCount).
                ow_desired = cold_in_tick.clamp(1, 4);
                cold_in_tick = 0;
            }
            desired = match policy {
                Policy::Fixed(n) => n,
                Policy::OpenWhiskReactive => ow_desired,
                Policy::HybridHistogram => match hist.idle_since {
                    None => 1,
                    Some(since) => {
                        let (prewarm, keep) = hist.window();
                        let idle = now - since as f64;
                        // Load ahead of the window so the pod is ready when it opens.
                        i32::from(idle + LOAD >= prewarm && idle <= prewarm + keep)
                    }
                },
                Policy::Kinfer => {
                    if scale_ups.len() > 512 {
                        scale_ups = sizing::prune(std::mem::take(&mut scale_ups), now, 512);
                    }
                    sizing::size(&Input {
                        policy: Sizing::Predictive,
                        min_ready: 0,
                        max_ready: 4,
                        now,
                        scale_ups: &scale_ups,
                        forecast: None,
                        replicas: cur,
                        refill_seconds: LOAD,
                        warm: pool.len() as i32,
                        room: None,
                    })
                    .desired
                }
            };
        }
        // Refill or shrink (loading pods go first).
        while (pool.len() as i32) < desired {
            pool.push(now + LOAD);
        }
        if (pool.len() as i32) > desired {
            pool.sort_by(|a, b| b.total_cmp(a));
            pool.drain(..pool.len() - desired as usize);
        }
        out.warm_pod_seconds += pool.len() as f64;
    }
    out
}

fn main() {
    let mut apps = Vec::new();
    for (kind, count) in [("steady", 2), ("diurnal", 3), ("bursty", 3), ("rare", 4)] {
        for i in 0..count {
            apps.push((kind, trace(kind, (apps.len() * 7 + i + 1) as u64)));
        }
    }
    println!(
        "{} apps over {} h, model load {LOAD} s; cold-start rate = scale-up pods with no loaded warm pod",
        apps.len(),
        DURATION / 3600
    );
    println!(
        "{:<30} {:>10} {:>8} {:>11} {:>16}",
        "policy", "scale-ups", "cold", "cold rate", "warm pod-hours"
    );
    for policy in [
        Policy::Fixed(1),
        Policy::Fixed(3),
        Policy::OpenWhiskReactive,
        Policy::HybridHistogram,
        Policy::Kinfer,
    ] {
        let mut total = Outcome::default();
        for (_, demand) in &apps {
            let o = simulate(policy, demand);
            total.scale_up_pods += o.scale_up_pods;
            total.cold += o.cold;
            total.warm_pod_seconds += o.warm_pod_seconds;
        }
        println!(
            "{:<30} {:>10} {:>8} {:>10.1}% {:>16.1}",
            policy.name(),
            total.scale_up_pods,
            total.cold,
            100.0 * total.cold as f64 / total.scale_up_pods.max(1) as f64,
            total.warm_pod_seconds / 3600.0
        );
    }
}
