//! Wiring: the runtime (admin server, kube client, signals), the watches, the source, the
//! websocket sender and the forecast publisher around the [`Engine`] rounds: collected every
//! `--collect-interval`, reported once a second as [`pacing`] says.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kinfer_core::Runtime;
use kinfer_core::kpa::{SenderEvent, StatSender};
use tokio::sync::{mpsc, watch};

use crate::args::{Args, SourceKind};
use crate::discovery::{Discovery, DrivenRevision};
use crate::engine::{Engine, Round};
use crate::http::HttpClient;
use crate::metrics::Metrics;
use crate::pacing::{self, Pacer};
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
        args.forecast_horizon,
        metrics.clone(),
    );
    let mut problems_seen = BTreeMap::new();
    let mut pacer = Pacer::default();
    // The freshest round, reported at the next send time.
    let mut latest: Option<Round> = None;
    let mut next_collect = tokio::time::Instant::now();
    loop {
        let send = pacing::until_send(unix_now());
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next_collect) => {
                let started = Instant::now();
                let round = collect_round(&args, &discovery, &source, &mut engine, &mut problems_seen, &metrics).await;
                let took = started.elapsed();
                metrics.loop_seconds.observe(took.as_secs_f64());
                next_collect = tokio::time::Instant::from_std(started + args.collect_interval.max(took * 2));
                latest = Some(round);
            }
            _ = tokio::time::sleep(send) => {
                let now = unix_now();
                if let Some(round) = &latest
                    && pacer.free(now)
                {
                    pacer.sent(now);
                    forecast_tx.send_replace(engine.forecast(&round.demand));
                    if !round.frame.messages.is_empty() && !sender.send(round.frame.clone()) {
                        break;
                    }
                }
            }
        }
    }
    runtime.wait_for_shutdown().await
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One collection: the driven revisions, their pods' signals, the engine's decisions.
async fn collect_round(
    args: &Args,
    discovery: &Discovery,
    source: &Source,
    engine: &mut Engine,
    problems_seen: &mut BTreeMap<String, String>,
    metrics: &Metrics,
) -> Round {
    let started = Instant::now();
    let (revisions, problems) = discovery.snapshot();
    if problems != *problems_seen {
        for (rev, why) in &problems {
            if problems_seen.get(rev) != Some(why) {
                tracing::warn!(revision = %rev, problem = %why, "opted in but not driven");
            }
        }
        *problems_seen = problems;
    }
    let signals = if revisions.is_empty() {
        HashMap::new()
    } else {
        // Never let a slow source hold up the round: what misses the deadline is absent,
        // and the engine holds those revisions' last reports.
        match tokio::time::timeout(
            args.source_timeout + Duration::from_millis(50),
            source.collect(&revisions, metrics),
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
    engine.round(&revisions, &signals, Instant::now())
}
