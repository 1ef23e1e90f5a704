//! A tiny in-memory Kubernetes API for unit tests of the kube I/O edges: objects by path,
//! GET/POST/PUT (with resourceVersion conflicts) and server-side-apply PATCH, plus a hook
//! that lets a test act as a racing replica.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use serde_json::{Value, json};
use warp::http::{Request, Response};

type Hook = Box<dyn FnMut(&str, &str, &mut BTreeMap<String, Value>) -> Option<u16> + Send>;

#[derive(Default)]
pub struct State {
    /// Objects by their item path, e.g. `/api/v1/namespaces/ns/secrets/name`.
    pub objects: BTreeMap<String, Value>,
    /// Every request: `METHOD path?query`.
    pub log: Vec<String>,
    /// Runs before each request with (method, path); may change objects and force a status.
    pub hook: Option<Hook>,
    next_rv: u64,
}

pub fn client() -> (kube::Client, Arc<Mutex<State>>) {
    let state = Arc::new(Mutex::new(State::default()));
    let s = state.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let s = s.clone();
        async move { Ok::<_, Infallible>(handle(s, req).await) }
    });
    (kube::Client::new(service, "default"), state)
}

fn status(code: u16, reason: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": reason, "reason": reason, "code": code});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn ok(code: u16, v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Body>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut st = state.lock().unwrap();
    st.log.push(format!("{method} {path}?{query}"));
    if let Some(mut hook) = st.hook.take() {
        let forced = hook(&method, &path, &mut st.objects);
        st.hook = Some(hook);
        if let Some(code) = forced {
            return status(code, "Conflict");
        }
    }
    st.next_rv += 1;
    let rv = st.next_rv.to_string();
    match method.as_str() {
        "GET" => match st.objects.get(&path) {
            Some(v) => ok(200, v),
            None => status(404, "NotFound"),
        },
        "POST" => {
            let mut v: Value = serde_json::from_slice(&body).unwrap();
            let item = format!("{path}/{}", v["metadata"]["name"].as_str().unwrap());
            if st.objects.contains_key(&item) {
                return status(409, "AlreadyExists");
            }
            v["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(item, v.clone());
            ok(201, &v)
        }
        "PUT" => {
            let mut v: Value = serde_json::from_slice(&body).unwrap();
            let have = st
                .objects
                .get(&path)
                .map(|o| o["metadata"]["resourceVersion"].clone());
            if have.is_none() {
                return status(404, "NotFound");
            }
            if have != Some(v["metadata"]["resourceVersion"].clone()) {
                return status(409, "Conflict");
            }
            v["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(path, v.clone());
            ok(200, &v)
        }
        "PATCH" => {
            let mut v: Value = serde_json::from_slice(&body).unwrap();
            v["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(path, v.clone());
            ok(200, &v)
        }
        _ => status(405, "MethodNotAllowed"),
    }
}
