//! TLS for the admission server: a self-managed CA and serving certificate (issued with
//! rcgen, rotated before expiry), a rustls certificate resolver that swaps certificates
//! without a restart, and certificate files reloaded when they change.
//!
//! Rotation rule: a certificate is renewed once less than a third of its lifetime is left.
//! When the CA itself is renewed, the trust bundle keeps the previous CA until it expires, so
//! the apiserver trusts both while the new `caBundle` and the new serving certificate spread.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// Lifetimes of what the webhook issues itself.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub ca: Duration,
    pub serving: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ca: Duration::from_secs(365 * 24 * 3600),
            serving: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What the webhook keeps in its Secret: a CA, the serving certificate it signed, and the
/// trust bundle to publish as `caBundle` (the current CA first, then any previous one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertBundle {
    /// PEM, one or two CA certificates; the first signed `cert_pem`.
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The DNS names of a webhook Service, plus extra SANs (e.g. `127.0.0.1` for local runs).
pub fn service_sans(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    for s in extra {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    sans
}

/// How far before `now` a certificate is made valid (clock skew between replicas and
/// apiservers): 5 minutes, but at most a tenth of its lifetime, so the backdating never eats
/// into the renewal window of a short-lived certificate.
fn backdate(lifetime: Duration) -> time::Duration {
    time::Duration::minutes(5)
        .min(time::Duration::try_from(lifetime / 10).unwrap_or(time::Duration::ZERO))
}

/// Issues a new CA valid from a little before `now`.
pub fn issue_ca(now: OffsetDateTime, lifetime: Duration) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("kinfer-webhook-ca-{}", now.unix_timestamp()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - backdate(lifetime);
    params.not_after = now + lifetime;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a serving certificate for `sans`, signed by the CA.
pub fn issue_serving(
    ca_pem: &str,
    ca_key_pem: &str,
    sans: &[String],
    now: OffsetDateTime,
    lifetime: Duration,
) -> anyhow::Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("reading the CA key")?;
    let first_ca = first_pem_block(ca_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&first_ca, ca_key).context("reading the CA")?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        sans.first()
            .cloned()
            .unwrap_or_else(|| "kinfer-webhook".into()),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - backdate(lifetime);
    // Never outlive the CA that signs it.
    let ca_end = validity(&first_ca)?.1;
    params.not_after = (now + lifetime).min(ca_end);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn first_pem_block(pem: &str) -> anyhow::Result<String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .context("no certificate in PEM")??;
    Ok(pem_encode(&der))
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// `(not_before, not_after)` of the first certificate in `pem`.
pub fn validity(pem: &str) -> anyhow::Result<(OffsetDateTime, OffsetDateTime)> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .context("no certificate in PEM")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("parsing the certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

/// DNS names and IP addresses of the first certificate in `pem`.
pub fn sans_of(pem: &str) -> anyhow::Result<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .context("no certificate in PEM")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("parsing the certificate: {e}"))?;
    let mut out = Vec::new();
    if let Some(san) = cert.subject_alternative_name()? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.push(d.to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => out.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip)?).to_string()),
                    16 => {
                        out.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip)?).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Whether a certificate valid over `[not_before, not_after]` is due for renewal at `now`:
/// less than a third of its lifetime is left (or it is not valid yet).
pub fn needs_rotation(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    let lifetime = not_after - not_before;
    now < not_before || now >= not_after - lifetime / 3
}

/// What to do with the bundle found in the Secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Good as it is.
    Keep,
    /// Same CA, new serving certificate (it is due, or the SANs changed).
    Serving,
    /// New CA and serving certificate (none yet, unreadable, or the CA is due).
    All,
}

/// Decides what to renew. Pure, so the rotation policy is unit-tested.
pub fn renewal(existing: Option<&CertBundle>, sans: &[String], now: OffsetDateTime) -> Renewal {
    let Some(b) = existing else {
        return Renewal::All;
    };
    let Ok((ca_from, ca_to)) = validity(&b.ca_pem) else {
        return Renewal::All;
    };
    if needs_rotation(ca_from, ca_to, now) || KeyPair::from_pem(&b.ca_key_pem).is_err() {
        return Renewal::All;
    }
    let serving_ok = match (validity(&b.cert_pem), sans_of(&b.cert_pem)) {
        (Ok((from, to)), Ok(have)) => {
            !needs_rotation(from, to, now) && sans.iter().all(|s| have.contains(s))
        }
        _ => false,
    };
    if serving_ok && certified_key(&b.cert_pem, &b.key_pem).is_ok() {
        Renewal::Keep
    } else {
        Renewal::Serving
    }
}

/// Applies [`renewal`]: `None` when the existing bundle is kept.
pub fn renew(
    existing: Option<&CertBundle>,
    sans: &[String],
    now: OffsetDateTime,
    lifetimes: Lifetimes,
) -> anyhow::Result<Option<CertBundle>> {
    match renewal(existing, sans, now) {
        Renewal::Keep => Ok(None),
        Renewal::Serving => {
            let b = existing.expect("Serving implies an existing bundle");
            let (cert_pem, key_pem) =
                issue_serving(&b.ca_pem, &b.ca_key_pem, sans, now, lifetimes.serving)?;
            Ok(Some(CertBundle {
                cert_pem,
                key_pem,
                ..b.clone()
            }))
        }
        Renewal::All => {
            let (ca, ca_key_pem) = issue_ca(now, lifetimes.ca)?;
            let (cert_pem, key_pem) =
                issue_serving(&ca, &ca_key_pem, sans, now, lifetimes.serving)?;
            // Keep trusting the previous CA while it is valid: serving certificates it
            // signed may still be in use by other replicas.
            let mut ca_pem = ca;
            if let Some(old) = existing.and_then(|b| first_pem_block(&b.ca_pem).ok())
                && validity(&old).is_ok_and(|(_, to)| to > now)
            {
                ca_pem.push_str(&old);
            }
            Ok(Some(CertBundle {
                ca_pem,
                ca_key_pem,
                cert_pem,
                key_pem,
            }))
        }
    }
}

/// A rustls signing key and chain from PEM.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    if chain.is_empty() {
        bail!("no certificate in the certificate PEM");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("reading the key PEM")?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .context("the key does not fit the certificate")?;
    Ok(Arc::new(certified))
}

/// Serves whatever certificate was stored last; swapping needs no restart and affects new
/// handshakes only.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::new(key),
        })
    }

    pub fn swap(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// TLS 1.2 and 1.3 only, no client authentication, ALPN h2 and http/1.1.
pub fn server_config(resolver: Arc<CertResolver>) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Certificate files (e.g. a cert-manager Secret volume), re-read on every poll: comparing
/// contents, not mtimes, also catches a Secret volume's `..data` symlink swap.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Trust bundle to publish as `caBundle`; without it the field is left to others
    /// (e.g. cert-manager's CA injector).
    pub ca: Option<PathBuf>,
}

/// What the files held at the last read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileContents {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Option<Vec<u8>>,
}

impl CertFiles {
    pub async fn read(&self) -> anyhow::Result<FileContents> {
        let read = |p: PathBuf| async move {
            tokio::fs::read(&p)
                .await
                .with_context(|| format!("reading {}", p.display()))
        };
        Ok(FileContents {
            cert: read(self.cert.clone()).await?,
            key: read(self.key.clone()).await?,
            ca: match &self.ca {
                Some(p) => Some(read(p.clone()).await?),
                None => None,
            },
        })
    }
}

impl FileContents {
    pub fn certified_key(&self) -> anyhow::Result<Arc<CertifiedKey>> {
        certified_key(
            std::str::from_utf8(&self.cert).context("certificate file is not PEM text")?,
            std::str::from_utf8(&self.key).context("key file is not PEM text")?,
        )
    }
}

/// Polls the files every `every` and swaps the resolver's certificate when they change
/// (a half-written pair that does not parse is skipped until the next poll). Calls
/// `on_ca_change` with a new trust bundle. Ends when `shutdown` resolves.
pub async fn watch_files(
    files: CertFiles,
    mut last: FileContents,
    resolver: Arc<CertResolver>,
    every: Duration,
    on_ca_change: impl Fn(Vec<u8>),
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut shutdown => return,
        }
        let now = match files.read().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("certificate files: {e:#}");
                continue;
            }
        };
        if now == last {
            continue;
        }
        match now.certified_key() {
            Ok(key) => {
                resolver.swap(key);
                tracing::info!(cert = %files.cert.display(), "serving certificate reloaded");
                if now.ca != last.ca
                    && let Some(ca) = &now.ca
                {
                    on_ca_change(ca.clone());
                }
                last = now;
            }
            Err(e) => tracing::warn!("certificate files changed but do not load yet: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests;
