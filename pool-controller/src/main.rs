use clap::Parser;
use kinfer_core::{ClientArgs, CommonArgs, Runtime};

/// kinfer's warm pool controller for Knative revisions.
///
/// Keeps warm pods for the Knative Configurations named by WarmPool objects and hands them to the revision on scale-up by relabeling them so the revision's ReplicaSet adopts them, instead of waiting for a cold pod to load its model.
#[derive(Debug, Parser)]
#[command(name = "kinfer-pool-controller", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    #[command(flatten)]
    client: ClientArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = Runtime::start("pool-controller", &args.common, &args.client).await?;
    runtime.wait_for_shutdown().await
}
