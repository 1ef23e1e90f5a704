//! The demand forecast: per Knative Configuration, the pods its revisions are expected to
//! need `horizon` from now, by Holt's linear smoothing (level and trend) of the pod count the
//! policy wants each second. Pure: the caller feeds one sample per interval.
//!
//! Published on `WarmPool.status.demandForecast` (server-side apply, field manager
//! `kinfer-autoscaler-plugin`) and as the gauge
//! `kinfer_autoscaler_plugin_forecast_replicas{namespace,configuration}`.

/// Holt's double exponential smoothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    state: Option<(f64, f64)>,
}

impl Holt {
    /// `alpha` weighs new samples into the level, `beta` new slopes into the trend (0..=1).
    pub fn new(alpha: f64, beta: f64) -> Self {
        Self {
            alpha: alpha.clamp(0.0, 1.0),
            beta: beta.clamp(0.0, 1.0),
            state: None,
        }
    }

    pub fn update(&mut self, sample: f64) {
        let sample = if sample.is_finite() {
            sample.max(0.0)
        } else {
            0.0
        };
        self.state = Some(match self.state {
            None => (sample, 0.0),
            Some((level, trend)) => {
                let new_level = self.alpha * sample + (1.0 - self.alpha) * (level + trend);
                let new_trend = self.beta * (new_level - level) + (1.0 - self.beta) * trend;
                (new_level, new_trend)
            }
        });
    }

    /// The value expected `steps` samples ahead (never negative).
    pub fn forecast(&self, steps: f64) -> f64 {
        match self.state {
            None => 0.0,
            Some((level, trend)) => (level + trend * steps).max(0.0),
        }
    }

    /// Whole pods expected `steps` samples ahead, rounded up as the KPA rounds.
    pub fn forecast_replicas(&self, steps: f64) -> i32 {
        let f = self.forecast(steps);
        (f - 1e-6).ceil().clamp(0.0, f64::from(i32::MAX)) as i32
    }
}

impl Default for Holt {
    fn default() -> Self {
        Self::new(0.5, 0.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_demand_forecasts_itself() {
        let mut h = Holt::default();
        for _ in 0..30 {
            h.update(3.0);
        }
        assert_eq!(h.forecast_replicas(60.0), 3);
    }

    #[test]
    fn a_ramp_is_extrapolated() {
        // +0.1 pod per second: in 60 s about 6 more pods than now.
        let mut h = Holt::default();
        for i in 0..120 {
            h.update(1.0 + 0.1 * f64::from(i));
        }
        let now = 1.0 + 0.1 * 119.0;
        let f = h.forecast(60.0);
        assert!((f - (now + 6.0)).abs() < 0.5, "forecast {f}, now {now}");
        assert!(h.forecast_replicas(60.0) >= 18);
    }

    #[test]
    fn falling_demand_never_goes_negative() {
        let mut h = Holt::default();
        for i in 0..20 {
            h.update(10.0 - f64::from(i));
        }
        for _ in 0..5 {
            h.update(0.0);
        }
        assert_eq!(h.forecast_replicas(60.0), 0);
        assert!(h.forecast(600.0) >= 0.0);
    }

    #[test]
    fn a_step_is_followed_quickly() {
        let mut h = Holt::default();
        for _ in 0..10 {
            h.update(0.0);
        }
        for _ in 0..5 {
            h.update(5.0);
        }
        assert!(h.forecast_replicas(0.0) >= 4, "{h:?}");
        assert_eq!(Holt::default().forecast_replicas(60.0), 0);
        let mut bad = Holt::default();
        bad.update(f64::NAN);
        assert_eq!(bad.forecast(1.0), 0.0);
    }
}
