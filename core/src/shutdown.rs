//! Graceful shutdown: the first SIGTERM or SIGINT cancels a token every task watches;
//! a second one exits at once.

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns the signal listener. Call once, from inside the runtime.
    pub fn listen_for_signals(&self) {
        let token = self.token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("received shutdown signal, draining (send it again to exit at once)");
            token.cancel();
            wait_for_signal().await;
            tracing::warn!("second shutdown signal, exiting now");
            std::process::exit(130);
        });
    }

    /// Resolves once shutdown has begun.
    pub async fn signaled(&self) {
        self.token.cancelled().await
    }

    pub fn is_signaled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Starts shutdown from inside the program, e.g. when a critical task ends.
    pub fn trigger(&self) {
        self.token.cancel()
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
