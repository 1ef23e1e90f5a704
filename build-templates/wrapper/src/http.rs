//! The HTTP API: Open Inference Protocol v2 REST, KServe v1 and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Buf, Filter, Rejection, Reply};

use crate::error::ApiError;
use crate::metrics::{InFlight, Metrics};
use crate::pool::{Arriving, Pool};
use crate::tensor::{DataView, Tensor};

/// The name v1 `instances` get as the handler's one input.
pub const V1_INPUT: &str = "input-0";

pub struct App {
    pub model: String,
    pub version: String,
    pub pool: Pool,
    pub metrics: Metrics,
    pub max_body: usize,
    /// Set on SIGTERM: readiness turns false while in-flight requests finish.
    pub draining: AtomicBool,
}

impl App {
    fn not_ready_reason(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Some("the server is shutting down")
        } else if self.pool.ready_workers() == 0 {
            Some("no Python worker is ready (loading or restarting)")
        } else {
            None
        }
    }

    fn check_model(&self, name: &str, version: Option<&str>) -> Result<(), ApiError> {
        if name != self.model {
            return Err(ApiError::NotFound(format!(
                "model {name:?} not found; this server serves {:?}",
                self.model
            )));
        }
        match version {
            Some(v) if v != self.version => Err(ApiError::NotFound(format!(
                "model {name:?} has no version {v:?}; it serves version {:?}",
                self.version
            ))),
            _ => Ok(()),
        }
    }

    fn check_ready(&self) -> Result<(), ApiError> {
        match self.not_ready_reason() {
            Some(reason) => Err(ApiError::Unavailable(reason.to_string())),
            None => Ok(()),
        }
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => warp::http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(bytes.into())
            .expect("static headers are valid"),
        Err(e) => error_response(&ApiError::Internal(format!("encoding the answer: {e}"))),
    }
}

fn error_response(e: &ApiError) -> Response {
    json(e.status(), &serde_json::json!({ "error": e.to_string() }))
}

#[derive(Deserialize)]
struct V2Request {
    id: Option<String>,
    inputs: Vec<V2Input>,
    outputs: Option<Vec<V2RequestedOutput>>,
}

#[derive(Deserialize)]
struct V2Input {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct V2RequestedOutput {
    name: String,
}

#[derive(Serialize)]
struct V2Response<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<V2Output<'a>>,
}

#[derive(Serialize)]
struct V2Output<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    data: DataView<'a>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::BadRequest(format!("invalid request: {e}")),
        _ => ApiError::BadRequest(format!("malformed JSON: {e}")),
    })
}

/// Reads the body up to `limit` bytes; a Content-Length above it fails before reading.
async fn read_body<S, B>(
    content_length: Option<u64>,
    body: S,
    limit: usize,
) -> Result<Vec<u8>, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut body = std::pin::pin!(body);
    let mut out = Vec::with_capacity(content_length.unwrap_or(0) as usize);
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if out.len() + chunk.remaining() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out)
}

async fn infer_v2(
    app: &App,
    arriving: Arriving,
    version: Option<&str>,
    body: Vec<u8>,
) -> Result<Response, ApiError> {
    let req: V2Request = parse_json(&body)?;
    drop(body);
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in &req.inputs {
        if inputs.iter().any(|t: &Tensor| t.name == input.name) {
            return Err(ApiError::BadRequest(format!(
                "input {:?} appears twice",
                input.name
            )));
        }
        inputs.push(
            Tensor::from_v2(&input.name, &input.datatype, &input.shape, &input.data)
                .map_err(ApiError::BadRequest)?,
        );
    }
    app.check_ready()?;
    let outputs = app.pool.infer(arriving, inputs).await?;
    let chosen: Vec<&Tensor> = match &req.outputs {
        None => outputs.iter().collect(),
        Some(wanted) => wanted
            .iter()
            .map(|w| {
                outputs.iter().find(|t| t.name == w.name).ok_or_else(|| {
                    let have: Vec<&str> = outputs.iter().map(|t| t.name.as_str()).collect();
                    ApiError::BadRequest(format!(
                        "requested output {:?} is not among the model's outputs {have:?}",
                        w.name
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let response = V2Response {
        model_name: &app.model,
        model_version: version.unwrap_or(&app.version),
        id: req.id,
        outputs: chosen
            .into_iter()
            .map(|t| V2Output {
                name: &t.name,
                datatype: t.datatype.as_str(),
                shape: &t.shape,
                data: t.flat(),
            })
            .collect(),
    };
    Ok(json(StatusCode::OK, &response))
}

async fn predict_v1(app: &App, arriving: Arriving, body: Vec<u8>) -> Result<Response, ApiError> {
    let req: Value = parse_json(&body)?;
    drop(body);
    let instances = req
        .get("instances")
        .filter(|v| v.is_array())
        .ok_or_else(|| ApiError::BadRequest("a v1 request needs an \"instances\" array".into()))?;
    let input = Tensor::from_instances(V1_INPUT, instances).map_err(ApiError::BadRequest)?;
    app.check_ready()?;
    let outputs = app.pool.infer(arriving, vec![input]).await?;
    let predictions = match outputs.as_slice() {
        [one] => serde_json::to_value(one.nested()),
        many => {
            // Several outputs: one object per row, as KServe v1 clients expect a list.
            let rows = many
                .first()
                .and_then(|t| t.shape.first().copied())
                .unwrap_or(0);
            if many.iter().any(|t| t.shape.first() != Some(&rows)) {
                return Err(ApiError::Internal(
                    "for v1, the handler's outputs must all have the same first dimension".into(),
                ));
            }
            (0..rows)
                .map(|i| {
                    many.iter()
                        .map(|t| Ok((t.name.clone(), serde_json::to_value(t.row(i).nested())?)))
                        .collect::<Result<serde_json::Map<_, _>, serde_json::Error>>()
                        .map(Value::Object)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
    }
    .map_err(|e| ApiError::Internal(format!("encoding predictions: {e}")))?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "predictions": predictions }),
    ))
}

enum Call {
    V2 {
        name: String,
        version: Option<String>,
    },
    V1 {
        name: String,
    },
}

/// Runs one inference request end to end and records its metrics.
async fn handle_infer<S, B>(
    app: Arc<App>,
    call: Call,
    content_length: Option<u64>,
    body: S,
) -> Result<Response, Infallible>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let _in_flight = InFlight::new(&app.metrics.in_flight);
    let started = Instant::now();
    let protocol = match call {
        Call::V2 { .. } => "v2",
        Call::V1 { .. } => "v1",
    };
    let result = async {
        match call {
            Call::V2 { name, version } => {
                app.check_model(&name, version.as_deref())?;
                let arriving = app.pool.arriving();
                let body = read_body(content_length, body, app.max_body).await?;
                infer_v2(&app, arriving, version.as_deref(), body).await
            }
            Call::V1 { name } => {
                let Some(name) = name.strip_suffix(":predict") else {
                    return Err(ApiError::NotFound(format!(
                        "no such v1 endpoint {name:?}; use POST /v1/models/{}:predict",
                        app.model
                    )));
                };
                app.check_model(name, None)?;
                let arriving = app.pool.arriving();
                let body = read_body(content_length, body, app.max_body).await?;
                predict_v1(&app, arriving, body).await
            }
        }
    }
    .await;
    let response = result.unwrap_or_else(|e| {
        app.metrics.errors.with_label_values(&[e.kind()]).inc();
        if e.status().is_server_error() {
            tracing::warn!(protocol, error = %e, "inference failed");
        }
        error_response(&e)
    });
    app.metrics
        .requests
        .with_label_values(&[protocol, response.status().as_str()])
        .inc();
    app.metrics
        .request_duration
        .with_label_values(&[protocol])
        .observe(started.elapsed().as_secs_f64());
    Ok(response)
}

fn with_app(app: Arc<App>) -> impl Filter<Extract = (Arc<App>,), Error = Infallible> + Clone {
    warp::any().map(move || app.clone())
}

fn readiness(app: &App, name: Option<&str>) -> Response {
    if let Some(name) = name
        && let Err(e) = app.check_model(name, None)
    {
        return error_response(&e);
    }
    match app.not_ready_reason() {
        None => match name {
            Some(name) => json(
                StatusCode::OK,
                &serde_json::json!({ "name": name, "ready": true }),
            ),
            None => json(StatusCode::OK, &serde_json::json!({ "ready": true })),
        },
        Some(reason) => error_response(&ApiError::Unavailable(reason.to_string())),
    }
}

fn model_metadata(app: &App, name: &str, version: Option<&str>) -> Response {
    if let Err(e) = app.check_model(name, version) {
        return error_response(&e);
    }
    // A Python function declares no signature, so inputs and outputs are open.
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": app.model,
            "versions": [app.version],
            "platform": "python",
            "inputs": [],
            "outputs": [],
        }),
    )
}

pub fn routes(app: Arc<App>) -> BoxedFilter<(Response,)> {
    let a = || with_app(app.clone());

    let server_meta = warp::path!("v2").map(|| {
        json(
            StatusCode::OK,
            &serde_json::json!({
                "name": "kinfer-wrapper",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": [],
            }),
        )
    });
    let live = warp::path!("v2" / "health" / "live")
        .map(|| json(StatusCode::OK, &serde_json::json!({ "live": true })));
    let ready = warp::path!("v2" / "health" / "ready")
        .and(a())
        .map(|app: Arc<App>| readiness(&app, None));
    let model_ready = warp::path!("v2" / "models" / String / "ready")
        .and(a())
        .map(|name: String, app: Arc<App>| readiness(&app, Some(&name)));
    let version_ready = warp::path!("v2" / "models" / String / "versions" / String / "ready")
        .and(a())
        .map(|name: String, version: String, app: Arc<App>| {
            match app.check_model(&name, Some(&version)) {
                Ok(()) => readiness(&app, Some(&name)),
                Err(e) => error_response(&e),
            }
        });
    let model_meta = warp::path!("v2" / "models" / String)
        .and(a())
        .map(|name: String, app: Arc<App>| model_metadata(&app, &name, None));
    let version_meta = warp::path!("v2" / "models" / String / "versions" / String)
        .and(a())
        .map(|name: String, version: String, app: Arc<App>| {
            model_metadata(&app, &name, Some(&version))
        });
    let v1_list = warp::path!("v1" / "models").and(a()).map(|app: Arc<App>| {
        json(
            StatusCode::OK,
            &serde_json::json!({ "models": [app.model] }),
        )
    });
    let v1_status =
        warp::path!("v1" / "models" / String)
            .and(a())
            .map(|name: String, app: Arc<App>| {
                if let Err(e) = app.check_model(&name, None) {
                    return error_response(&e);
                }
                let ready = app.not_ready_reason().is_none();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(status, &serde_json::json!({ "name": name, "ready": ready }))
            });
    let metrics = warp::path!("metrics")
        .and(a())
        .map(|app: Arc<App>| match app.metrics.render() {
            Ok((content_type, body)) => warp::http::Response::builder()
                .header("content-type", content_type)
                .body(body.into())
                .expect("valid content type"),
            Err(e) => error_response(&ApiError::Internal(e.to_string())),
        });

    let gets = server_meta
        .or(live)
        .unify()
        .or(ready)
        .unify()
        .or(model_ready)
        .unify()
        .or(version_ready)
        .unify()
        .or(model_meta)
        .unify()
        .or(version_meta)
        .unify()
        .or(v1_list)
        .unify()
        .or(v1_status)
        .unify()
        .or(metrics)
        .unify()
        .and(warp::get())
        .boxed();

    let body = || warp::header::optional::<u64>("content-length").and(warp::body::stream());
    let infer = warp::path!("v2" / "models" / String / "infer")
        .map(|name| Call::V2 {
            name,
            version: None,
        })
        .or(
            warp::path!("v2" / "models" / String / "versions" / String / "infer").map(
                |name, version| Call::V2 {
                    name,
                    version: Some(version),
                },
            ),
        )
        .unify()
        .or(warp::path!("v1" / "models" / String).map(|name| Call::V1 { name }))
        .unify();
    // Path before method, so an unknown path is a 404 rather than a 405.
    let posts = infer
        .and(warp::post())
        .and(a())
        .and(body())
        .then(|call, app, length, body| handle_infer(app, call, length, body))
        .map(|r: Result<Response, Infallible>| match r {
            Ok(response) => response,
            Err(never) => match never {},
        })
        .boxed();

    gets.or(posts).unify().recover(recover).unify().boxed()
}

/// Turns warp's rejections (no route, wrong method, bad header) into JSON errors.
async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let (status, msg) = if rejection.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "no such endpoint; see /v2 and /v1/models".to_string(),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this endpoint".to_string(),
        )
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        (StatusCode::BAD_REQUEST, e.to_string())
    } else {
        (StatusCode::BAD_REQUEST, format!("{rejection:?}"))
    };
    Ok(json(status, &serde_json::json!({ "error": msg })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{self, PoolConfig, WorkerScript};
    use std::time::Duration;

    /// Routes over a pool with no workers: everything up to the handler call, in-process.
    fn app() -> Arc<App> {
        let metrics = Metrics::new().unwrap();
        let (pool, _handle, _fatal) = pool::start(
            PoolConfig {
                python: "python3".into(),
                script: WorkerScript::Inline,
                module: "m".into(),
                function: "f".into(),
                workers: 0,
                max_batch_size: 1,
                max_batch_delay: Duration::ZERO,
            },
            metrics.clone(),
        );
        Arc::new(App {
            model: "m".into(),
            version: "1".into(),
            pool,
            metrics,
            max_body: 100,
            draining: AtomicBool::new(false),
        })
    }

    async fn call(app: &Arc<App>, method: &str, path: &str, body: &str) -> (u16, Value) {
        let res = warp::test::request()
            .method(method)
            .path(path)
            .body(body)
            .reply(&routes(app.clone()))
            .await;
        let json = serde_json::from_slice(res.body()).unwrap_or(Value::Null);
        (res.status().as_u16(), json)
    }

    #[tokio::test]
    async fn statuses_before_the_handler() {
        let app = app();
        let valid = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let cases = [
            ("GET", "/v2/health/live", "", 200, ""),
            (
                "GET",
                "/v2/health/ready",
                "",
                503,
                "no Python worker is ready",
            ),
            (
                "GET",
                "/v2/models/m/ready",
                "",
                503,
                "no Python worker is ready",
            ),
            (
                "GET",
                "/v2/models/x/ready",
                "",
                404,
                "model \"x\" not found",
            ),
            (
                "GET",
                "/v2/models/m/versions/2",
                "",
                404,
                "no version \"2\"",
            ),
            (
                "POST",
                "/v2/models/x/infer",
                valid,
                404,
                "model \"x\" not found",
            ),
            (
                "POST",
                "/v1/models/x:predict",
                "{}",
                404,
                "model \"x\" not found",
            ),
            ("POST", "/v2/models/m/infer", "{", 400, "malformed JSON"),
            (
                "POST",
                "/v2/models/m/infer",
                &"x".repeat(101),
                413,
                "limit of 100 bytes",
            ),
            (
                "POST",
                "/v2/models/m/infer",
                valid,
                503,
                "no Python worker is ready",
            ),
            ("GET", "/v2/models/m/infer", "", 405, "method not allowed"),
            ("GET", "/nowhere", "", 404, "no such endpoint"),
        ];
        for (method, path, body, status, message) in cases {
            let (got, json) = call(&app, method, path, body).await;
            assert_eq!(got, status, "{method} {path}: {json}");
            if !message.is_empty() {
                let error = json["error"].as_str().unwrap_or_default();
                assert!(error.contains(message), "{method} {path}: {error}");
            }
        }
        let errors = app.metrics.errors.with_label_values(&["too_large"]).get();
        assert_eq!(errors, 1);
    }

    #[tokio::test]
    async fn draining_turns_readiness_off() {
        let app = app();
        app.draining.store(true, Ordering::Relaxed);
        let (status, json) = call(&app, "GET", "/v2/health/ready", "").await;
        assert_eq!(status, 503);
        assert_eq!(json["error"], "the server is shutting down");
    }
}
