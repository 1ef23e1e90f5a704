//! How many warm pods a pool holds. Pure: times are Unix seconds, the cluster's room is a
//! number the caller computed (see [`crate::capacity`]).
//!
//! `fixed` holds `minReady`. `predictive` holds the pods that the Configuration's next
//! arrival of load is likely to need, when it is likely to come. An arrival is a scale-up (the
//! scale-ups within one model-load time of it added up: a pool pod needs the load time to
//! become ready, so only pods already warm can serve them). From the history of arrivals:
//!
//! - **renewal**: each past gap between consecutive arrivals is a sample of how long the
//!   next one takes, smeared over ±20% of the gap (the hybrid histogram of Serverless in the
//!   Wild keeps a 10% margin), narrower where other gaps agree (at most 4× the distance to
//!   the 4th-nearest other gap, at least ±30 s). Given the time since the last arrival, the
//!   samples still ahead, plus a prior worth one sample (arrivals at the app's mean rate over
//!   its history, the current wait included), give the chance that an arrival comes within
//!   the load time plus the controller's recheck interval. The j-th largest arrival size seen
//!   is held while that chance, times the share of arrivals at least that large, is worth it:
//!   at least (load + recheck) / `COLD_START_COST` (a cold start is worth about 1.9 warm
//!   pod-hours). So a pool holds nothing right after an arrival or between the predicted
//!   ones, pre-warms ahead of them, grows as the wait makes an arrival likelier, and lets
//!   go of a Configuration whose traffic has stopped once its mean rate falls low enough;
//! - **learning**: with no arrival yet the pool holds one pod; after the first, as many pods
//!   as it needed, for four hours (the hybrid histogram's fallback keep-alive);
//! - **forecast**: the autoscaler plugin's forecast of replicas, less the replicas the
//!   revision already has, while the forecast is within its horizon.
//!
//! The pool is the larger of renewal and forecast, within `minReady..maxReady`, and never
//! more than the cluster can spare: warm pods must never make a real pod unschedulable, so
//! when real pods are pending for lack of room the pool gives its place up (it may go below
//! `minReady`).

use kinfer_core::warmpool::Sizing;

/// A cold start is worth this many warm pod-seconds: a pod is held while the chance per
/// second that an arrival needs it is at least the inverse. Chosen on the sizing simulation's
/// trace seeds 101..=140 (with seed 0) from 6500, 6800 and 7200 for the most traces on which
/// ours beats all four baselines, and checked on seeds 1..=20 (`examples/sizing_sim.rs`).
pub const COLD_START_COST: f64 = 6800.0;
/// How uncertain the time of a past gap is, as a share of the gap.
const SPREAD: f64 = 0.2;
/// ... but no more than `NEIGHBOUR_SPREAD` times the distance to the `NEIGHBOUR`-th nearest
/// other gap (gaps that repeat are sharp), and at least `MIN_SPREAD` seconds.
const NEIGHBOUR: usize = 4;
const NEIGHBOUR_SPREAD: f64 = 4.0;
const MIN_SPREAD: f64 = 30.0;
/// How many samples the prior (arrivals at the mean rate) is worth.
const PRIOR_WEIGHT: f64 = 1.0;
/// After the first arrival, before there is a gap to learn from, its pods are kept this long.
pub const FALLBACK_KEEP: f64 = 4.0 * 3600.0;
/// How often the controller looks again when nothing changes (its idle requeue).
pub const RECHECK: f64 = 30.0;
/// The most scale-ups the pool's status keeps.
pub const HISTORY_LIMIT: usize = 128;
/// Scale-ups older than this are forgotten.
pub const HISTORY: f64 = 86_400.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleUp {
    pub at: f64,
    pub pods: i32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    pub replicas: i32,
    pub horizon_seconds: f64,
    pub observed_at: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Input<'a> {
    pub policy: Sizing,
    pub min_ready: i32,
    pub max_ready: i32,
    pub now: f64,
    /// Scale-ups of the Configuration, any order.
    pub scale_ups: &'a [ScaleUp],
    pub forecast: Option<Forecast>,
    /// The revision's replicas now.
    pub replicas: i32,
    /// How long a new warm pod takes to load (seconds).
    pub refill_seconds: f64,
    /// Warm pods the pool has now (loaded or loading).
    pub warm: i32,
    /// More pods of this shape the cluster can hold, after real pods that are waiting for
    /// room (negative when real pods wait); `None` when unknown (no cap).
    pub room: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub desired: i32,
    /// What the policy wanted before the cluster's room capped it.
    pub wanted: i32,
    pub capped: bool,
}

pub fn size(input: &Input) -> Decision {
    let min = input.min_ready.max(0);
    let max = input.max_ready.max(min);
    let wanted = match input.policy {
        Sizing::Fixed => min,
        Sizing::Predictive => predict(input).clamp(min, max),
    };
    match input.room {
        Some(room) if input.warm + room < wanted => {
            let desired = (input.warm + room).max(0);
            Decision {
                desired,
                wanted,
                capped: true,
            }
        }
        _ => Decision {
            desired: wanted,
            wanted,
            capped: false,
        },
    }
}

fn predict(input: &Input) -> i32 {
    let now = input.now;
    let refill = input.refill_seconds.max(1.0);
    let arrivals = arrivals(input.scale_ups, now, refill);
    let history = renewal(&arrivals, now, refill + RECHECK, input.max_ready.max(1));
    let forecast = input
        .forecast
        .filter(|f| now <= f.observed_at + f.horizon_seconds.max(0.0))
        .map(|f| f.replicas - input.replicas)
        .unwrap_or(0);
    history.max(forecast).max(0)
}

/// One arrival of load: the scale-ups that began at `at` and came within one load time of it
/// (pods that only a warm pool can serve, since no new pod loads in time).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Arrival {
    at: f64,
    pods: i32,
}

/// The arrivals up to `now`, oldest first.
fn arrivals(events: &[ScaleUp], now: f64, window: f64) -> Vec<Arrival> {
    let mut events: Vec<&ScaleUp> = events
        .iter()
        .filter(|e| e.pods > 0 && e.at <= now)
        .collect();
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut out: Vec<Arrival> = Vec::new();
    for e in events {
        match out.last_mut() {
            Some(last) if e.at - last.at <= window => last.pods += e.pods,
            _ => out.push(Arrival {
                at: e.at,
                pods: e.pods,
            }),
        }
    }
    out
}

/// Pods to hold now so that the arrivals likely within `horizon` find them warm (see the
/// module's documentation).
fn renewal(arrivals: &[Arrival], now: f64, horizon: f64, max: i32) -> i32 {
    let Some(last) = arrivals.last() else {
        return 1;
    };
    let elapsed = now - last.at;
    if arrivals.len() < 2 {
        return if elapsed <= FALLBACK_KEEP {
            last.pods.clamp(1, max)
        } else {
            0
        };
    }
    let mut gaps: Vec<f64> = arrivals.windows(2).map(|p| p[1].at - p[0].at).collect();
    gaps.sort_by(f64::total_cmp);
    // The prior: arrivals at the mean rate over the whole history, the wait since the last
    // one included (a Configuration whose traffic stopped sees its rate fall).
    let rate = gaps.len() as f64 / (now - arrivals[0].at).max(1.0);
    let mut ahead = PRIOR_WEIGHT;
    let mut within = PRIOR_WEIGHT * (1.0 - (-rate * horizon).exp());
    for (i, &gap) in gaps.iter().enumerate() {
        let mut half = gap * SPREAD;
        if gaps.len() > NEIGHBOUR {
            half = half.min(NEIGHBOUR_SPREAD * nearest(&gaps, i, NEIGHBOUR));
        }
        let half = half.max(MIN_SPREAD);
        let (lo, hi) = (gap - half, gap + half);
        let still = ((hi - elapsed) / (hi - lo)).clamp(0.0, 1.0);
        if still <= 0.0 {
            continue;
        }
        ahead += still;
        within += (hi.min(elapsed + horizon) - lo.max(elapsed)).max(0.0) / (hi - lo);
    }
    let chance = within / ahead;
    // Arrival sizes, largest first: sizes[..=i] need at least sizes[i] pods.
    let mut sizes: Vec<i32> = arrivals.iter().map(|a| a.pods.clamp(1, max)).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let threshold = horizon / COLD_START_COST;
    for (i, &pods) in sizes.iter().enumerate() {
        let share = (i + 1) as f64 / sizes.len() as f64;
        if chance * share >= threshold {
            return pods;
        }
    }
    0
}

/// The distance from `sorted[i]` to its `k`-th nearest other element (`sorted` ascending,
/// longer than `k`).
fn nearest(sorted: &[f64], i: usize, k: usize) -> f64 {
    let (mut lo, mut hi) = (i, i + 1);
    let mut distance = 0.0;
    for _ in 0..k {
        let left = lo.checked_sub(1).map(|j| sorted[i] - sorted[j]);
        let right = sorted.get(hi).map(|v| v - sorted[i]);
        distance = match (left, right) {
            (Some(l), Some(r)) if l <= r => {
                lo -= 1;
                l
            }
            (Some(l), None) => {
                lo -= 1;
                l
            }
            (_, Some(r)) => {
                hi += 1;
                r
            }
            (None, None) => unreachable!("fewer than k other elements"),
        };
    }
    distance
}

/// The scale-ups worth keeping at `now`, oldest first, at most `limit`.
pub fn prune(mut events: Vec<ScaleUp>, now: f64, limit: usize) -> Vec<ScaleUp> {
    events.retain(|e| now - e.at <= HISTORY);
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    let excess = events.len().saturating_sub(limit);
    events.drain(..excess);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: f64 = 1_000_000.0;

    fn ups(list: &[(f64, i32)]) -> Vec<ScaleUp> {
        list.iter()
            .map(|&(ago, pods)| ScaleUp {
                at: NOW - ago,
                pods,
            })
            .collect()
    }

    /// `n` arrivals of `pods`, `gap` seconds apart, the last `ago` seconds before now.
    fn every(gap: f64, n: usize, pods: i32, ago: f64) -> Vec<ScaleUp> {
        (0..n)
            .map(|i| ScaleUp {
                at: NOW - ago - gap * i as f64,
                pods,
            })
            .collect()
    }

    fn leak(v: Vec<ScaleUp>) -> &'static [ScaleUp] {
        Box::leak(v.into_boxed_slice())
    }

    fn input<'a>(policy: Sizing, scale_ups: &'a [ScaleUp]) -> Input<'a> {
        Input {
            policy,
            min_ready: 0,
            max_ready: 5,
            now: NOW,
            scale_ups,
            forecast: None,
            replicas: 0,
            refill_seconds: 20.0,
            warm: 0,
            room: None,
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            input: Input<'static>,
            desired: i32,
            capped: bool,
        }
        let none: &'static [ScaleUp] = leak(vec![]);
        // One arrival of 3 pods: two scale-ups within the load time.
        let burst3 = leak(ups(&[(600.0, 1), (595.0, 2)]));
        // The same pods 60 s apart are separate arrivals of one pod each.
        let apart = leak(ups(&[(600.0, 1), (540.0, 2)]));
        let old = leak(ups(&[(FALLBACK_KEEP + 60.0, 3)]));
        // An arrival every 10 minutes; the next is due in 10 s, or in 5 minutes.
        let due = leak(every(600.0, 20, 1, 590.0));
        let not_due = leak(every(600.0, 20, 1, 300.0));
        // Bursts of 4 pods 37.5 to 40.6 minutes apart, the last 30 minutes ago.
        let bursts = leak(
            (0..12)
                .map(|i| ScaleUp {
                    at: NOW - 1800.0 - 2400.0 * i as f64 - 37.0 * (i % 5) as f64,
                    pods: 4,
                })
                .collect(),
        );
        // Half the bursts need 1 pod, half 4, 25 to 52 minutes apart, the last 30 minutes ago.
        let mixed = leak(
            (0..12)
                .scan(NOW - 1800.0, |at, i| {
                    let up = ScaleUp {
                        at: *at,
                        pods: if i % 2 == 0 { 1 } else { 4 },
                    };
                    *at -= 1500.0 + 150.0 * ((i * 7) % 12) as f64;
                    Some(up)
                })
                .collect(),
        );
        // Overdue: past every gap seen. Arrivals every 10 minutes, or every 6 hours.
        let frequent_overdue = leak(every(600.0, 20, 1, 1200.0));
        let rare_overdue = leak(every(6.0 * 3600.0, 4, 1, 12.0 * 3600.0));
        let cases = vec![
            Case {
                name: "fixed holds minReady whatever the history",
                input: Input {
                    min_ready: 2,
                    ..input(Sizing::Fixed, burst3)
                },
                desired: 2,
                capped: false,
            },
            Case {
                name: "predictive with no history holds one pod",
                input: input(Sizing::Predictive, none),
                desired: 1,
                capped: false,
            },
            Case {
                name: "after the first arrival, its size (scale-ups within the load time add up)",
                input: input(Sizing::Predictive, burst3),
                desired: 3,
                capped: false,
            },
            Case {
                name: "scale-ups further apart than the load time are separate arrivals (of 1 and 2)",
                input: input(Sizing::Predictive, apart),
                desired: 2,
                capped: false,
            },
            Case {
                name: "the first arrival's pods are let go after the fallback keep-alive",
                input: input(Sizing::Predictive, old),
                desired: 0,
                capped: false,
            },
            Case {
                name: "a regular arrival about to come is pre-warmed",
                input: input(Sizing::Predictive, due),
                desired: 1,
                capped: false,
            },
            Case {
                name: "nothing is held between regular arrivals",
                input: input(Sizing::Predictive, not_due),
                desired: 0,
                capped: false,
            },
            Case {
                name: "minReady holds between arrivals",
                input: Input {
                    min_ready: 2,
                    ..input(Sizing::Predictive, not_due)
                },
                desired: 2,
                capped: false,
            },
            Case {
                name: "a burst within the range of past gaps is pre-warmed at its size",
                input: input(Sizing::Predictive, bursts),
                desired: 4,
                capped: false,
            },
            Case {
                name: "nothing is held long before the next burst",
                input: Input {
                    now: NOW - 800.0,
                    ..input(Sizing::Predictive, bursts)
                },
                desired: 0,
                capped: false,
            },
            Case {
                name: "early in the window, only the pods most bursts need",
                input: Input {
                    now: NOW - 550.0,
                    ..input(Sizing::Predictive, mixed)
                },
                desired: 1,
                capped: false,
            },
            Case {
                name: "late in the window, the largest burst's pods",
                input: input(Sizing::Predictive, mixed),
                desired: 4,
                capped: false,
            },
            Case {
                name: "overdue, a frequent app's mean rate still holds a pod",
                input: input(Sizing::Predictive, frequent_overdue),
                desired: 1,
                capped: false,
            },
            Case {
                name: "overdue, a rare app's mean rate does not",
                input: input(Sizing::Predictive, rare_overdue),
                desired: 0,
                capped: false,
            },
            Case {
                name: "maxReady bounds the prediction",
                input: Input {
                    max_ready: 2,
                    ..input(Sizing::Predictive, bursts)
                },
                desired: 2,
                capped: false,
            },
            Case {
                name: "a fresh forecast above the current replicas adds the difference",
                input: Input {
                    forecast: Some(Forecast {
                        replicas: 4,
                        horizon_seconds: 300.0,
                        observed_at: NOW - 60.0,
                    }),
                    replicas: 1,
                    ..input(Sizing::Predictive, not_due)
                },
                desired: 3,
                capped: false,
            },
            Case {
                name: "a stale forecast is ignored",
                input: Input {
                    forecast: Some(Forecast {
                        replicas: 4,
                        horizon_seconds: 30.0,
                        observed_at: NOW - 60.0,
                    }),
                    ..input(Sizing::Predictive, not_due)
                },
                desired: 0,
                capped: false,
            },
            Case {
                name: "the cluster's room caps the pool",
                input: Input {
                    warm: 1,
                    room: Some(1),
                    ..input(Sizing::Predictive, burst3)
                },
                desired: 2,
                capped: true,
            },
            Case {
                name: "real pods waiting for room shrink the pool below minReady",
                input: Input {
                    min_ready: 1,
                    warm: 1,
                    room: Some(-1),
                    ..input(Sizing::Fixed, none)
                },
                desired: 0,
                capped: true,
            },
            Case {
                name: "room to spare changes nothing",
                input: Input {
                    warm: 0,
                    room: Some(100),
                    ..input(Sizing::Predictive, burst3)
                },
                desired: 3,
                capped: false,
            },
        ];
        for c in cases {
            let d = size(&c.input);
            assert_eq!((d.desired, d.capped), (c.desired, c.capped), "{}", c.name);
        }
    }

    #[test]
    fn arrivals_group_within_the_load_time() {
        let e = ups(&[(100.0, 1), (90.0, 1), (85.0, 1), (50.0, 2), (45.0, 1)]);
        let a = arrivals(&e, NOW, 20.0);
        assert_eq!(
            a.iter().map(|a| (NOW - a.at, a.pods)).collect::<Vec<_>>(),
            vec![(100.0, 3), (50.0, 3)]
        );
        assert_eq!(arrivals(&e, NOW, 1.0).len(), 5);
        assert_eq!(
            arrivals(&e, NOW - 60.0, 20.0).len(),
            1,
            "the future is ignored"
        );
        assert!(arrivals(&[], NOW, 20.0).is_empty());
    }

    #[test]
    fn nearest_other_gap() {
        let sorted = [10.0, 12.0, 15.0, 15.0, 40.0];
        let rows = [
            (0, 1, 2.0),
            (0, 2, 5.0),
            (0, 4, 30.0),
            (2, 1, 0.0),
            (2, 2, 3.0),
            (2, 3, 5.0),
            (2, 4, 25.0),
            (4, 1, 25.0),
            (4, 4, 30.0),
        ];
        for (i, k, want) in rows {
            assert_eq!(nearest(&sorted, i, k), want, "element {i}, k {k}");
        }
    }

    #[test]
    fn prune_keeps_a_day_and_the_newest() {
        let e = ups(&[(HISTORY + 1.0, 1), (10.0, 1), (20.0, 1), (30.0, 1)]);
        let kept = prune(e, NOW, 2);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].at, NOW - 20.0);
        assert_eq!(kept[1].at, NOW - 10.0);
    }
}
