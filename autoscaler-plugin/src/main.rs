use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kinfer_autoscaler_plugin::run::run(kinfer_autoscaler_plugin::Args::parse()).await
}
