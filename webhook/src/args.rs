//! Command-line flags; every flag can also come from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kinfer_core::{ClientArgs, CommonArgs};

/// kinfer's admission webhook for Knative Serving.
///
/// Mutates the Pods of Knative revisions that carry kinfer.dev/* annotations (GPU resources,
/// tolerations, runtime class, node affinity on GPU memory, injection of the HTTP wrapper) and
/// validates those annotations on Knative Services, so a bad value is rejected when the
/// Service is created.
///
/// In cluster: run behind a Service and let it manage its own certificate (the default).
/// Locally, against a cluster whose apiserver runs on this machine:
/// `kinfer-webhook --webhook-url-base https://127.0.0.1:8443 --extra-san 127.0.0.1`.
#[derive(Debug, Parser)]
#[command(name = "kinfer-webhook", version)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub client: ClientArgs,

    /// Namespace the webhook is installed in: its Service, certificate Secret and the
    /// kinfer-config ConfigMap live there.
    #[arg(long, env = "KINFER_NAMESPACE", default_value = "kinfer-system")]
    pub namespace: String,

    /// Name of the webhook's Service (its DNS names go into the serving certificate, and the
    /// webhook configurations point at it unless --webhook-url-base is given).
    #[arg(long, env = "KINFER_WEBHOOK_SERVICE", default_value = "kinfer-webhook")]
    pub service_name: String,

    /// Port of the webhook's Service.
    #[arg(long, env = "KINFER_WEBHOOK_SERVICE_PORT", default_value_t = 443)]
    pub service_port: u16,

    /// Address the HTTPS admission server listens on (TLS only; no plaintext listener).
    #[arg(long, env = "KINFER_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Where the serving certificate comes from: `self-managed` (the webhook issues its own CA
    /// and certificate, keeps them in --tls-secret-name and rotates them) or `files`
    /// (--tls-cert-file/--tls-key-file, e.g. from cert-manager, reloaded when they change).
    #[arg(long, env = "KINFER_WEBHOOK_TLS_MODE", value_enum, default_value_t = TlsMode::SelfManaged)]
    pub tls_mode: TlsMode,

    /// Secret holding the self-managed CA and certificate (tls-mode self-managed).
    #[arg(
        long,
        env = "KINFER_WEBHOOK_TLS_SECRET",
        default_value = "kinfer-webhook-tls"
    )]
    pub tls_secret_name: String,

    /// Extra subject alternative names for the self-managed certificate (DNS names or IP
    /// addresses, comma-separated or repeated), e.g. 127.0.0.1 for a local run.
    #[arg(long, env = "KINFER_WEBHOOK_EXTRA_SANS", value_delimiter = ',')]
    pub extra_san: Vec<String>,

    /// How often the self-managed certificate is checked for renewal (seconds).
    #[arg(long, env = "KINFER_WEBHOOK_CERT_CHECK_SECONDS", default_value_t = 300)]
    pub cert_check_seconds: u64,

    /// Lifetime of the self-managed serving certificate (seconds, default 30 days); it is
    /// renewed once less than a third is left. Short values are for rotation tests.
    #[arg(
        long,
        env = "KINFER_WEBHOOK_CERT_LIFETIME_SECONDS",
        default_value_t = 30 * 24 * 3600,
        value_parser = clap::value_parser!(u64).range(10..)
    )]
    pub cert_lifetime_seconds: u64,

    /// Serving certificate chain, PEM (tls-mode files).
    #[arg(
        long,
        env = "KINFER_WEBHOOK_TLS_CERT_FILE",
        required_if_eq("tls_mode", "files")
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// Serving certificate key, PEM (tls-mode files).
    #[arg(
        long,
        env = "KINFER_WEBHOOK_TLS_KEY_FILE",
        required_if_eq("tls_mode", "files")
    )]
    pub tls_key_file: Option<PathBuf>,

    /// CA bundle to publish as the webhook configurations' caBundle (tls-mode files). Without
    /// it caBundle is left alone, e.g. for cert-manager's CA injector.
    #[arg(long, env = "KINFER_WEBHOOK_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// How often certificate files are re-read (seconds, tls-mode files).
    #[arg(long, env = "KINFER_WEBHOOK_TLS_POLL_SECONDS", default_value_t = 10)]
    pub tls_poll_seconds: u64,

    /// Name of the ConfigMap with cluster defaults (runtime class, toleration, wrapper
    /// image, …), watched in --namespace. Missing: built-in defaults.
    #[arg(long, env = "KINFER_CONFIG_MAP", default_value = crate::config::CONFIG_MAP_NAME)]
    pub config_map: String,

    /// Point the webhook configurations at this HTTPS base URL instead of the Service, e.g.
    /// https://127.0.0.1:8443 when the webhook runs next to a local apiserver.
    #[arg(long, env = "KINFER_WEBHOOK_URL_BASE")]
    pub webhook_url_base: Option<String>,

    /// Apply the Mutating/ValidatingWebhookConfiguration `kinfer-webhook` at start-up and
    /// keep their caBundle current. Turn off when manifests manage them.
    #[arg(long, env = "KINFER_WEBHOOK_MANAGE_CONFIGURATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_webhook_configurations: bool,

    /// Name of the Mutating- and ValidatingWebhookConfiguration this instance manages, so a
    /// second installation (e.g. a test instance) does not fight over the same objects.
    #[arg(
        long,
        env = "KINFER_WEBHOOK_CONFIGURATION_NAME",
        default_value = crate::webhook_config::CONFIGURATION_NAME
    )]
    pub configuration_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    SelfManaged,
    Files,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn local_run_flags() {
        let args = Args::try_parse_from([
            "kinfer-webhook",
            "--webhook-url-base",
            "https://127.0.0.1:8443",
            "--extra-san",
            "127.0.0.1,localhost",
            "--listen",
            "127.0.0.1:8443",
        ])
        .unwrap();
        assert_eq!(args.extra_san, ["127.0.0.1", "localhost"]);
        assert_eq!(args.tls_mode, TlsMode::SelfManaged);
        assert!(args.manage_webhook_configurations);
        assert_eq!(args.namespace, "kinfer-system");
        assert_eq!(args.cert_lifetime_seconds, 30 * 24 * 3600);
        assert_eq!(args.configuration_name, "kinfer-webhook");
    }

    #[test]
    fn short_certificates_for_rotation_tests() {
        let args = Args::try_parse_from([
            "kinfer-webhook",
            "--cert-lifetime-seconds",
            "20",
            "--cert-check-seconds",
            "2",
            "--configuration-name",
            "kinfer-webhook-rotation",
        ])
        .unwrap();
        assert_eq!(args.cert_lifetime_seconds, 20);
        assert_eq!(args.configuration_name, "kinfer-webhook-rotation");
        // Shorter than the checks could keep up with: refused.
        assert!(Args::try_parse_from(["kinfer-webhook", "--cert-lifetime-seconds", "5"]).is_err());
    }

    #[test]
    fn files_mode_needs_the_files() {
        let err = Args::try_parse_from(["kinfer-webhook", "--tls-mode", "files"]).unwrap_err();
        assert!(err.to_string().contains("--tls-cert-file"), "{err}");
        let args = Args::try_parse_from([
            "kinfer-webhook",
            "--tls-mode",
            "files",
            "--tls-cert-file",
            "/tls/tls.crt",
            "--tls-key-file",
            "/tls/tls.key",
            "--manage-webhook-configurations",
            "false",
        ])
        .unwrap();
        assert!(!args.manage_webhook_configurations);
    }
}
