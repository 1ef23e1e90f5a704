//! The Prometheus source: one instant query per signal over Prometheus' HTTP API
//! (`GET /api/v1/query`), each answering one series per pod, labelled `namespace` and `pod`.
//! One query covers every pod of every revision, so the cost does not grow with the number of
//! revisions.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::http::{HttpClient, HttpError};
use crate::signals::{PodKey, Signal};

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("Prometheus refused the query ({kind}): {message}")]
    Api { kind: String, message: String },
    #[error("not a Prometheus API answer: {0}")]
    Decode(String),
    #[error("the query returned a {0}, not an instant vector with one series per pod")]
    NotAVector(String),
}

impl PromError {
    /// The `reason` label of the failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            PromError::Http(HttpError::Timeout(_)) => "timeout",
            PromError::Http(HttpError::Status { .. }) => "http_status",
            PromError::Http(_) => "unreachable",
            PromError::Api { .. } => "query_error",
            PromError::Decode(_) => "decode",
            PromError::NotAVector(_) => "not_a_vector",
        }
    }
}

/// A parsed answer: the value per pod and how many series had to be skipped.
#[derive(Debug, Default, PartialEq)]
pub struct PodValues {
    pub values: HashMap<PodKey, f64>,
    /// Series without `namespace` and `pod` labels, or with a value that is not a number.
    pub skipped: usize,
}

// Borrowed from the answer's bytes where JSON allows (`Cow`), and only the labels used are
// kept: a 10 000-series answer is parsed every collection, so no per-series label map.
#[derive(Deserialize)]
struct Answer<'a> {
    status: String,
    #[serde(default, borrow)]
    data: Option<Data<'a>>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data<'a> {
    #[serde(rename = "resultType")]
    result_type: String,
    #[serde(borrow)]
    result: &'a RawValue,
}

#[derive(Deserialize)]
struct Sample<'a> {
    #[serde(default, borrow)]
    metric: Labels<'a>,
    #[serde(borrow)]
    value: (IgnoredAny, Cow<'a, str>),
}

#[derive(Deserialize, Default)]
struct Labels<'a> {
    #[serde(default, borrow)]
    namespace: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pod: Option<Cow<'a, str>>,
}

/// Parses an answer of `/api/v1/query`. Duplicate series for one pod are added up.
pub fn parse_vector(body: &[u8]) -> Result<PodValues, PromError> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| PromError::Decode(e.to_string()))?;
    if answer.status != "success" {
        return Err(PromError::Api {
            kind: answer.error_type.unwrap_or_else(|| answer.status.clone()),
            message: answer.error.unwrap_or_default(),
        });
    }
    let data = answer
        .data
        .ok_or_else(|| PromError::Decode("status success without data".into()))?;
    if data.result_type != "vector" {
        return Err(PromError::NotAVector(data.result_type));
    }
    let samples: Vec<Sample> =
        serde_json::from_str(data.result.get()).map_err(|e| PromError::Decode(e.to_string()))?;
    let mut out = PodValues::default();
    out.values.reserve(samples.len());
    for s in samples {
        let (Some(ns), Some(pod)) = (s.metric.namespace, s.metric.pod) else {
            out.skipped += 1;
            continue;
        };
        // Prometheus writes NaN, +Inf and -Inf as strings too; they carry no load.
        match s.value.1.parse::<f64>() {
            Ok(v) if v.is_finite() => {
                *out.values.entry(PodKey::new(ns, pod)).or_default() += v;
            }
            _ => out.skipped += 1,
        }
    }
    Ok(out)
}

/// Queries a Prometheus server.
#[derive(Clone)]
pub struct PromSource {
    pub base_url: String,
    pub queries: Vec<(Signal, String)>,
    pub http: HttpClient,
}

impl PromSource {
    pub fn query_url(&self, query: &str) -> String {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .finish();
        format!("{}/api/v1/query?{q}", self.base_url.trim_end_matches('/'))
    }

    pub async fn query(&self, query: &str) -> Result<PodValues, PromError> {
        let body = self
            .http
            .get(&self.query_url(query), "application/json")
            .await?;
        parse_vector(&body)
    }

    /// Runs every signal's query at once.
    pub async fn collect(&self) -> Vec<(Signal, Result<PodValues, PromError>)> {
        let runs = self.queries.iter().map(|(signal, q)| async move {
            let r = self.query(q).await;
            (*signal, r)
        });
        futures::future::join_all(runs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_per_pod() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"namespace":"a","pod":"p1"},"value":[1767225600.123,"3"]},
            {"metric":{"namespace":"a","pod":"p2","container":"user"},"value":[1767225600.123,"0.5"]},
            {"metric":{"namespace":"a","pod":"p2","container":"other"},"value":[1767225600.123,"1"]},
            {"metric":{"pod":"no-namespace"},"value":[1767225600.123,"1"]},
            {"metric":{"namespace":"a","pod":"nan"},"value":[1767225600.123,"NaN"]},
            {"metric":{"namespace":"a","pod":"inf"},"value":[1767225600.123,"+Inf"]}
        ]}}"#;
        let got = parse_vector(body).unwrap();
        assert_eq!(got.values.len(), 2);
        assert_eq!(got.values[&PodKey::new("a", "p1")], 3.0);
        assert_eq!(got.values[&PodKey::new("a", "p2")], 1.5);
        assert_eq!(got.skipped, 3);
    }

    #[test]
    fn an_empty_answer_is_no_pods() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_vector(body).unwrap(), PodValues::default());
    }

    #[test]
    fn query_errors_name_the_cause() {
        let body = br#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:5: parse error: unexpected \")\""}"#;
        let err = parse_vector(body).unwrap_err();
        assert_eq!(err.reason(), "query_error");
        assert!(err.to_string().contains("bad_data") && err.to_string().contains("parse error"));
    }

    #[test]
    fn other_result_types_are_refused() {
        let scalar =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1767225600,"4"]}}"#;
        assert!(matches!(parse_vector(scalar), Err(PromError::NotAVector(t)) if t == "scalar"));
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"]]}]}}"#;
        assert!(matches!(
            parse_vector(matrix),
            Err(PromError::NotAVector(_))
        ));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        for body in [
            &b"<html>502 Bad Gateway</html>"[..],
            br#"{"status":"success"}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":"x"}]}}"#,
            b"",
        ] {
            let err = parse_vector(body).unwrap_err();
            assert_eq!(err.reason(), "decode", "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn queries_are_url_encoded() {
        let s = PromSource {
            base_url: "http://127.0.0.1:9090/".into(),
            queries: vec![],
            http: HttpClient::new(std::time::Duration::from_secs(1)),
        };
        assert_eq!(
            s.query_url(r#"sum by (namespace, pod) (x{a="b"})"#),
            "http://127.0.0.1:9090/api/v1/query?query=sum+by+%28namespace%2C+pod%29+%28x%7Ba%3D%22b%22%7D%29"
        );
    }

    /// Against a served answer: a failing server and a wrong content are errors, not zeros.
    #[tokio::test]
    async fn http_failures_are_errors() {
        use warp::Filter;
        let route = warp::path!("api" / "v1" / "query").map(|| {
            warp::reply::with_status("overloaded", warp::http::StatusCode::SERVICE_UNAVAILABLE)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        let s = PromSource {
            base_url: format!("http://{addr}"),
            queries: vec![(Signal::InFlight, "up".into())],
            http: HttpClient::new(std::time::Duration::from_secs(2)),
        };
        let err = s.query("up").await.unwrap_err();
        assert_eq!(err.reason(), "http_status");
        assert!(err.to_string().contains("503") && err.to_string().contains("overloaded"));
        let closed = PromSource {
            base_url: "http://127.0.0.1:1".into(),
            ..s
        };
        assert_eq!(
            closed.query("up").await.unwrap_err().reason(),
            "unreachable"
        );
    }
}
