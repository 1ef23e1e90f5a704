//! Python worker processes and the dispatcher that feeds them (dynamically batched) work.
//!
//! Each worker task owns one child process at a time. When the process is ready and idle,
//! the task offers a one-use slot to the dispatcher; the dispatcher waits for a slot, then
//! gathers queued requests into a batch and hands it over. A worker that dies fails the batch
//! it was running with `WorkerDied` and starts a fresh process; its stale slot simply fails
//! to send, and the dispatcher takes the next one.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::batch::{self, BatchKey};
use crate::ipc::{self, FromWorker};
use crate::metrics::Metrics;
use crate::tensor::Tensor;

/// Why a request got no outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum InferError {
    /// The handler raised; the message names the exception.
    Raised(String),
    /// The handler's outputs could not be used (e.g. not splittable by rows).
    BadOutput(String),
    /// The worker process exited mid-request.
    WorkerDied(String),
    /// No worker can take requests (starting, restarting or shutting down).
    Unavailable(String),
}

type Reply = oneshot::Sender<Result<Vec<Tensor>, InferError>>;

struct Job {
    inputs: Vec<Tensor>,
    /// Rows and batch key, when batching is on and the request can be batched.
    batch: Option<(usize, BatchKey)>,
    reply: Reply,
    enqueued: Instant,
}

/// Requests run by one handler call.
struct Batch {
    frame: Vec<u8>,
    replies: Vec<Reply>,
    /// Rows per request, when the outputs must be split back.
    rows: Option<Vec<usize>>,
}

impl Batch {
    fn new(jobs: Vec<Job>) -> Self {
        // Batchable jobs (all or none in a batch) are split back by rows.
        let rows = jobs[0].batch.as_ref().map(|_| {
            jobs.iter()
                .map(|j| j.batch.as_ref().map_or(0, |b| b.0))
                .collect()
        });
        let (inputs, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.inputs, j.reply)).unzip();
        let frame = if inputs.len() == 1 {
            ipc::encode_infer(&inputs[0])
        } else {
            ipc::encode_infer(&batch::concat(inputs))
        };
        Batch {
            frame,
            replies,
            rows,
        }
    }

    fn complete(self, result: Result<Vec<Tensor>, InferError>) {
        let outputs = match (result, self.rows) {
            (Err(e), _) => {
                for r in self.replies {
                    let _ = r.send(Err(e.clone()));
                }
                return;
            }
            (Ok(outputs), None) => vec![outputs],
            (Ok(outputs), Some(rows)) => match batch::split(outputs, &rows) {
                Ok(parts) => parts,
                Err(msg) => {
                    for r in self.replies {
                        let _ = r.send(Err(InferError::BadOutput(msg.clone())));
                    }
                    return;
                }
            },
        };
        // Receivers may be gone (client hung up); nothing to do then.
        for (reply, out) in self.replies.into_iter().zip(outputs) {
            let _ = reply.send(Ok(out));
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub python: String,
    pub script: WorkerScript,
    pub module: String,
    pub function: String,
    pub workers: usize,
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
}

/// How the worker script reaches Python: written to a file at start, or inline with `-c`
/// when no temporary directory is writable.
#[derive(Debug, Clone)]
pub enum WorkerScript {
    File(PathBuf),
    Inline,
}

pub const WORKER_SOURCE: &str = include_str!("worker.py");

/// The handle HTTP handlers use.
#[derive(Clone)]
pub struct Pool {
    jobs: mpsc::UnboundedSender<Job>,
    /// Requests received but not yet queued (body still being read or parsed).
    arriving: Arc<AtomicUsize>,
    ready: watch::Receiver<usize>,
    batching: bool,
    metrics: Metrics,
}

impl Pool {
    pub fn ready_workers(&self) -> usize {
        *self.ready.borrow()
    }

    /// Announces a request that will probably call `infer` soon, so a forming batch waits for
    /// it. Drop the guard (or pass it to `infer`) when it will not.
    pub fn arriving(&self) -> Arriving {
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Arriving(self.arriving.clone())
    }

    pub async fn infer(
        &self,
        arriving: Arriving,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, InferError> {
        let (reply, rx) = oneshot::channel();
        let batch = if self.batching {
            batch::batch_key(&inputs)
        } else {
            None
        };
        let job = Job {
            inputs,
            batch,
            reply,
            enqueued: Instant::now(),
        };
        self.jobs
            .send(job)
            .map_err(|_| InferError::Unavailable("the server is shutting down".into()))?;
        self.metrics.queue_depth.inc();
        // Queued before the count drops, so the dispatcher never misses it.
        drop(arriving);
        rx.await.unwrap_or_else(|_| {
            Err(InferError::Unavailable(
                "the server is shutting down".into(),
            ))
        })
    }
}

/// A request on its way to `Pool::infer`.
pub struct Arriving(Arc<AtomicUsize>);

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Owns the tasks; `shutdown` stops them and the Python processes.
pub struct PoolHandle {
    closing: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PoolHandle {
    /// Stops the dispatcher (requests still queued get 503) and lets each worker finish its
    /// current call, then closes the pipes so the Python processes exit.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.closing.send(true);
        for task in self.tasks {
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("a worker did not stop in time");
            }
        }
    }
}

/// Starts the workers and the dispatcher. The receiver yields a message when a worker's
/// first start fails (import error, `load()` raised): the server should exit then, so the
/// failure shows as a crash with the error in the log.
pub fn start(
    cfg: PoolConfig,
    metrics: Metrics,
) -> (Pool, PoolHandle, mpsc::UnboundedReceiver<String>) {
    let cfg = Arc::new(cfg);
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let (idle_tx, idle_rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = watch::channel(0usize);
    let (closing_tx, closing_rx) = watch::channel(false);
    let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
    let ready_tx = Arc::new(ready_tx);
    let arriving = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in 0..cfg.workers {
        let w = Worker {
            id,
            cfg: cfg.clone(),
            idle: idle_tx.clone(),
            ready: ready_tx.clone(),
            metrics: metrics.clone(),
            closing: closing_rx.clone(),
        };
        tasks.push(tokio::spawn(w.run(fatal_tx.clone())));
    }
    let dispatcher = Dispatcher {
        jobs: jobs_rx,
        idle: idle_rx,
        ready: ready_rx.clone(),
        closing: closing_rx,
        pending: VecDeque::new(),
        arriving: arriving.clone(),
        max_rows: cfg.max_batch_size,
        delay: cfg.max_batch_delay,
        metrics: metrics.clone(),
    };
    tasks.insert(0, tokio::spawn(dispatcher.run()));
    let pool = Pool {
        jobs: jobs_tx,
        arriving,
        ready: ready_rx,
        batching: cfg.max_batch_size > 1,
        metrics,
    };
    (
        pool,
        PoolHandle {
            closing: closing_tx,
            tasks,
        },
        fatal_rx,
    )
}

struct Dispatcher {
    jobs: mpsc::UnboundedReceiver<Job>,
    idle: mpsc::UnboundedReceiver<mpsc::Sender<Batch>>,
    ready: watch::Receiver<usize>,
    closing: watch::Receiver<bool>,
    /// Jobs taken from the queue that did not fit the last batch.
    pending: VecDeque<Job>,
    arriving: Arc<AtomicUsize>,
    max_rows: usize,
    delay: Duration,
    metrics: Metrics,
}

impl Dispatcher {
    async fn run(mut self) {
        let mut closing = self.closing.clone();
        tokio::select! {
            _ = self.dispatch() => {}
            _ = closing.wait_for(|c| *c) => {}
        }
        // Whatever is still queued will not run; answer it rather than leave it hanging.
        self.jobs.close();
        while let Some(job) = self
            .pending
            .pop_front()
            .or_else(|| self.jobs.try_recv().ok())
        {
            self.metrics.queue_depth.dec();
            let _ = job.reply.send(Err(InferError::Unavailable(
                "the server is shutting down".into(),
            )));
        }
    }

    async fn next_job(&mut self) -> Option<Job> {
        loop {
            let job = match self.pending.pop_front() {
                Some(job) => job,
                None => self.jobs.recv().await?,
            };
            if job.reply.is_closed() {
                // The client hung up while queued: skip the work.
                self.metrics.queue_depth.dec();
                continue;
            }
            return Some(job);
        }
    }

    fn fail(&self, job: Job, msg: &str) {
        self.metrics.queue_depth.dec();
        let _ = job
            .reply
            .send(Err(InferError::Unavailable(msg.to_string())));
    }

    /// Waits for an idle worker; None when no worker is ready (none would come soon) or the
    /// workers are gone.
    async fn free_worker(&mut self) -> Option<mpsc::Sender<Batch>> {
        loop {
            if *self.ready.borrow_and_update() == 0 {
                return None;
            }
            tokio::select! {
                slot = self.idle.recv() => return slot,
                // Re-check: the last worker may have died while we waited.
                _ = self.ready.changed() => {}
            }
        }
    }

    async fn dispatch(&mut self) {
        const NO_WORKER: &str = "no Python worker is ready (starting or restarting)";
        while let Some(first) = self.next_job().await {
            // Wait for a free worker; meanwhile more requests queue up and join the batch.
            let Some(mut slot) = self.free_worker().await else {
                self.fail(first, NO_WORKER);
                continue;
            };
            let jobs = self.gather(first).await;
            self.metrics.queue_depth.sub(jobs.len() as i64);
            self.metrics.batch_size.observe(jobs.len() as f64);
            let mut batch = Batch::new(jobs);
            loop {
                match slot.send(batch).await {
                    Ok(()) => break,
                    // That worker died while idle; try another.
                    Err(mpsc::error::SendError(b)) => batch = b,
                }
                match self.free_worker().await {
                    Some(s) => slot = s,
                    None => {
                        batch.complete(Err(InferError::Unavailable(NO_WORKER.into())));
                        break;
                    }
                }
            }
        }
    }

    /// The first job plus whatever compatible jobs arrive before the batch is full or the
    /// first job has waited `delay`. It does not wait when no other request is being received,
    /// so a lone client pays no batching delay.
    async fn gather(&mut self, first: Job) -> Vec<Job> {
        let Some((mut rows, key)) = first.batch.clone() else {
            return vec![first];
        };
        let deadline = tokio::time::Instant::from_std(first.enqueued + self.delay);
        let mut jobs = vec![first];
        while rows < self.max_rows {
            let next = match self.pending.pop_front() {
                Some(job) => job,
                None => match self.jobs.try_recv() {
                    Ok(job) => job,
                    // Nothing queued and nothing on its way: waiting would only add latency.
                    Err(_) if self.arriving.load(Ordering::SeqCst) == 0 => break,
                    Err(_) => match tokio::time::timeout_at(deadline, self.jobs.recv()).await {
                        Ok(Some(job)) => job,
                        _ => break,
                    },
                },
            };
            if next.reply.is_closed() {
                self.metrics.queue_depth.dec();
                continue;
            }
            match &next.batch {
                Some((r, k)) if *k == key && rows + r <= self.max_rows => {
                    rows += r;
                    jobs.push(next);
                }
                // Does not fit: it leads the next batch, keeping arrival order.
                _ => {
                    self.pending.push_front(next);
                    break;
                }
            }
        }
        jobs
    }
}

struct Worker {
    id: usize,
    cfg: Arc<PoolConfig>,
    idle: mpsc::UnboundedSender<mpsc::Sender<Batch>>,
    ready: Arc<watch::Sender<usize>>,
    metrics: Metrics,
    closing: watch::Receiver<bool>,
}

struct Process {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

enum Ended {
    Closing,
    Died(String),
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("unknown exit: {e}"),
    }
}

impl Worker {
    async fn run(mut self, fatal: mpsc::UnboundedSender<String>) {
        let mut first = true;
        let mut backoff = Duration::from_millis(100);
        while !*self.closing.borrow() {
            let mut proc = match self.spawn().await {
                Ok(proc) => proc,
                Err(msg) => {
                    if first {
                        let _ = fatal.send(format!("worker {}: {msg}", self.id));
                        return;
                    }
                    tracing::error!(worker = self.id, error = %msg, ?backoff, "worker failed to restart; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.closing.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            first = false;
            backoff = Duration::from_millis(100);
            self.ready.send_modify(|n| *n += 1);
            self.metrics.workers_ready.inc();
            let ended = self.serve(&mut proc).await;
            self.ready.send_modify(|n| *n -= 1);
            self.metrics.workers_ready.dec();
            match ended {
                Ended::Closing => {
                    // EOF on its stdin tells the worker to exit.
                    drop(proc.stdin);
                    if tokio::time::timeout(Duration::from_secs(5), proc.child.wait())
                        .await
                        .is_err()
                    {
                        let _ = proc.child.kill().await;
                    }
                    return;
                }
                Ended::Died(how) => {
                    self.metrics.worker_restarts.inc();
                    tracing::warn!(worker = self.id, exit = %how, "Python worker exited; restarting it");
                }
            }
        }
    }

    /// Starts a process and waits until `load()` returned.
    async fn spawn(&self) -> Result<Process, String> {
        let cfg = &self.cfg;
        let mut cmd = Command::new(&cfg.python);
        match &cfg.script {
            WorkerScript::File(path) => cmd.arg(path),
            WorkerScript::Inline => cmd.arg("-c").arg(WORKER_SOURCE),
        };
        cmd.arg(&cfg.module)
            .arg(&cfg.function)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", cfg.python))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut closing = self.closing.clone();
        let first = tokio::select! {
            frame = ipc::read_frame(&mut stdout) => frame,
            // Shutdown during a long load() should not wait for it.
            _ = closing.wait_for(|c| *c) => return Err("shutting down".into()),
        };
        let msg = match first {
            Ok(frame) => ipc::decode(&frame),
            Err(_) => Err(format!(
                "the worker exited while loading ({})",
                describe_exit(child.wait().await)
            )),
        };
        match msg {
            Ok(FromWorker::Ready(info)) => {
                tracing::info!(
                    worker = self.id,
                    pid = info.pid,
                    numpy = info.numpy,
                    "Python worker ready"
                );
                Ok(Process {
                    child,
                    stdin,
                    stdout,
                })
            }
            Ok(FromWorker::LoadFailed(e)) => Err(format!(
                "loading {}:{} failed: {e}",
                cfg.module, cfg.function
            )),
            Ok(other) => Err(format!(
                "unexpected first message from the worker: {other:?}"
            )),
            Err(e) => Err(e),
        }
    }

    async fn serve(&mut self, proc: &mut Process) -> Ended {
        loop {
            let (slot, mut batches) = mpsc::channel(1);
            if self.idle.send(slot).is_err() {
                return Ended::Closing;
            }
            let batch = tokio::select! {
                batch = batches.recv() => match batch {
                    Some(batch) => batch,
                    None => return Ended::Closing,
                },
                status = proc.child.wait() => return Ended::Died(describe_exit(status)),
                _ = self.closing.wait_for(|c| *c) => return Ended::Closing,
            };
            let started = Instant::now();
            // The handler call is not interrupted by shutdown: in-flight work finishes.
            let answer = tokio::select! {
                answer = exchange(&mut proc.stdin, &mut proc.stdout, &batch.frame) => answer,
                status = proc.child.wait() => Err(describe_exit(status)),
            };
            self.metrics
                .handler_duration
                .observe(started.elapsed().as_secs_f64());
            match answer {
                Ok(FromWorker::Outputs(outputs)) => batch.complete(Ok(outputs)),
                Ok(FromWorker::Raised(e)) => batch.complete(Err(InferError::Raised(e))),
                other => {
                    let how = match other {
                        Err(how) => how,
                        Ok(msg) => format!("protocol error: unexpected {msg:?}"),
                    };
                    let _ = proc.child.start_kill();
                    let how = if how.starts_with("protocol error") {
                        how
                    } else {
                        // An I/O error usually means the process died; report how.
                        describe_exit(proc.child.wait().await)
                    };
                    batch.complete(Err(InferError::WorkerDied(how.clone())));
                    return Ended::Died(how);
                }
            }
        }
    }
}

async fn exchange(
    stdin: &mut ChildStdin,
    stdout: &mut ChildStdout,
    frame: &[u8],
) -> Result<FromWorker, String> {
    ipc::write_frame(stdin, frame)
        .await
        .map_err(|e| format!("writing to the worker: {e}"))?;
    let reply = ipc::read_frame(stdout)
        .await
        .map_err(|e| format!("reading from the worker: {e}"))?;
    ipc::decode(&reply).map_err(|e| format!("protocol error: {e}"))
}
