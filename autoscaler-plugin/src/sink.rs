//! The sink: one `WireStatMessages` frame per second holding one revision-wide stat per
//! driven revision, `timestamp` 0 (the autoscaler stamps it on receipt), sent through
//! kinfer-core's [`StatSender`](kinfer_core::kpa::StatSender), which reconnects with backoff and never blocks this loop.

use kinfer_core::kpa::{Stat, WireStatMessage};

use crate::policy::Report;

/// The `podName` of the plugin's stats (Knative ignores it; it shows in debug logs).
pub const REPORTER: &str = "kinfer-autoscaler-plugin";

/// One revision's stat.
pub fn message(namespace: &str, revision: &str, report: &Report) -> WireStatMessage {
    WireStatMessage {
        namespace: namespace.to_string(),
        name: revision.to_string(),
        stat: Some(Stat {
            pod_name: REPORTER.to_string(),
            average_concurrent_requests: report.concurrency,
            average_proxied_concurrent_requests: report.proxied_concurrency,
            request_count: report.request_count,
            proxied_request_count: report.proxied_request_count,
            process_uptime: 0.0,
            timestamp: 0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinfer_core::kpa::WireStatMessages;
    use prost::Message;

    /// Knative's own encoding of this frame, printed by `tests/knative/cmd/statgolden`
    /// (gogo-generated `WireStatMessages.Marshal` of knative.dev/serving v0.50.0).
    const KNATIVE_GOLDEN: &str = "0a560a067465616d2d61120c7265736e65742d30303030311a3e0a186b696e6665722d6175746f7363616c65722d706c7567696e118dd6b4ffff7f4140190000000000002840210000000000506f402900000000000059400a470a067465616d2d6212096c6c6d2d30303030321a320a186b696e6665722d6175746f7363616c65722d706c7567696e110000000000001c4031000000008020ac403880f2d6ca06";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn encoding_matches_knatives_own_bytes() {
        let first = message(
            "team-a",
            "resnet-00001",
            &Report {
                concurrency: 34.99999996500001,
                proxied_concurrency: 12.0,
                request_count: 250.5,
                proxied_request_count: 100.0,
            },
        );
        let mut second = message(
            "team-b",
            "llm-00002",
            &Report {
                concurrency: 7.0,
                ..Report::default()
            },
        );
        let stat = second.stat.as_mut().unwrap();
        stat.process_uptime = 3600.25;
        stat.timestamp = 1767225600;
        let frame = WireStatMessages {
            messages: vec![first, second],
        };
        assert_eq!(hex(&frame.encode_to_vec()), KNATIVE_GOLDEN);
        // And Knative's bytes decode to the same frame.
        let golden: Vec<u8> = (0..KNATIVE_GOLDEN.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&KNATIVE_GOLDEN[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(WireStatMessages::decode(golden.as_slice()).unwrap(), frame);
    }

    #[test]
    fn timestamp_is_left_to_the_autoscaler() {
        let m = message("n", "r", &Report::default());
        assert_eq!(m.stat.unwrap().timestamp, 0);
    }
}
