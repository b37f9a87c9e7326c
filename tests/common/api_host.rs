//! A loopback HTTP front for handlers of the management API that the router does not serve yet:
//! `/api/v1/registries/{registry}/webhooks/...` goes to `berth::events::api::handle` with the
//! principal the test chooses, through real HTTP requests.

use std::sync::Arc;

use berth::auth::Principal;
use berth::registry::Req;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::task::JoinHandle;

/// Serves the webhook API of `app` on an ephemeral loopback port until dropped.
pub struct ApiHost {
    pub base: String,
    task: JoinHandle<()>,
}

impl Drop for ApiHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    app: Arc<berth::App>,
    principal: Principal,
    req: Request<Incoming>,
) -> Response<berth::http::body::Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let result = match segments.as_slice() {
        ["api", "v1", "registries", registry, "webhooks", rest @ ..] => {
            let req = Req {
                method: &parts.method,
                query: parts.uri.query(),
                headers: &parts.headers,
                principal: &principal,
                public: false,
            };
            berth::events::api::handle(&app, registry, rest, req, body).await
        }
        _ => Err(berth::error::Error::NotFound(format!(
            "no such endpoint: {path}"
        ))),
    };
    result.unwrap_or_else(|e| {
        let mut r = Response::new(berth::http::body::Body::full(e.body()));
        *r.status_mut() = e.status();
        r
    })
}

impl ApiHost {
    /// Starts the front for `app`; every request acts as `principal`.
    pub async fn start(app: Arc<berth::App>, principal: Principal) -> ApiHost {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let app = app.clone();
                let principal = principal.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (app, principal) = (app.clone(), principal.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(serve(app, principal, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ApiHost { base, task }
    }

    /// `BASE/api/v1/registries/{registry}/webhooks{rest}`.
    pub fn url(&self, registry: &str, rest: &str) -> String {
        format!("{}/api/v1/registries/{registry}/webhooks{rest}", self.base)
    }
}
