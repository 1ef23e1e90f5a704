//! Stands in for Knative's activator in the local control plane, which has none: reports a
//! revision's concurrency to the KPA once a second, as the activator does when requests for a
//! scaled-to-zero revision arrive (`{concurrency: 1}` on the first request).
//!
//!   kpa-poke --url ws://10.255.255.1:8080 --namespace NS --revision REV [--concurrency 1] [--seconds 10]

use std::time::Duration;

use anyhow::Context;
use kinfer_core::kpa::{SenderEvent, StatSender, WireStatMessage, WireStatMessages};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut url, mut namespace, mut revision) = (None, None, None);
    let (mut concurrency, mut seconds) = (1.0_f64, 10_u64);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--namespace" => namespace = Some(value),
            "--revision" => revision = Some(value),
            "--concurrency" => concurrency = value.parse()?,
            "--seconds" => seconds = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let url = url.context("--url is required")?;
    let namespace = namespace.context("--namespace is required")?;
    let revision = revision.context("--revision is required")?;

    let stop = CancellationToken::new();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let sender = StatSender::spawn(url, stop.clone(), Some(events_tx));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0;
    for _ in 0..seconds {
        tick.tick().await;
        sender.send(WireStatMessages {
            messages: vec![WireStatMessage::concurrency(
                &namespace,
                &revision,
                "activator-standin",
                concurrency,
            )],
        });
        while let Ok(event) = events.try_recv() {
            if matches!(event, SenderEvent::Sent { .. }) {
                sent += 1;
            }
        }
    }
    stop.cancel();
    anyhow::ensure!(sent > 0, "no report reached the autoscaler");
    Ok(())
}
