use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = kinfer_wrapper::args::Args::parse();
    let runtime = match args.http_threads {
        // One thread saves the cross-thread wake-ups of a small request's several hops.
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n as usize)
            .enable_all()
            .build(),
    };
    let result = runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(kinfer_wrapper::server::run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kinfer-wrapper: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
