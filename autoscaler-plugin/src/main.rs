use clap::Parser;
use kinfer_core::{ClientArgs, CommonArgs, Runtime};

/// kinfer's GPU-aware load signal for Knative's autoscaler (KPA).
///
/// Reads load signals of opted-in revisions (Prometheus queries or pod metric endpoints: in-flight and queued requests, request rate, GPU utilisation), turns them into the concurrency the KPA should see, and sends it over the KPA's own stat websocket, so Knative keeps its windows, scale-to-zero and rate limits.
#[derive(Debug, Parser)]
#[command(name = "kinfer-autoscaler-plugin", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    #[command(flatten)]
    client: ClientArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = Runtime::start("autoscaler-plugin", &args.common, &args.client).await?;
    runtime.wait_for_shutdown().await
}
