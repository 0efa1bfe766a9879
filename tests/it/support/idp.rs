//! A scripted identity server on port 0 that answers like Curity, and JWTs to answer with.

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// The scripted identity server

/// What the IdP saw in one introspection request.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) token: String,
    pub(crate) authorization: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) accept: Option<String>,
    pub(crate) body: String,
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) delay: Duration,
}

impl Reply {
    pub(crate) fn status(status: u16) -> Self {
        Reply {
            status,
            headers: vec![],
            body: vec![],
            delay: Duration::ZERO,
        }
    }

    pub(crate) fn jwt(jwt: &str) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/jwt".into())],
            body: jwt.as_bytes().to_vec(),
            delay: Duration::ZERO,
        }
    }

    pub(crate) fn json(value: serde_json::Value) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
            delay: Duration::ZERO,
        }
    }

    pub(crate) fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    pub(crate) fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub(crate) fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A scripted identity server listening on 127.0.0.1:0.
pub(crate) struct Idp {
    pub(crate) addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Idp {
    pub(crate) async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Idp {
        let script: Arc<Script> = Arc::new(script);
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (calls.clone(), seen.clone());
        let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let (script, calls, seen) = (script.clone(), c.clone(), s.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let body = String::from_utf8_lossy(&body).into_owned();
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let request = Seen {
                    token: form_value(&body, "token").unwrap_or_default(),
                    authorization: header("authorization"),
                    content_type: header("content-type"),
                    accept: header("accept"),
                    body,
                };
                let reply = script(&request);
                seen.lock().unwrap().push(request);
                tokio::time::sleep(reply.delay).await;
                let mut response: Response = (
                    StatusCode::from_u16(reply.status).unwrap(),
                    reply.body.clone(),
                )
                    .into_response();
                for (name, value) in &reply.headers {
                    response.headers_mut().append(
                        axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        value.parse().unwrap(),
                    );
                }
                response
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Idp {
            addr,
            calls,
            seen,
            _task: task,
        }
    }

    /// The URL to pass as `--introspection-url`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}/oauth/v2/oauth-introspect", self.addr)
    }

    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Decodes one field of an x-www-form-urlencoded body.
fn form_value(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// A compact JWS-shaped JWT (unsigned signature bytes; phantom-authz does not verify, the API
/// does) with the given `exp` and subject, padded to about `size` bytes when asked.
pub(crate) fn make_jwt(sub: &str, exp: Option<u64>, size: usize) -> String {
    let mut claims = serde_json::json!({ "sub": sub, "iss": "https://idp.test" });
    if let Some(exp) = exp {
        claims["exp"] = exp.into();
    }
    let base = jwt_with(&claims);
    if base.len() < size {
        claims["pad"] = "x".repeat((size - base.len()) * 3 / 4).into();
    }
    jwt_with(&claims)
}

/// A compact JWS-shaped JWT whose payload is `claims` (unsigned signature bytes).
pub(crate) fn jwt_with(claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
