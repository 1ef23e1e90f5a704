//! What the controller does on one look at the cluster: which warm pods to hand off, which
//! handed-off pods to let serve, how many warm pods to create and which to delete. Pure.

use crate::pod::{PodView, PoolState, Target};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Warm pods to hand to the revision now, best first.
    pub handoff: Vec<PodView>,
    /// Handed-off pods whose served gate is still closed: verify their sidecar, then open it.
    pub open_gate: Vec<PodView>,
    /// Warm pods to delete: built from another revision or template, surplus, or failed.
    pub delete: Vec<String>,
    /// Warm pods to create.
    pub create: i32,
    /// Revision pods the revision is still waiting for that no warm pod could replace.
    pub unmet: i32,
    /// Warm pods that are loaded and stay in the pool after this plan.
    pub ready_after: i32,
    /// Warm pods (loaded or loading) in the pool after this plan.
    pub warm_after: i32,
}

/// A cold pod this far into its expected load time is about to serve: handing a warm pod
/// off in its place would gain little and cost a refill.
pub const ABOUT_TO_SERVE: f64 = 0.75;

/// `pool_pods`: every pod with the pool's label (warm and handed-off). `revision_pods`:
/// every pod that carries the target revision's `revisionUID`. `desired_warm`: what the
/// sizing policy chose. `now` (Unix seconds) and `load_seconds` (the model's load time)
/// tell which cold pods are about to serve anyway.
pub fn plan(
    target: Option<&Target>,
    pool_pods: &[PodView],
    revision_pods: &[PodView],
    desired_warm: i32,
    now: f64,
    load_seconds: f64,
) -> Plan {
    let mut plan = Plan::default();
    let Some(target) = target else {
        // No ready revision: nothing to warm.
        plan.delete = pool_pods
            .iter()
            .filter(|p| p.state == PoolState::Warm && !p.terminating)
            .map(|p| p.name.clone())
            .collect();
        return plan;
    };
    let current = |p: &&PodView| p.template_hash.as_deref() == Some(target.template_hash.as_str());

    // Pods of the revision's current ReplicaSet that serve or will serve at once: Ready, or
    // handed off with the model loaded (their gate opens in this pass).
    let serving = revision_pods
        .iter()
        .filter(current)
        .filter(|p| {
            let about_to_serve = p.state == PoolState::None
                && p.created_at
                    .is_some_and(|c| now - c >= ABOUT_TO_SERVE * load_seconds);
            !p.terminating
                && (p.ready || about_to_serve || (p.state == PoolState::HandedOff && p.loaded))
        })
        .count() as i32;
    let missing = (target.replicas - serving).max(0);

    let mut warm: Vec<&PodView> = Vec::new();
    for p in pool_pods.iter().filter(|p| p.state == PoolState::Warm) {
        if p.terminating {
            continue;
        }
        if current(&p) {
            warm.push(p);
        } else {
            plan.delete.push(p.name.clone());
        }
    }
    // Loaded pods first, the longest-loaded first (stable by name).
    warm.sort_by(|a, b| {
        b.loaded
            .cmp(&a.loaded)
            .then_with(|| a.created.cmp(&b.created))
            .then_with(|| a.name.cmp(&b.name))
    });
    let loaded = warm.iter().filter(|p| p.loaded).count() as i32;
    let k = missing.min(loaded);
    plan.handoff = warm.iter().take(k as usize).map(|p| (*p).clone()).collect();
    plan.unmet = missing - k;
    let mut remaining: Vec<&PodView> = warm.into_iter().skip(k as usize).collect();

    plan.open_gate = pool_pods
        .iter()
        .chain(revision_pods)
        .filter(|p| p.state == PoolState::HandedOff && p.has_gate && !p.gate_open && !p.terminating)
        .filter(current)
        .fold(Vec::<PodView>::new(), |mut acc, p| {
            if !acc.iter().any(|q| q.uid == p.uid) {
                acc.push(p.clone());
            }
            acc
        });

    let desired = desired_warm.max(0);
    let have = remaining.len() as i32;
    if have > desired {
        // Surplus: drop the ones still loading first, the newest first.
        remaining.sort_by(|a, b| {
            a.loaded
                .cmp(&b.loaded)
                .then_with(|| b.created.cmp(&a.created))
                .then_with(|| b.name.cmp(&a.name))
        });
        let surplus = (have - desired) as usize;
        plan.delete
            .extend(remaining.drain(..surplus).map(|p| p.name.clone()));
    } else {
        plan.create = desired - have;
    }
    plan.warm_after = remaining.len() as i32;
    plan.ready_after = remaining.iter().filter(|p| p.loaded).count() as i32;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: f64 = 1_000_000.0;

    fn target(replicas: i32) -> Target {
        Target {
            revision: "m-00001".into(),
            revision_uid: "uid".into(),
            replica_set: "m-00001-deployment-h1".into(),
            replica_set_uid: "rs-uid".into(),
            template_hash: "h1".into(),
            replicas,
        }
    }

    /// A pod from a compact description: `w` warm, `h` handed off, `c` a cold revision pod;
    /// then flags: `L` loaded, `R` ready, `G` gate open, `T` terminating, `o` old template,
    /// `A` created 18 s ago (most of the 20 s load time).
    fn pod(name: &str, spec: &str) -> PodView {
        let kind = &spec[..1];
        let flags = &spec[1..];
        PodView {
            name: name.into(),
            uid: format!("uid-{name}"),
            resource_version: "1".into(),
            state: match kind {
                "w" => PoolState::Warm,
                "h" => PoolState::HandedOff,
                _ => PoolState::None,
            },
            template_hash: Some(if flags.contains('o') { "h0" } else { "h1" }.into()),
            loaded: flags.contains('L'),
            ready: flags.contains('R'),
            gate_open: kind == "c" || flags.contains('G'),
            terminating: flags.contains('T'),
            has_gate: kind != "c",
            created: format!("2026-01-01T00:00:{name}Z"),
            created_at: Some(if flags.contains('A') {
                NOW - 18.0
            } else {
                NOW - 1.0
            }),
            handoff_time: None,
        }
    }

    fn names(pods: &[PodView]) -> Vec<&str> {
        pods.iter().map(|p| p.name.as_str()).collect()
    }

    struct Case {
        name: &'static str,
        replicas: i32,
        pool: Vec<PodView>,
        revision: Vec<PodView>,
        desired: i32,
        handoff: Vec<&'static str>,
        open_gate: Vec<&'static str>,
        delete: Vec<&'static str>,
        create: i32,
        unmet: i32,
    }

    #[test]
    fn plans() {
        let cases = [
            Case {
                name: "steady pool at zero replicas: nothing to do",
                replicas: 0,
                pool: vec![pod("01", "wL")],
                revision: vec![],
                desired: 1,
                handoff: vec![],
                open_gate: vec![],
                delete: vec![],
                create: 0,
                unmet: 0,
            },
            Case {
                name: "empty pool fills to the desired size",
                replicas: 0,
                pool: vec![],
                revision: vec![],
                desired: 2,
                handoff: vec![],
                open_gate: vec![],
                delete: vec![],
                create: 2,
                unmet: 0,
            },
            Case {
                name: "0→1: the loaded warm pod is handed off and replaced",
                replicas: 1,
                pool: vec![pod("01", "wL")],
                revision: vec![pod("02", "c")],
                desired: 1,
                handoff: vec!["01"],
                open_gate: vec![],
                delete: vec![],
                create: 1,
                unmet: 0,
            },
            Case {
                name: "a loading warm pod is not handed off: a miss",
                replicas: 1,
                pool: vec![pod("01", "w")],
                revision: vec![pod("02", "c")],
                desired: 1,
                handoff: vec![],
                open_gate: vec![],
                delete: vec![],
                create: 0,
                unmet: 1,
            },
            Case {
                name: "1→4 with a pool of 2: two handed off, two cold, pool refills",
                replicas: 4,
                pool: vec![pod("01", "wL"), pod("02", "wL")],
                revision: vec![
                    pod("03", "cLR"),
                    pod("04", "c"),
                    pod("05", "c"),
                    pod("06", "c"),
                ],
                desired: 2,
                handoff: vec!["01", "02"],
                open_gate: vec![],
                delete: vec![],
                create: 2,
                unmet: 1,
            },
            Case {
                name: "after a handoff (restart included) the handed-off pod counts: no second handoff",
                replicas: 1,
                pool: vec![pod("01", "hL"), pod("03", "wL")],
                revision: vec![pod("01", "hL"), pod("02", "c")],
                desired: 1,
                handoff: vec![],
                open_gate: vec!["01"],
                delete: vec![],
                create: 0,
                unmet: 0,
            },
            Case {
                name: "a handed-off pod that is already serving needs nothing",
                replicas: 1,
                pool: vec![pod("01", "hLRG")],
                revision: vec![pod("01", "hLRG")],
                desired: 0,
                handoff: vec![],
                open_gate: vec![],
                delete: vec![],
                create: 0,
                unmet: 0,
            },
            Case {
                name: "pods of an old template go, new ones come",
                replicas: 0,
                pool: vec![pod("01", "wLo"), pod("02", "wL")],
                revision: vec![],
                desired: 2,
                handoff: vec![],
                open_gate: vec![],
                delete: vec!["01"],
                create: 1,
                unmet: 0,
            },
            Case {
                name: "an old-template warm pod is never handed off",
                replicas: 1,
                pool: vec![pod("01", "wLo")],
                revision: vec![],
                desired: 1,
                handoff: vec![],
                open_gate: vec![],
                delete: vec!["01"],
                create: 1,
                unmet: 1,
            },
            Case {
                name: "shrinking drops loading pods first, then the newest",
                replicas: 0,
                pool: vec![pod("01", "wL"), pod("02", "wL"), pod("03", "w")],
                revision: vec![],
                desired: 1,
                handoff: vec![],
                open_gate: vec![],
                delete: vec!["03", "02"],
                create: 0,
                unmet: 0,
            },
            Case {
                name: "terminating warm pods neither count nor get handed off",
                replicas: 1,
                pool: vec![pod("01", "wLT")],
                revision: vec![],
                desired: 1,
                handoff: vec![],
                open_gate: vec![],
                delete: vec![],
                create: 1,
                unmet: 1,
            },
            Case {
                name: "the oldest loaded pods are handed off first",
                replicas: 1,
                pool: vec![pod("03", "wL"), pod("01", "w"), pod("02", "wL")],
                revision: vec![],
                desired: 2,
                handoff: vec!["02"],
                open_gate: vec![],
                delete: vec![],
                create: 0,
                unmet: 0,
            },
            Case {
                name: "a cold pod about to finish loading is not replaced",
                replicas: 4,
                pool: vec![pod("01", "wL")],
                revision: vec![
                    pod("02", "hLRG"),
                    pod("03", "hLRG"),
                    pod("04", "cLR"),
                    pod("05", "cA"),
                ],
                desired: 1,
                handoff: vec![],
                open_gate: vec![],
                delete: vec![],
                create: 0,
                unmet: 0,
            },
            Case {
                name: "a Ready cold pod already serves: no handoff",
                replicas: 1,
                pool: vec![pod("01", "wL")],
                revision: vec![pod("02", "cLR")],
                desired: 1,
                handoff: vec![],
                open_gate: vec![],
                delete: vec![],
                create: 0,
                unmet: 0,
            },
        ];
        for c in cases {
            let t = target(c.replicas);
            let p = plan(Some(&t), &c.pool, &c.revision, c.desired, NOW, 20.0);
            assert_eq!(names(&p.handoff), c.handoff, "{}: handoff", c.name);
            assert_eq!(names(&p.open_gate), c.open_gate, "{}: open gate", c.name);
            assert_eq!(p.delete, c.delete, "{}: delete", c.name);
            assert_eq!(p.create, c.create, "{}: create", c.name);
            assert_eq!(p.unmet, c.unmet, "{}: unmet", c.name);
        }
    }

    #[test]
    fn without_a_ready_revision_every_warm_pod_goes_and_handed_off_ones_stay() {
        let pool = [pod("01", "wL"), pod("02", "hLRG"), pod("03", "wT")];
        let p = plan(None, &pool, &[], 3, NOW, 20.0);
        assert_eq!(p.delete, vec!["01"]);
        assert_eq!(p.create, 0);
    }
}
