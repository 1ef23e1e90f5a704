//! When a frame goes to the Knative autoscaler. Pure: times are Unix seconds.
//!
//! The autoscaler files a stat with timestamp 0 under the wall-clock second it arrives in
//! and adds up everything a revision gets within one second (one stat per pod per second is
//! what it expects). So each revision gets exactly one report per second: two would double
//! its load, none would dilute its window averages.
//!
//! The frame goes [`SEND_AT`] into each second, with the freshest collection (the plugin
//! collects several times a second, `--collect-interval`). Early, because the KPA decides
//! every 2 s, at a moment of its own, on the window averages up to that moment: a decision
//! sees the current second only if its report is already in, and with a short panic window
//! (under a second, e.g. `window: 6s`) the current second is all the panic average has. Not
//! at the very start, so a clock difference of up to 100 ms between this process and the
//! autoscaler cannot file the frame under the previous second.

use std::time::Duration;

/// How far into each second the frame goes.
pub const SEND_AT: f64 = 0.1;

/// Remembers the second that has its frame, so a timer that wakes late never sends twice in
/// one second.
#[derive(Debug, Default)]
pub struct Pacer {
    sent_second: Option<i64>,
}

fn second(now: f64) -> i64 {
    now.floor() as i64
}

impl Pacer {
    /// True while this second has no frame yet.
    pub fn free(&self, now: f64) -> bool {
        self.sent_second != Some(second(now))
    }

    pub fn sent(&mut self, now: f64) {
        self.sent_second = Some(second(now));
    }
}

/// How long from `now` until the next send time.
pub fn until_send(now: f64) -> Duration {
    let base = now.floor() + SEND_AT;
    let next = if now < base { base } else { base + 1.0 };
    Duration::from_secs_f64(next - now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_frame_per_second_even_when_the_timer_wakes_late() {
        let mut p = Pacer::default();
        assert!(p.free(100.1));
        p.sent(100.1);
        assert!(!p.free(100.7));
        // The timer for 101.1 wakes at 101.95: still second 101, which has no frame.
        assert!(p.free(101.95));
        p.sent(101.95);
        // The next wake-up, 102.1, is a new second.
        assert!(!p.free(101.99));
        assert!(p.free(102.1));
    }

    #[test]
    fn send_times_are_a_tenth_into_the_second() {
        let cases = [
            (100.0, 0.1),
            (100.05, 0.05),
            (100.1, 1.0),
            (100.5, 0.6),
            (100.95, 0.15),
        ];
        for (now, want) in cases {
            let got = until_send(now).as_secs_f64();
            assert!((got - want).abs() < 1e-9, "{now}: {got}");
        }
    }
}
