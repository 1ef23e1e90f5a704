//! The self-managed certificate kept in a Secret, so every replica serves the same CA.
//!
//! Create-if-absent, then read back what won: two replicas starting at once both try to
//! create; the loser gets 409 and uses the winner's. Renewal replaces the Secret with its
//! `resourceVersion` (optimistic concurrency), so only one replica's renewal lands and the
//! others pick it up on their next check.

use std::collections::BTreeMap;

use anyhow::Context;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use time::OffsetDateTime;

use crate::tls::{CertBundle, Lifetimes, renew};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";

/// Reads the bundle out of a Secret (`None` when a key is missing or not text).
pub fn bundle_from_secret(secret: &Secret) -> Option<CertBundle> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(CertBundle {
        ca_pem: text(CA_CERT)?,
        ca_key_pem: text(CA_KEY)?,
        cert_pem: text(TLS_CERT)?,
        key_pem: text(TLS_KEY)?,
    })
}

/// A `kubernetes.io/tls` Secret holding the bundle (plus the CA key, which only the webhook
/// reads).
pub fn secret_from_bundle(name: &str, namespace: &str, bundle: &CertBundle) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "kinfer-webhook".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (CA_CERT.to_string(), bytes(&bundle.ca_pem)),
            (CA_KEY.to_string(), bytes(&bundle.ca_key_pem)),
            (TLS_CERT.to_string(), bytes(&bundle.cert_pem)),
            (TLS_KEY.to_string(), bytes(&bundle.key_pem)),
        ])),
        ..Secret::default()
    }
}

pub struct SecretStore {
    api: Api<Secret>,
    name: String,
    namespace: String,
}

impl SecretStore {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            namespace: namespace.to_string(),
        }
    }

    /// Returns the bundle every replica should serve now, creating or renewing it in the
    /// Secret when needed.
    pub async fn sync(&self, sans: &[String], lifetimes: Lifetimes) -> anyhow::Result<CertBundle> {
        let what = format!("Secret {}/{}", self.namespace, self.name);
        for _ in 0..5 {
            let existing = self
                .api
                .get_opt(&self.name)
                .await
                .with_context(|| format!("reading {what}"))?;
            let current = existing.as_ref().and_then(bundle_from_secret);
            let Some(new) = renew(current.as_ref(), sans, OffsetDateTime::now_utc(), lifetimes)?
            else {
                return Ok(current.expect("kept implies present"));
            };
            let mut secret = secret_from_bundle(&self.name, &self.namespace, &new);
            let result = match &existing {
                None => self.api.create(&PostParams::default(), &secret).await,
                Some(old) => {
                    secret.metadata.resource_version = old.metadata.resource_version.clone();
                    secret.metadata.labels = old.metadata.labels.clone().or(secret.metadata.labels);
                    self.api
                        .replace(&self.name, &PostParams::default(), &secret)
                        .await
                }
            };
            match result {
                Ok(_) => {
                    tracing::info!(secret = %what, renewed = existing.is_some(), "webhook certificate issued");
                    return Ok(new);
                }
                // Another replica got there first: use what it wrote.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e).with_context(|| format!("writing {what}")),
            }
        }
        anyhow::bail!("{what} kept changing under us; giving up for now")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_api;

    const PATH: &str = "/api/v1/namespaces/kinfer-system/secrets/kinfer-webhook-tls";

    fn sans() -> Vec<String> {
        vec!["kinfer-webhook.kinfer-system.svc".to_string()]
    }

    #[tokio::test]
    async fn creates_the_secret_once_and_then_reuses_it() {
        let (client, state) = fake_api::client();
        let store = SecretStore::new(client, "kinfer-system", "kinfer-webhook-tls");
        let first = store.sync(&sans(), Lifetimes::default()).await.unwrap();
        let stored = state.lock().unwrap().objects[PATH].clone();
        assert_eq!(stored["type"], "kubernetes.io/tls");
        let again = store.sync(&sans(), Lifetimes::default()).await.unwrap();
        assert_eq!(again, first, "a second replica serves the same certificate");
        let log = state.lock().unwrap().log.clone();
        assert_eq!(
            log.iter().filter(|l| l.starts_with("POST")).count(),
            1,
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_create_race_uses_the_winner() {
        let (client, state) = fake_api::client();
        // The other replica's bundle lands between our GET and our POST.
        let winner = renew(
            None,
            &sans(),
            OffsetDateTime::now_utc(),
            Lifetimes::default(),
        )
        .unwrap()
        .unwrap();
        let mut winner_secret = serde_json::to_value(secret_from_bundle(
            "kinfer-webhook-tls",
            "kinfer-system",
            &winner,
        ))
        .unwrap();
        winner_secret["metadata"]["resourceVersion"] = serde_json::json!("1");
        let mut pending = Some(winner_secret);
        state.lock().unwrap().hook = Some(Box::new(move |method, _path, objects| {
            if method == "POST"
                && let Some(s) = pending.take()
            {
                objects.insert(PATH.to_string(), s);
            }
            None
        }));
        let store = SecretStore::new(client, "kinfer-system", "kinfer-webhook-tls");
        let got = store.sync(&sans(), Lifetimes::default()).await.unwrap();
        assert_eq!(got, winner);
    }

    #[tokio::test]
    async fn renewal_replaces_with_resource_version_and_retries_on_conflict() {
        let (client, state) = fake_api::client();
        let store = SecretStore::new(client, "kinfer-system", "kinfer-webhook-tls");
        let first = store.sync(&sans(), Lifetimes::default()).await.unwrap();
        // A new SAN forces a new serving certificate; the first PUT conflicts.
        let mut conflicts = 1;
        state.lock().unwrap().hook = Some(Box::new(move |method, _, _| {
            (method == "PUT" && conflicts > 0).then(|| {
                conflicts -= 1;
                409
            })
        }));
        let mut more = sans();
        more.push("127.0.0.1".into());
        let second = store.sync(&more, Lifetimes::default()).await.unwrap();
        assert_eq!(second.ca_pem, first.ca_pem);
        assert_ne!(second.cert_pem, first.cert_pem);
        assert_eq!(crate::tls::sans_of(&second.cert_pem).unwrap(), more);
        let stored = state.lock().unwrap().objects[PATH].clone();
        let stored: Secret = serde_json::from_value(stored).unwrap();
        assert_eq!(bundle_from_secret(&stored), Some(second));
        let log = state.lock().unwrap().log.clone();
        assert_eq!(
            log.iter().filter(|l| l.starts_with("PUT")).count(),
            2,
            "{log:?}"
        );
    }

    #[test]
    fn secret_round_trip() {
        let sans = vec!["kinfer-webhook.ns.svc".to_string()];
        let bundle = renew(None, &sans, OffsetDateTime::now_utc(), Lifetimes::default())
            .unwrap()
            .unwrap();
        let secret = secret_from_bundle("kinfer-webhook-tls", "ns", &bundle);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(bundle_from_secret(&secret), Some(bundle));
        let mut partial = secret.clone();
        partial.data.as_mut().unwrap().remove("ca.key");
        assert_eq!(bundle_from_secret(&partial), None);
    }
}
