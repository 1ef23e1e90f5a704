//! A small HTTP/1 client for the sources (Prometheus' API, pod metric endpoints).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Responses larger than this are refused (a Prometheus answer for 10 000 pods is ~1 MiB).
const MAX_BODY: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0:?}")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client, timeout }
    }

    /// GETs `url` and returns the body of a 2xx answer.
    pub async fn get(&self, url: &str, accept: &str) -> Result<Bytes, HttpError> {
        let uri: hyper::Uri = url.parse().map_err(|_| HttpError::Url(url.to_string()))?;
        let req = hyper::Request::get(uri)
            .header(hyper::header::ACCEPT, accept)
            .body(Empty::new())
            .map_err(|e| HttpError::Url(e.to_string()))?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| HttpError::Transport(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| HttpError::Timeout(self.timeout))??;
        if !status.is_success() {
            let mut text = String::from_utf8_lossy(&body).into_owned();
            text.truncate(512);
            return Err(HttpError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        Ok(body)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
