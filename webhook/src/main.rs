use clap::Parser;
use kinfer_core::{ClientArgs, CommonArgs, Runtime};

/// kinfer's admission webhook for Knative Serving.
///
/// Mutates the Pods of Knative revisions that carry kinfer.dev/* annotations (GPU resources, tolerations, runtime class, node affinity on GPU memory, injection of the HTTP wrapper) and validates those annotations on Knative Services, so a bad value is rejected when the Service is created.
#[derive(Debug, Parser)]
#[command(name = "kinfer-webhook", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    #[command(flatten)]
    client: ClientArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = Runtime::start("webhook", &args.common, &args.client).await?;
    runtime.wait_for_shutdown().await
}
