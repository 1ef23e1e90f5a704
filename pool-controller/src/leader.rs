//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas never act at
//! once. A replica acts only while it holds the lease; it renews the lease every
//! `duration / 3`, and stops acting (the whole process shuts down) when it cannot renew
//! before the lease would expire, so another replica may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct Elector {
    pub leases: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

/// Whether `identity` may take `lease` at `now` (Unix seconds): it is free, ours, or expired.
pub fn may_take(lease: &LeaseSpec, identity: &str, now: f64) -> bool {
    let holder = lease.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let renewed = lease
        .renew_time
        .as_ref()
        .map(|t| t.0.as_millisecond() as f64 / 1000.0)
        .unwrap_or(0.0);
    let duration = lease.lease_duration_seconds.unwrap_or(15) as f64;
    now > renewed + duration
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

impl Elector {
    fn spec(&self, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: acquired.or_else(|| Some(MicroTime(now()))),
            renew_time: Some(MicroTime(now())),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the lease; true when this replica holds it afterwards.
    pub async fn try_acquire(&self) -> kube::Result<bool> {
        let Some(lease) = self.leases.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let t = now().as_millisecond() as f64 / 1000.0;
        if !may_take(&spec, &self.identity, t) {
            return Ok(false);
        }
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let mut next = lease.clone();
        next.spec = Some(self.spec(if ours { spec.acquire_time } else { None }));
        if !ours {
            let transitions = spec.lease_transitions.unwrap_or(0) + 1;
            next.spec.as_mut().unwrap().lease_transitions = Some(transitions);
        } else {
            next.spec.as_mut().unwrap().lease_transitions = spec.lease_transitions;
        }
        // replace carries the resourceVersion we read: two replicas racing cannot both win.
        match self
            .leases
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease (or `stop` fires: returns false).
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        let mut logged = false;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return true;
                }
                Ok(false) if !logged => {
                    tracing::info!(lease = %self.name, "another replica leads; waiting");
                    logged = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(self.duration / 5) => {}
            }
        }
    }

    /// Renews until `stop` fires (then releases the lease) or renewal fails for a whole lease
    /// duration (then cancels `lost`).
    pub async fn hold(&self, stop: CancellationToken, lost: CancellationToken) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.release().await;
                    return;
                }
                _ = tokio::time::sleep(self.duration / 3) => {}
            }
            match self.try_acquire().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "lost the lease to another replica");
                    lost.cancel();
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the lease"),
            }
            if last_renewed.elapsed() >= self.duration {
                tracing::error!(lease = %self.name, "could not renew the lease in time");
                lost.cancel();
                return;
            }
        }
    }

    /// Gives the lease up so another replica need not wait for it to expire.
    pub async fn release(&self) {
        let patch = serde_json::json!({"spec": {"holderIdentity": null, "renewTime": null}});
        if let Ok(Some(lease)) = self.leases.get_opt(&self.name).await
            && lease.spec.and_then(|s| s.holder_identity).as_deref() == Some(self.identity.as_str())
        {
            let _ = self
                .leases
                .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            tracing::info!(lease = %self.name, "released the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: Some(MicroTime(jiff::Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn who_may_take_the_lease() {
        assert!(may_take(&lease(None, 100, 15), "a", 101.0), "free");
        assert!(may_take(&lease(Some("a"), 100, 15), "a", 101.0), "ours");
        assert!(
            !may_take(&lease(Some("b"), 100, 15), "a", 110.0),
            "b holds it"
        );
        assert!(
            may_take(&lease(Some("b"), 100, 15), "a", 116.0),
            "b let it expire"
        );
    }
}
