//! Wiring: flags → config watch, certificate, webhook configurations, HTTPS server.
//!
//! Readiness (`/readyz` on the admin port) turns green once the kinfer-config watch has done
//! its first list and the serving certificate is in place (and, when managed, the webhook
//! configurations are applied).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kinfer_core::admin::ReadinessGate;
use kinfer_core::{Runtime, Shutdown};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use prometheus::IntGauge;
use warp::Filter;

use crate::admission::{self, Admission, Metrics, SharedConfig};
use crate::args::{Args, TlsMode};
use crate::cert_store::SecretStore;
use crate::config::KinferConfig;
use crate::server;
use crate::tls::{self, CertBundle, CertFiles, CertResolver, Lifetimes};
use crate::webhook_config::{self, Target};

impl Args {
    pub async fn parse_and_run() -> anyhow::Result<()> {
        use clap::Parser as _;
        Self::parse().run().await
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let Args {
            common,
            client,
            namespace,
            service_name,
            service_port,
            listen,
            tls_mode,
            tls_secret_name,
            extra_san,
            cert_check_seconds,
            tls_cert_file,
            tls_key_file,
            tls_ca_file,
            tls_poll_seconds,
            config_map,
            webhook_url_base,
            manage_webhook_configurations,
            cert_lifetime_seconds,
            configuration_name,
        } = self;
        let lifetimes = Lifetimes {
            serving: Duration::from_secs(cert_lifetime_seconds),
            ..Lifetimes::default()
        };

        let target = match webhook_url_base {
            Some(url) if !url.starts_with("https://") => {
                bail!("--webhook-url-base must be an https:// URL, got {url}")
            }
            Some(url) => Target::Url(url),
            None => Target::Service {
                namespace: namespace.clone(),
                name: service_name.clone(),
                port: service_port,
            },
        };

        let runtime = Runtime::start("webhook", &common, &client).await?;
        let client = runtime.client.clone();
        let shutdown = runtime.shutdown.clone();
        let registry = &runtime.admin.registry;
        let metrics = Metrics::register(registry)?;
        let config_valid = IntGauge::new(
            "config_valid",
            "1 when the kinfer-config ConfigMap parsed (or is absent), 0 while a bad one is ignored",
        )?;
        registry.register(Box::new(config_valid.clone()))?;

        let config: SharedConfig = Arc::new(ArcSwap::from_pointee(KinferConfig::default()));
        tokio::spawn(watch_config(
            Api::namespaced(client.clone(), &namespace),
            config_map,
            config.clone(),
            config_valid,
            runtime.admin.readiness.gate("kinfer-config"),
            shutdown.clone(),
        ));

        // Bound before the webhook configurations point at it: connections the apiserver
        // opens meanwhile wait in the backlog instead of being refused.
        let listener = server::bind(listen).await?;
        let tls_gate = runtime.admin.readiness.gate("tls");
        let manage = manage_webhook_configurations.then(|| Manage {
            client: client.clone(),
            name: configuration_name.clone(),
            target: target.clone(),
        });
        let resolver = match tls_mode {
            TlsMode::SelfManaged => {
                let sans = tls::service_sans(&service_name, &namespace, &extra_san);
                let store = SecretStore::new(client.clone(), &namespace, &tls_secret_name);
                let bundle = store.sync(&sans, lifetimes).await?;
                let resolver =
                    CertResolver::new(tls::certified_key(&bundle.cert_pem, &bundle.key_pem)?);
                if let Some(m) = &manage {
                    m.apply(Some(bundle.ca_pem.as_bytes())).await?;
                }
                tokio::spawn(rotate(
                    store,
                    sans,
                    lifetimes,
                    resolver.clone(),
                    manage.clone(),
                    Duration::from_secs(cert_check_seconds.max(1)),
                    bundle,
                    shutdown.clone(),
                ));
                resolver
            }
            TlsMode::Files => {
                let files = CertFiles {
                    cert: tls_cert_file.context("--tls-cert-file is required")?,
                    key: tls_key_file.context("--tls-key-file is required")?,
                    ca: tls_ca_file,
                };
                let contents = files.read().await?;
                let resolver = CertResolver::new(contents.certified_key()?);
                if let Some(m) = &manage {
                    m.apply(contents.ca.as_deref()).await?;
                }
                let (ca_tx, mut ca_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                if let Some(m) = manage.clone() {
                    tokio::spawn(async move {
                        while let Some(ca) = ca_rx.recv().await {
                            if let Err(e) = m.apply(Some(&ca)).await {
                                tracing::error!("publishing the new CA bundle: {e:#}");
                            }
                        }
                    });
                }
                let stop = shutdown.clone();
                tokio::spawn(tls::watch_files(
                    files,
                    contents,
                    resolver.clone(),
                    Duration::from_secs(tls_poll_seconds.max(1)),
                    move |ca| {
                        let _ = ca_tx.send(ca);
                    },
                    async move { stop.signaled().await },
                ));
                resolver
            }
        };

        tracing::info!(addr = %listener.local_addr()?, ?target, "admission server listening (HTTPS)");
        tls_gate.open();
        let routes = admission::routes(Admission::new(config, metrics)).recover(admission::recover);
        let stop = shutdown.clone();
        server::serve_tls(
            listener,
            tls::server_config(resolver)?,
            routes,
            async move { stop.signaled().await },
        )
        .await;
        runtime.wait_for_shutdown().await
    }
}

/// The webhook configurations this instance keeps current.
#[derive(Clone)]
struct Manage {
    client: Client,
    name: String,
    target: Target,
}

impl Manage {
    async fn apply(&self, ca_bundle: Option<&[u8]>) -> anyhow::Result<()> {
        webhook_config::apply(&self.client, &self.name, &self.target, ca_bundle).await
    }
}

/// Keeps `shared` equal to the ConfigMap (defaults when it is absent). A ConfigMap that does
/// not parse is logged with every problem and ignored; the last good configuration stays.
async fn watch_config(
    api: Api<ConfigMap>,
    name: String,
    shared: SharedConfig,
    valid: IntGauge,
    gate: ReadinessGate,
    shutdown: Shutdown,
) {
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut gate = Some(gate);
    let mut seen = false;
    let apply = |cm: &ConfigMap| match KinferConfig::from_data(&cm.data.clone().unwrap_or_default())
    {
        Ok(c) => {
            tracing::info!(configmap = %name, config = ?c, "configuration loaded");
            shared.store(Arc::new(c));
            valid.set(1);
        }
        Err(errors) => {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            tracing::error!(configmap = %name, ?errors, "configuration ignored, keeping the previous one");
            valid.set(0);
        }
    };
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = shutdown.signaled() => return,
        };
        match event {
            None => return,
            Some(Err(e)) => tracing::warn!(configmap = %name, "watch: {e}"),
            Some(Ok(watcher::Event::Init)) => seen = false,
            Some(Ok(watcher::Event::InitApply(cm) | watcher::Event::Apply(cm))) => {
                seen = true;
                apply(&cm);
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                tracing::info!(configmap = %name, "deleted; using defaults");
                shared.store(Arc::new(KinferConfig::default()));
                valid.set(1);
            }
            Some(Ok(watcher::Event::InitDone)) => {
                if !seen {
                    tracing::info!(configmap = %name, "not found; using defaults");
                    shared.store(Arc::new(KinferConfig::default()));
                    valid.set(1);
                }
                if let Some(g) = gate.take() {
                    g.open();
                }
            }
        }
    }
}

/// Checks the certificate Secret every `every`; serves what it holds and publishes a new CA
/// bundle before serving a certificate signed by a new CA.
#[allow(clippy::too_many_arguments)]
async fn rotate(
    store: SecretStore,
    sans: Vec<String>,
    lifetimes: Lifetimes,
    resolver: Arc<CertResolver>,
    manage: Option<Manage>,
    every: Duration,
    mut current: CertBundle,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.signaled() => return,
        }
        let bundle = match store.sync(&sans, lifetimes).await {
            Ok(b) if b == current => continue,
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("checking the webhook certificate: {e:#}");
                continue;
            }
        };
        let key = match tls::certified_key(&bundle.cert_pem, &bundle.key_pem) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("the certificate in the Secret does not load: {e:#}");
                continue;
            }
        };
        if bundle.ca_pem != current.ca_pem
            && let Some(m) = &manage
        {
            if let Err(e) = m.apply(Some(bundle.ca_pem.as_bytes())).await {
                tracing::error!("publishing the new CA bundle: {e:#}");
                continue;
            }
            // Give the apiservers time to pick up the new caBundle before serving a
            // certificate only the new CA verifies.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                _ = shutdown.signaled() => return,
            }
        }
        resolver.swap(key);
        tracing::info!("serving the renewed webhook certificate");
        current = bundle;
    }
}
