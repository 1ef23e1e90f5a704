//! How many warm pods a pool holds. Pure: times are Unix seconds, the cluster's room is a
//! number the caller computed (see [`crate::capacity`]).
//!
//! `fixed` holds `minReady`. `predictive` holds enough warm pods to absorb the largest burst
//! of scale-ups the Configuration is likely to see before a new warm pod could load (a pool
//! pod needs the model's load time to become ready, so a burst within that window can only
//! be served from pods already warm):
//!
//! - **recent**: the largest number of pods the revision grew by within any window of one
//!   refill time over the last hour;
//! - **daily**: the same, over the hour around this time yesterday and the half hour ahead
//!   of it (diurnal load gets its pool before it arrives, the way the hybrid-histogram
//!   policy of Serverless in the Wild pre-warms ahead of a predicted arrival);
//! - **forecast**: the autoscaler plugin's forecast of replicas, less the replicas the
//!   revision already has, while the forecast is within its horizon.
//!
//! The pool is the largest of these, within `minReady..maxReady`, and never more than the
//! cluster can spare: warm pods must never make a real pod unschedulable, so when real pods
//! are pending for lack of room the pool gives its place up (it may go below `minReady`).

use kinfer_core::warmpool::Sizing;

/// How far back a burst counts as recent.
pub const RECENT: f64 = 3600.0;
const DAY: f64 = 86_400.0;
/// The part of yesterday that predicts now: from half an hour before this time to half an
/// hour after it.
const DAILY_BEHIND: f64 = 1800.0;
const DAILY_AHEAD: f64 = 1800.0;
/// Scale-ups older than this are forgotten.
pub const HISTORY: f64 = DAY + 2.0 * DAILY_AHEAD;

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
    let window = input.refill_seconds.max(1.0);
    let now = input.now;
    let recent = max_burst(input.scale_ups, now - RECENT, now, window);
    let daily = max_burst(
        input.scale_ups,
        now - DAY - DAILY_BEHIND,
        now - DAY + DAILY_AHEAD,
        window,
    );
    let forecast = input
        .forecast
        .filter(|f| now <= f.observed_at + f.horizon_seconds.max(0.0))
        .map(|f| f.replicas - input.replicas)
        .unwrap_or(0);
    recent.max(daily).max(forecast).max(0)
}

/// The most pods scaled up within any `window` seconds of `[from, to]`.
fn max_burst(events: &[ScaleUp], from: f64, to: f64, window: f64) -> i32 {
    let mut inside: Vec<&ScaleUp> = events
        .iter()
        .filter(|e| e.at >= from && e.at <= to && e.pods > 0)
        .collect();
    inside.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut best = 0;
    let mut sum = 0;
    let mut start = 0;
    for end in 0..inside.len() {
        sum += inside[end].pods;
        while inside[end].at - inside[start].at > window {
            sum -= inside[start].pods;
            start += 1;
        }
        best = best.max(sum);
    }
    best
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

    fn input<'a>(policy: Sizing, scale_ups: &'a [ScaleUp]) -> Input<'a> {
        Input {
            policy,
            min_ready: 1,
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
        let none: &'static [ScaleUp] = Box::leak(Box::new([]));
        let burst3: &'static [ScaleUp] =
            Box::leak(ups(&[(600.0, 1), (595.0, 2)]).into_boxed_slice());
        let spread: &'static [ScaleUp] =
            Box::leak(ups(&[(600.0, 1), (500.0, 1), (400.0, 1)]).into_boxed_slice());
        let old: &'static [ScaleUp] = Box::leak(ups(&[(2.0 * RECENT, 4)]).into_boxed_slice());
        let yesterday: &'static [ScaleUp] =
            Box::leak(ups(&[(DAY - 600.0, 2), (DAY - 590.0, 2)]).into_boxed_slice());
        let huge: &'static [ScaleUp] = Box::leak(ups(&[(10.0, 9)]).into_boxed_slice());
        let cases = vec![
            Case {
                name: "fixed holds minReady whatever the history",
                input: input(Sizing::Fixed, burst3),
                desired: 1,
                capped: false,
            },
            Case {
                name: "predictive without history holds minReady",
                input: input(Sizing::Predictive, none),
                desired: 1,
                capped: false,
            },
            Case {
                name: "a burst of 3 within the load time wants 3",
                input: input(Sizing::Predictive, burst3),
                desired: 3,
                capped: false,
            },
            Case {
                name: "scale-ups further apart than the load time need one at a time",
                input: input(Sizing::Predictive, spread),
                desired: 1,
                capped: false,
            },
            Case {
                name: "the same spread with a 5 min load time all overlap",
                input: Input {
                    refill_seconds: 300.0,
                    ..input(Sizing::Predictive, spread)
                },
                desired: 3,
                capped: false,
            },
            Case {
                name: "bursts older than an hour are forgotten",
                input: input(Sizing::Predictive, old),
                desired: 1,
                capped: false,
            },
            Case {
                name: "yesterday's burst, ten minutes from now, is pre-warmed",
                input: input(Sizing::Predictive, yesterday),
                desired: 4,
                capped: false,
            },
            Case {
                name: "maxReady bounds the prediction",
                input: input(Sizing::Predictive, huge),
                desired: 5,
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
                    ..input(Sizing::Predictive, none)
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
                    ..input(Sizing::Predictive, none)
                },
                desired: 1,
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
    fn max_burst_slides() {
        let e = ups(&[(100.0, 1), (90.0, 1), (85.0, 1), (50.0, 2), (45.0, 1)]);
        assert_eq!(max_burst(&e, NOW - 1000.0, NOW, 20.0), 3);
        assert_eq!(max_burst(&e, NOW - 1000.0, NOW, 60.0), 6);
        assert_eq!(max_burst(&e, NOW - 1000.0, NOW, 1.0), 2);
        assert_eq!(max_burst(&[], NOW - 1000.0, NOW, 1.0), 0);
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
