//! Wiring: the runtime (admin server, kube client, signals), the watches, the source, the
//! websocket sender and the forecast publisher around the per-second [`Engine`] round.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kinfer_core::Runtime;
use kinfer_core::kpa::{SenderEvent, StatSender};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::args::{Args, SourceKind};
use crate::discovery::{Discovery, DrivenRevision};
use crate::engine::Engine;
use crate::http::HttpClient;
use crate::metrics::Metrics;
use crate::prom::PromSource;
use crate::publish::{self, Forecasts};
use crate::scrape::ScrapeSource;
use crate::signals::{self, PodKey, PodSignals, SignalValues};

enum Source {
    Prometheus(PromSource),
    Scrape(ScrapeSource),
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::Prometheus(_) => "prometheus",
            Source::Scrape(_) => "scrape",
        }
    }

    async fn collect(
        &self,
        revisions: &[DrivenRevision],
        metrics: &Metrics,
    ) -> HashMap<PodKey, PodSignals> {
        let name = self.name();
        let mut values = SignalValues::new();
        match self {
            Source::Prometheus(p) => {
                for (signal, r) in p.collect().await {
                    match r {
                        Ok(v) => {
                            if v.skipped > 0 {
                                tracing::debug!(
                                    signal = signal.name(),
                                    skipped = v.skipped,
                                    "series without namespace/pod or a number"
                                );
                            }
                            values.insert(signal, v.values);
                        }
                        Err(e) => {
                            metrics
                                .source_errors
                                .with_label_values(&[name, signal.name(), e.reason()])
                                .inc();
                            tracing::warn!(signal = signal.name(), error = %e, "Prometheus query failed");
                        }
                    }
                }
            }
            Source::Scrape(s) => {
                let pods = revisions
                    .iter()
                    .flat_map(|r| r.pods.iter())
                    .filter_map(|(k, ip)| ip.clone().map(|ip| (k.clone(), ip)))
                    .collect();
                let round = s.collect(pods).await;
                for (pod, e) in &round.failed {
                    tracing::debug!(%pod, error = %e, "scrape failed");
                }
                if !round.failed.is_empty() {
                    metrics
                        .source_errors
                        .with_label_values(&[name, "all", "scrape"])
                        .inc_by(round.failed.len() as u64);
                }
                values = round.values;
            }
        }
        for (signal, per_pod) in &values {
            metrics
                .signals_read
                .with_label_values(&[name, signal.name()])
                .inc_by(per_pod.len() as u64);
        }
        signals::by_pod(&values)
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runtime = Runtime::start("autoscaler-plugin", &args.common, &args.client).await?;
    let metrics = Metrics::register(&runtime.admin.registry)?;
    let stop = runtime.shutdown.token();

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let sender = StatSender::spawn(args.autoscaler_url.clone(), stop.clone(), Some(events_tx));
    {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                match e {
                    SenderEvent::Connected => {
                        metrics.connects.inc();
                        metrics.connected.set(1);
                    }
                    SenderEvent::Sent { messages } => {
                        metrics.frames_sent.inc();
                        metrics.stats_sent.inc_by(messages as u64);
                    }
                    SenderEvent::Failed(_) => {
                        metrics.send_failures.inc();
                        metrics.connected.set(0);
                    }
                }
            }
        });
    }

    let discovery = Discovery::start(
        runtime.client.clone(),
        args.namespace.as_deref(),
        args.knative_namespace.clone(),
        stop.clone(),
    );
    let gate = runtime.admin.readiness.gate("watches");
    tokio::select! {
        _ = stop.cancelled() => return runtime.wait_for_shutdown().await,
        r = discovery.synced() => r?,
    }
    gate.open();

    let http = HttpClient::new(args.source_timeout);
    let source = match args.source {
        SourceKind::Prometheus => Source::Prometheus(PromSource {
            base_url: args.prometheus_url.clone(),
            queries: args.queries(),
            http,
        }),
        SourceKind::Scrape => Source::Scrape(ScrapeSource::new(
            args.scrape_port,
            args.scrape_path.clone(),
            http,
            args.scrape_parallel,
        )),
    };
    tracing::info!(source = source.name(), url = %args.autoscaler_url, reporters = ?args.knative_reporters, "driving opted-in revisions");

    let (forecast_tx, forecast_rx) = watch::channel(Forecasts::new());
    tokio::spawn(publish::run(
        runtime.client.clone(),
        forecast_rx,
        args.forecast_horizon,
        source.name().to_string(),
        metrics.clone(),
        stop.clone(),
    ));

    let mut engine = Engine::new(
        args.knative_reporters,
        args.hold,
        args.interval,
        args.forecast_horizon,
        metrics.clone(),
    );
    let mut problems_seen = BTreeMap::new();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let (revisions, problems) = discovery.snapshot();
        if problems != problems_seen {
            for (rev, why) in &problems {
                if problems_seen.get(rev) != Some(why) {
                    tracing::warn!(revision = %rev, problem = %why, "opted in but not driven");
                }
            }
            problems_seen = problems;
        }
        let signals = if revisions.is_empty() {
            HashMap::new()
        } else {
            // Never let a slow source hold up the round: what misses the deadline is absent,
            // and the engine holds those revisions' last reports.
            match tokio::time::timeout(
                args.source_timeout + Duration::from_millis(50),
                source.collect(&revisions, &metrics),
            )
            .await
            {
                Ok(s) => s,
                Err(_) => {
                    metrics
                        .source_errors
                        .with_label_values(&[source.name(), "all", "timeout"])
                        .inc();
                    tracing::warn!(timeout = ?args.source_timeout, "collection timed out");
                    HashMap::new()
                }
            }
        };
        metrics
            .last_collect_seconds
            .set(started.elapsed().as_secs_f64());
        let (frame, forecasts) = engine.round(&revisions, &signals, Instant::now());
        if !frame.messages.is_empty() && !sender.send(frame) {
            break;
        }
        forecast_tx.send_replace(forecasts);
        metrics
            .loop_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    runtime.wait_for_shutdown().await
}
