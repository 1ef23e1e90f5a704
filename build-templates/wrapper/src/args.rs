//! Command-line flags. Every flag also reads an environment variable, so the webhook can
//! configure an injected wrapper through the container's `env` alone.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kinfer-wrapper",
    version,
    about = "Serves a Python function over the Open Inference Protocol (v2 REST) and KServe v1",
    long_about = "Serves a Python function over the Open Inference Protocol (v2 REST) and KServe v1.\n\n\
The handler takes a dict of input name -> tensor (a numpy.ndarray when numpy is importable, \
otherwise nested lists) and returns a dict of output name -> tensor, or a single tensor \
(named `output-0`). If the module defines `load()`, each worker calls it once before the \
server reports ready.",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The Python function to serve, as MODULE:FUNCTION. MODULE is imported from PYTHONPATH or
    /// the working directory.
    #[arg(long, env = "KINFER_HANDLER", value_parser = parse_handler, required = true)]
    pub handler: Option<Handler>,

    /// The model name in URLs (/v2/models/NAME, /v1/models/NAME). Defaults to the last part of
    /// MODULE.
    #[arg(long, env = "KINFER_MODEL_NAME")]
    pub model_name: Option<String>,

    /// The model version. URLs of the `versions/{v}` form must name it.
    #[arg(long, env = "KINFER_MODEL_VERSION", default_value = "1")]
    pub model_version: String,

    /// The port to serve on (Knative sets PORT for the user container).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,

    /// The address to listen on.
    #[arg(long, env = "KINFER_ADDRESS", default_value = "0.0.0.0")]
    pub address: IpAddr,

    /// The most rows (first-dimension entries) one handler call gets. Above 1, requests are
    /// concatenated along the first dimension, run together and split back.
    #[arg(long, env = "KINFER_MAX_BATCH_SIZE", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_size: u32,

    /// How long a batch may wait for more requests after its first one arrived, e.g. `5ms`,
    /// `200us`, `0`. Only used when --max-batch-size is above 1.
    #[arg(long, env = "KINFER_MAX_BATCH_DELAY", default_value = "5ms", value_parser = parse_duration)]
    pub max_batch_delay: Duration,

    /// Python worker processes; each one imports the module and calls `load()`.
    #[arg(long, env = "KINFER_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,

    /// Threads for HTTP and JSON work. The Python workers do the heavy lifting in their own
    /// processes, so one thread usually suffices; raise it for large JSON tensors.
    #[arg(long, env = "KINFER_HTTP_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_threads: u32,

    /// The Python interpreter that runs the workers.
    #[arg(long, env = "KINFER_PYTHON", default_value = "python3")]
    pub python: String,

    /// The largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "KINFER_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    #[arg(long, env = "KINFER_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Log filter, in tracing-subscriber's EnvFilter syntax.
    #[arg(long, env = "KINFER_LOG", default_value = "info")]
    pub log: String,

    /// Log as JSON lines instead of plain text.
    #[arg(long, env = "KINFER_LOG_JSON")]
    pub log_json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Copies this binary into DIR and exits: the webhook's init container uses it to share
    /// the wrapper with the user container through an emptyDir (the image has no shell).
    Install {
        /// The directory to copy `kinfer-wrapper` into; created if missing.
        dir: std::path::PathBuf,
    },
}

/// `MODULE:FUNCTION`, checked at parse time so a typo fails before any worker starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    pub module: String,
    pub function: String,
}

impl Args {
    /// The handler; clap makes `--handler` required whenever no subcommand is given.
    pub fn handler(&self) -> &Handler {
        self.handler
            .as_ref()
            .expect("clap requires --handler without a subcommand")
    }

    pub fn model_name(&self) -> String {
        let module = &self.handler().module;
        self.model_name
            .clone()
            .unwrap_or_else(|| module.rsplit('.').next().unwrap_or(module).to_string())
    }
}

fn is_dotted_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
                && chars.all(|c| c == '_' || c.is_alphanumeric())
        })
}

pub fn parse_handler(s: &str) -> Result<Handler, String> {
    let Some((module, function)) = s.split_once(':') else {
        return Err(format!(
            "{s:?} is not MODULE:FUNCTION (for example `model:predict`)"
        ));
    };
    if !is_dotted_identifier(module) {
        return Err(format!("{module:?} is not a Python module name"));
    }
    if !is_dotted_identifier(function) || function.contains('.') {
        return Err(format!("{function:?} is not a Python function name"));
    }
    Ok(Handler {
        module: module.to_string(),
        function: function.to_string(),
    })
}

/// Parses `250ms`, `5s`, `100us`, `1m` or a bare `0`. Hand-rolled to keep dependencies out of
/// users' images.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} needs a unit: us, ms, s or m (for example `5ms`)"))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let seconds = match unit {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}; use us, ms, s or m"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_forms() {
        assert_eq!(
            parse_handler("pkg.model:predict").unwrap(),
            Handler {
                module: "pkg.model".into(),
                function: "predict".into()
            }
        );
        for bad in [
            "model",
            ":predict",
            "model:",
            "mo-del:predict",
            "model:a.b",
            "1x:f",
        ] {
            assert!(parse_handler(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("5ms").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["5", "ms", "5h", "-1ms", "x5ms"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn model_name_defaults_to_module_leaf() {
        let args = Args::try_parse_from(["kinfer-wrapper", "--handler", "a.b.iris:predict"])
            .expect("parses");
        assert_eq!(args.model_name(), "iris");
        assert_eq!(args.max_batch_size, 1);
        assert_eq!(args.max_batch_delay, Duration::from_millis(5));
        let args = Args::try_parse_from([
            "kinfer-wrapper",
            "--handler",
            "m:f",
            "--model-name",
            "x",
            "--max-batch-size",
            "0",
        ]);
        assert!(args.is_err(), "batch size 0 is rejected");
    }

    #[test]
    fn install_needs_no_handler_and_serving_needs_one() {
        let args = Args::try_parse_from(["kinfer-wrapper", "install", "/kinfer/bin"]).unwrap();
        assert!(
            matches!(args.command, Some(Command::Install { ref dir }) if dir.to_str() == Some("/kinfer/bin"))
        );
        if std::env::var_os("KINFER_HANDLER").is_none() {
            assert!(Args::try_parse_from(["kinfer-wrapper"]).is_err());
        }
    }
}
