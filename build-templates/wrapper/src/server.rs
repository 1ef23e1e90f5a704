//! Wires flags, workers and the HTTP server together, and runs until SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::args::{Args, Command};
use crate::http::{self, App};
use crate::metrics::Metrics;
use crate::pool::{self, PoolConfig, WORKER_SOURCE, WorkerScript};

fn init_tracing(args: &Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log)
        .map_err(|e| anyhow::anyhow!("invalid log filter {:?}: {e}", args.log))?;
    let registry = tracing_subscriber::registry().with(filter);
    if args.log_json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()?;
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()?;
    }
    Ok(())
}

/// Writes the embedded worker script into a private temporary directory. Falls back to
/// `python3 -c` when no temporary directory is writable (read-only root filesystems).
fn write_worker_script() -> (WorkerScript, Option<PathBuf>) {
    let dir = std::env::temp_dir().join(format!("kinfer-wrapper-{}", std::process::id()));
    let path = dir.join("kinfer_worker.py");
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, WORKER_SOURCE)) {
        Ok(()) => (WorkerScript::File(path), Some(dir)),
        Err(e) => {
            tracing::info!(dir = %dir.display(), error = %e, "cannot write the worker script; passing it inline");
            (WorkerScript::Inline, None)
        }
    }
}

/// Copies the running executable into `dir` (mode 0755), via a temporary name so a
/// half-written file is never executed.
pub fn install(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().context("finding this executable")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join("kinfer-wrapper");
    let tmp = dir.join(".kinfer-wrapper.tmp");
    std::fs::copy(&exe, &tmp)
        .with_context(|| format!("copying {} to {}", exe.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &target)?;
    Ok(target)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Install { dir }) = &args.command {
        let target = install(dir)?;
        println!("installed {}", target.display());
        return Ok(());
    }
    init_tracing(&args)?;
    let handler = args.handler().clone();
    let metrics = Metrics::new()?;
    let (script, script_dir) = write_worker_script();
    let model = args.model_name();
    let (pool, pool_handle, mut fatal) = pool::start(
        PoolConfig {
            python: args.python.clone(),
            script,
            module: handler.module.clone(),
            function: handler.function.clone(),
            workers: args.workers as usize,
            max_batch_size: args.max_batch_size as usize,
            max_batch_delay: args.max_batch_delay,
        },
        metrics.clone(),
    );
    let app = Arc::new(App {
        model: model.clone(),
        version: args.model_version.clone(),
        pool,
        metrics,
        max_body: args.max_body_bytes,
        draining: Default::default(),
    });

    // Serve (liveness answers) while the workers load; readiness waits for them.
    let addr = std::net::SocketAddr::new(args.address, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        model,
        handler = format!("{}:{}", handler.module, handler.function),
        workers = args.workers,
        max_batch_size = args.max_batch_size,
        max_batch_delay = ?args.max_batch_delay,
        "serving /v2 and /v1"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        warp::serve(http::routes(app.clone()))
            .incoming(listener)
            .graceful(async {
                let _ = stop_rx.await;
            })
            .run(),
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let outcome = tokio::select! {
        Some(msg) = fatal.recv() => Err(anyhow::anyhow!(msg)),
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    if outcome.is_ok() {
        tracing::info!("shutting down: no new connections, finishing requests in flight");
        app.draining.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(());
        tokio::select! {
            r = tokio::time::timeout(args.drain_timeout, server) => {
                if r.is_err() {
                    tracing::warn!(timeout = ?args.drain_timeout, "requests still in flight after the drain timeout");
                }
            }
            _ = term.recv() => tracing::warn!("second SIGTERM: exiting now"),
            _ = int.recv() => tracing::warn!("second SIGINT: exiting now"),
        }
        pool_handle
            .shutdown(std::time::Duration::from_secs(10))
            .await;
        tracing::info!("stopped");
    }
    if let Some(dir) = script_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    outcome
}
