use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use warp::Filter;

use super::*;

fn t(s: &str) -> OffsetDateTime {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
}

fn day(n: i64) -> OffsetDateTime {
    t("2026-01-01T00:00:00Z") + time::Duration::days(n)
}

fn sans() -> Vec<String> {
    service_sans(
        "kinfer-webhook",
        "kinfer-system",
        &["127.0.0.1".to_string()],
    )
}

#[test]
fn rotation_when_less_than_a_third_is_left() {
    let cases = [
        (0, false),
        (19, false),
        (20, true), // 30-day cert: renew from day 20
        (29, true),
        (31, true),
        (-1, true), // not valid yet (clock skew): renew
    ];
    for (now, want) in cases {
        assert_eq!(needs_rotation(day(0), day(30), day(now)), want, "day {now}");
    }
}

#[test]
fn sans_cover_the_service_names_and_extras() {
    assert_eq!(
        sans(),
        [
            "kinfer-webhook.kinfer-system.svc",
            "kinfer-webhook.kinfer-system.svc.cluster.local",
            "127.0.0.1"
        ]
    );
    let b = renew(None, &sans(), day(0), Lifetimes::default())
        .unwrap()
        .unwrap();
    assert_eq!(sans_of(&b.cert_pem).unwrap(), sans());
    let (from, to) = validity(&b.cert_pem).unwrap();
    assert!(from <= day(0) && to == day(30), "{from} {to}");
    let (_, ca_to) = validity(&b.ca_pem).unwrap();
    assert_eq!(ca_to, day(365));
    certified_key(&b.cert_pem, &b.key_pem).unwrap();
}

#[test]
fn renewal_policy() {
    let lifetimes = Lifetimes::default();
    let b = renew(None, &sans(), day(0), lifetimes).unwrap().unwrap();
    assert_eq!(renewal(Some(&b), &sans(), day(1)), Renewal::Keep);
    assert!(
        renew(Some(&b), &sans(), day(1), lifetimes)
            .unwrap()
            .is_none()
    );

    // The serving certificate is due: same CA, new certificate.
    assert_eq!(renewal(Some(&b), &sans(), day(21)), Renewal::Serving);
    let b2 = renew(Some(&b), &sans(), day(21), lifetimes)
        .unwrap()
        .unwrap();
    assert_eq!(b2.ca_pem, b.ca_pem);
    assert_ne!(b2.cert_pem, b.cert_pem);
    assert_eq!(validity(&b2.cert_pem).unwrap().1, day(51));

    // A new SAN (e.g. --extra-san) reissues the serving certificate.
    let mut more = sans();
    more.push("webhook.example".into());
    assert_eq!(renewal(Some(&b), &more, day(1)), Renewal::Serving);

    // The CA is due: everything new, the old CA stays trusted while valid.
    assert_eq!(renewal(Some(&b), &sans(), day(250)), Renewal::All);
    let b3 = renew(Some(&b), &sans(), day(250), lifetimes)
        .unwrap()
        .unwrap();
    assert_ne!(b3.ca_key_pem, b.ca_key_pem);
    let cas: Vec<_> = CertificateDer::pem_slice_iter(b3.ca_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(cas.len(), 2);
    assert!(b3.ca_pem.ends_with(&b.ca_pem));

    // Garbage in the Secret: start over.
    let broken = CertBundle {
        ca_pem: "nonsense".into(),
        ..b.clone()
    };
    assert_eq!(renewal(Some(&broken), &sans(), day(1)), Renewal::All);
    let broken = CertBundle {
        key_pem: b2.key_pem.clone(),
        ..b.clone()
    };
    assert_eq!(renewal(Some(&broken), &sans(), day(1)), Renewal::Serving);
}

/// One HTTPS request over a fresh connection that trusts only `ca_pem`; returns the status,
/// body and the certificate the server presented.
async fn request(
    addr: SocketAddr,
    ca_pem: &str,
    body: &'static str,
) -> anyhow::Result<(u16, String, CertificateDer<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::post("/echo")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::from(body)))?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8(body.to_vec())?, presented))
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn serves_over_tls_and_rotates_without_restart() {
    let now = OffsetDateTime::now_utc();
    let lifetimes = Lifetimes::default();
    // A CA and certificate near the end of a short life, so they are due now.
    let short = Lifetimes {
        ca: Duration::from_secs(60),
        serving: Duration::from_secs(60),
    };
    let first = renew(None, &sans(), now - time::Duration::seconds(50), short)
        .unwrap()
        .unwrap();
    assert_eq!(renewal(Some(&first), &sans(), now), Renewal::All);
    let resolver = CertResolver::new(certified_key(&first.cert_pem, &first.key_pem).unwrap());
    let config = server_config(resolver.clone()).unwrap();
    let listener = crate::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let filter = warp::post()
        .and(warp::path("echo"))
        .and(warp::body::bytes())
        .map(|b: Bytes| String::from_utf8_lossy(&b).to_uppercase())
        .recover(|_| async { Ok::<_, std::convert::Infallible>("rejected".to_string()) });
    let stop = tokio_util_free_notify();
    let server = tokio::spawn(crate::server::serve_tls(
        listener,
        config,
        filter,
        stop.clone().notified_owned(),
    ));

    let (status, body, presented) = request(addr, &first.ca_pem, "hello").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "HELLO"));
    assert_eq!(presented, der_of(&first.cert_pem));

    // Rotate everything (new CA): swap the resolver, no restart.
    let second = renew(Some(&first), &sans(), now, lifetimes)
        .unwrap()
        .unwrap();
    resolver.swap(certified_key(&second.cert_pem, &second.key_pem).unwrap());

    // The new bundle (new CA + old CA) verifies the new certificate…
    let (status, _, presented) = request(addr, &second.ca_pem, "again").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(presented, der_of(&second.cert_pem));
    // …and a client that only knows the old CA now fails the handshake.
    let err = request(addr, &first.ca_pem, "x").await.unwrap_err();
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");

    stop.notify_one();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn refuses_tls_1_1_and_plaintext() {
    let b = renew(
        None,
        &sans(),
        OffsetDateTime::now_utc(),
        Lifetimes::default(),
    )
    .unwrap()
    .unwrap();
    let config = server_config(CertResolver::new(
        certified_key(&b.cert_pem, &b.key_pem).unwrap(),
    ))
    .unwrap();
    assert!(config.alpn_protocols.contains(&b"h2".to_vec()));
    let listener = crate::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let filter = warp::any().map(|| "ok");
    let stop = tokio_util_free_notify();
    tokio::spawn(crate::server::serve_tls(
        listener,
        config,
        filter,
        stop.clone().notified_owned(),
    ));
    // Plain HTTP gets no HTTP answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    stop.notify_one();
}

#[tokio::test]
async fn certificate_files_are_reloaded_when_they_change() {
    let dir = std::env::temp_dir().join(format!("kinfer-webhook-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = CertFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: Some(dir.join("ca.crt")),
    };
    let write = |b: &CertBundle| {
        std::fs::write(&files.cert, &b.cert_pem).unwrap();
        std::fs::write(&files.key, &b.key_pem).unwrap();
        std::fs::write(files.ca.as_ref().unwrap(), &b.ca_pem).unwrap();
    };
    let now = OffsetDateTime::now_utc();
    let first = renew(None, &sans(), now, Lifetimes::default())
        .unwrap()
        .unwrap();
    write(&first);
    let contents = files.read().await.unwrap();
    let resolver = CertResolver::new(contents.certified_key().unwrap());
    let (ca_tx, mut ca_rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util_free_notify();
    tokio::spawn(watch_files(
        files.clone(),
        contents,
        resolver.clone(),
        Duration::from_millis(20),
        move |ca| ca_tx.send(ca).unwrap(),
        stop.clone().notified_owned(),
    ));

    // A half-written pair (new cert, old key) is not loaded…
    let second = renew(None, &sans(), now, Lifetimes::default())
        .unwrap()
        .unwrap();
    std::fs::write(&files.cert, &second.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(resolver.current().cert[0], der_of(&first.cert_pem));
    // …the complete one is.
    write(&second);
    let ca = tokio::time::timeout(Duration::from_secs(5), ca_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ca, second.ca_pem.as_bytes());
    assert_eq!(resolver.current().cert[0], der_of(&second.cert_pem));
    stop.notify_one();
    let _ = std::fs::remove_dir_all(&dir);
}

fn tokio_util_free_notify() -> Arc<tokio::sync::Notify> {
    Arc::new(tokio::sync::Notify::new())
}

#[test]
fn short_lived_certificates_are_not_due_at_once() {
    // A 20 s certificate backdated by 5 minutes would be "due" from the start and renewed
    // at every check; the backdating is capped at a tenth of the lifetime.
    let now = OffsetDateTime::now_utc();
    let short = Lifetimes {
        ca: Duration::from_secs(365 * 24 * 3600),
        serving: Duration::from_secs(20),
    };
    let b = renew(None, &sans(), now, short).unwrap().unwrap();
    let (from, to) = validity(&b.cert_pem).unwrap();
    assert_eq!(to - from, time::Duration::seconds(22));
    assert_eq!(renewal(Some(&b), &sans(), now), Renewal::Keep);
    assert_eq!(
        renewal(Some(&b), &sans(), now + time::Duration::seconds(10)),
        Renewal::Keep
    );
    assert_eq!(
        renewal(Some(&b), &sans(), now + time::Duration::seconds(14)),
        Renewal::Serving
    );
    // Long-lived ones keep the 5-minute margin.
    let (ca_from, _) = validity(&b.ca_pem).unwrap();
    assert!(now - ca_from >= time::Duration::minutes(5) - time::Duration::seconds(1));
}
