use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = kinfer_wrapper::args::Args::parse();
    match kinfer_wrapper::server::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kinfer-wrapper: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
