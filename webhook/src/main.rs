#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kinfer_webhook::Args::parse_and_run().await
}
