//! Builds the Kubernetes client from a kubeconfig file or the in-cluster service account.

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::args::ClientArgs;

pub async fn client(args: &ClientArgs) -> anyhow::Result<kube::Client> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig given and no in-cluster or default kubeconfig found")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Asks the API server for its version, so a wrong address or credential fails at start-up
/// with a clear message instead of on the first watch.
pub async fn check_connection(client: &kube::Client) -> anyhow::Result<String> {
    let info = client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes API server")?;
    Ok(info.git_version)
}
