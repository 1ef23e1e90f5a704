#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kinfer_pool_controller::Args::parse_and_run().await
}
