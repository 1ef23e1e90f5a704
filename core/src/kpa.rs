//! Knative's autoscaler (KPA) stat websocket: the protobuf messages of Knative's
//! `pkg/autoscaler/metrics/stat.proto` and a sender that keeps one connection open.
//!
//! The autoscaler adds up everything reported for a revision within a second, so a sender
//! reports the revision-wide total once per second with `timestamp` 0 (the autoscaler then
//! stamps it with its own clock).

use std::time::Duration;

use futures::SinkExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

/// `metrics.Stat`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stat {
    #[prost(string, tag = "1")]
    pub pod_name: String,
    #[prost(double, tag = "2")]
    pub average_concurrent_requests: f64,
    #[prost(double, tag = "3")]
    pub average_proxied_concurrent_requests: f64,
    #[prost(double, tag = "4")]
    pub request_count: f64,
    #[prost(double, tag = "5")]
    pub proxied_request_count: f64,
    #[prost(double, tag = "6")]
    pub process_uptime: f64,
    /// Unix seconds; 0 lets the autoscaler use its receive time.
    #[prost(int64, tag = "7")]
    pub timestamp: i64,
}

/// `metrics.WireStatMessage`: `name` is the revision name (also the PodAutoscaler's).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessage {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub stat: Option<Stat>,
}

/// `metrics.WireStatMessages`: one binary websocket frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessages {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<WireStatMessage>,
}

impl WireStatMessage {
    /// A revision-wide concurrency report.
    pub fn concurrency(namespace: &str, revision: &str, reporter: &str, concurrency: f64) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: revision.to_string(),
            stat: Some(Stat {
                pod_name: reporter.to_string(),
                average_concurrent_requests: concurrency,
                ..Default::default()
            }),
        }
    }
}

/// The in-cluster address of Knative's autoscaler stat server.
pub const DEFAULT_AUTOSCALER_URL: &str = "ws://autoscaler.knative-serving.svc.cluster.local:8080";

/// Sends frames to the autoscaler from a background task that reconnects with backoff.
/// `send` never blocks: when the socket is slow or down, the oldest unsent frame is dropped,
/// because a stale load report is worth less than a fresh one.
#[derive(Clone)]
pub struct StatSender {
    tx: mpsc::Sender<WireStatMessages>,
}

/// What the sender's task reports, for metrics and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum SenderEvent {
    Connected,
    Sent { messages: usize },
    Failed(String),
}

impl StatSender {
    /// Starts the sender task. It ends when `stop` is cancelled.
    pub fn spawn(
        url: String,
        stop: CancellationToken,
        events: Option<mpsc::UnboundedSender<SenderEvent>>,
    ) -> Self {
        // Two seconds of frames at one per second: enough to ride out a reconnect.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(run_sender(url, rx, stop, events));
        Self { tx }
    }

    /// Queues a frame; returns false if it displaced nothing but could not be queued
    /// because the task has stopped.
    pub fn send(&self, frame: WireStatMessages) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                tracing::warn!(
                    messages = frame.messages.len(),
                    "autoscaler socket is behind; dropping this report"
                );
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

async fn run_sender(
    url: String,
    mut rx: mpsc::Receiver<WireStatMessages>,
    stop: CancellationToken,
    events: Option<mpsc::UnboundedSender<SenderEvent>>,
) {
    let report = |e: SenderEvent| {
        if let Some(events) = &events {
            let _ = events.send(e);
        }
    };
    let mut backoff = Duration::from_millis(100);
    'connect: loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio_tungstenite::connect_async(url.as_str()) => c,
        };
        let mut socket = match connected {
            Ok((socket, _)) => {
                tracing::info!(%url, "connected to the Knative autoscaler");
                report(SenderEvent::Connected);
                backoff = Duration::from_millis(100);
                socket
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, retry_in = ?backoff, "cannot reach the Knative autoscaler");
                report(SenderEvent::Failed(e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = socket.close(None).await;
                    return;
                }
                frame = rx.recv() => match frame {
                    Some(frame) => frame,
                    None => return,
                },
            };
            let messages = frame.messages.len();
            let bytes = frame.encode_to_vec();
            if let Err(e) = socket
                .send(tungstenite::Message::Binary(bytes.into()))
                .await
            {
                tracing::warn!(error = %e, "sending to the Knative autoscaler failed; reconnecting");
                report(SenderEvent::Failed(e.to_string()));
                continue 'connect;
            }
            report(SenderEvent::Sent { messages });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_knatives_stat_proto() {
        let frame = WireStatMessages {
            messages: vec![WireStatMessage::concurrency("ns", "rev-1", "p", 2.5)],
        };
        // Field 1 (messages), length-delimited; inside: 1:"ns", 2:"rev-1", 3:{1:"p", 2:2.5}.
        let mut expected = vec![0x0a, 25, 0x0a, 2, b'n', b's', 0x12, 5];
        expected.extend_from_slice(b"rev-1");
        expected.extend_from_slice(&[0x1a, 12, 0x0a, 1, b'p', 0x11]);
        expected.extend_from_slice(&2.5f64.to_le_bytes());
        assert_eq!(frame.encode_to_vec(), expected);
        assert_eq!(
            WireStatMessages::decode(expected.as_slice()).unwrap(),
            frame
        );
    }
}
