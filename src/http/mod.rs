//! The HTTP side: routing every request, the REST API, and the checks that
//! let a WebSocket upgrade through (or answer it with an HTTP error before
//! any socket exists). No socket state lives here.

pub mod console;
mod cors;
mod openapi;
mod rest;
mod upgrade;

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::auth::{self, AuthError, Identity};
use crate::state::Shared;

pub type Body = Full<Bytes>;

/// An HTTP error answer: `{"error": code, "detail": text}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: Cow<'static, str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }
    pub fn unauthorized(e: AuthError) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }
    pub fn forbidden(detail: &'static str) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found(detail: &'static str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    pub fn invalid_field(detail: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", detail)
    }
    pub fn invalid_json(detail: &'static str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", detail)
    }
    pub fn unavailable(detail: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the store cannot be written: {detail}"),
        )
    }

    pub fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct E<'a> {
            error: &'a str,
            detail: &'a str,
        }
        let mut r = json(
            self.status,
            &E {
                error: self.code,
                detail: &self.detail,
            },
        );
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!("store read failed: {}", e.chain());
        ApiError::unavailable(e.chain())
    }
}

impl From<crate::sequencer::WriteError> for ApiError {
    fn from(e: crate::sequencer::WriteError) -> Self {
        use crate::sequencer::WriteError;
        match e {
            WriteError::NotFound => ApiError::not_found("no such notification"),
            WriteError::Unavailable(e) => ApiError::unavailable(e.chain()),
            WriteError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the server is shutting down",
            ),
        }
    }
}

pub fn json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("responses serialize");
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Every path the server knows, trailing slash or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/ws/chat/<id>/`; `None` when the id is not a positive integer.
    Chat(Option<u64>),
    Notifications,
    /// Any other `/ws/...` path: 404 once the token is checked.
    UnknownSocket,
    Conversations,
    Conversation(Option<u64>),
    Messages(Option<u64>),
    NotificationList,
    UnreadCount,
    ReadAll,
    MarkRead(Option<u64>),
    Healthz,
    Metrics,
    /// `/`, `/console/<file>`, `/client/<file>`: the console's files.
    Console,
    /// `/api/openapi.json`.
    OpenApi,
    /// `/api/console/token`: the console's token minting (404 unless zero-config on loopback).
    ConsoleToken,
    NotFound,
}

/// A positive integer in canonical decimal form.
pub fn parse_id(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&n| n > 0)
}

pub fn route(path: &str) -> Route {
    let path = path.strip_suffix('/').unwrap_or(path);
    let mut parts = path.split('/').skip(1);
    let segs: [Option<&str>; 5] = std::array::from_fn(|_| parts.next());
    if parts.next().is_some() {
        return if segs[0] == Some("ws") {
            Route::UnknownSocket
        } else {
            Route::NotFound
        };
    }
    match segs {
        [Some("ws"), Some("chat"), Some(id), None, None] => Route::Chat(parse_id(id)),
        [Some("ws"), Some("notifications"), None, None, None] => Route::Notifications,
        [Some("ws"), ..] => Route::UnknownSocket,
        [Some("api"), Some("conversations"), None, None, None] => Route::Conversations,
        [Some("api"), Some("conversations"), Some(id), None, None] => Route::Conversation(parse_id(id)),
        [Some("api"), Some("conversations"), Some(id), Some("messages"), None] => {
            Route::Messages(parse_id(id))
        }
        [Some("api"), Some("notifications"), None, None, None] => Route::NotificationList,
        [Some("api"), Some("notifications"), Some("unread_count"), None, None] => Route::UnreadCount,
        [Some("api"), Some("notifications"), Some("read_all"), None, None] => Route::ReadAll,
        [Some("api"), Some("notifications"), Some(id), Some("read"), None] => Route::MarkRead(parse_id(id)),
        [None, None, None, None, None] => Route::Console,
        [Some("console" | "client"), Some(_), None, None, None] => Route::Console,
        [Some("api"), Some("openapi.json"), None, None, None] => Route::OpenApi,
        [Some("api"), Some("console"), Some("token"), None, None] => Route::ConsoleToken,
        [Some("healthz"), None, None, None, None] => Route::Healthz,
        [Some("metrics"), None, None, None, None] => Route::Metrics,
        _ => Route::NotFound,
    }
}

/// The methods a REST route answers; anything else is 405.
fn allowed(route: Route) -> &'static [Method] {
    match route {
        Route::Conversations | Route::NotificationList => &[Method::GET, Method::POST],
        Route::ReadAll | Route::MarkRead(_) | Route::ConsoleToken => &[Method::POST],
        _ => &[Method::GET],
    }
}

/// Answers one request. Upgrades are answered here too (101 or an error);
/// the socket itself is handed to `ws` once hyper lets go of the connection.
pub async fn handle(mut req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let route = route(req.uri().path());
    let socket = matches!(
        route,
        Route::Chat(_) | Route::Notifications | Route::UnknownSocket
    );
    // CORS costs nothing unless `--cors-origins` is set; sockets never take part.
    let cors = !shared.config.cors_origins.is_empty() && !socket;
    let origin = cors
        .then(|| cors::allowed_origin(&shared.config.cors_origins, req.headers()))
        .flatten();
    if !socket && route != Route::NotFound && cors::is_preflight(req.method(), req.headers()) {
        return cors::preflight(origin, allowed(route));
    }
    let result = match route {
        // RFC 6455: the opening handshake is a GET (as for REST, the method
        // is checked before the token).
        Route::Chat(_) | Route::Notifications | Route::UnknownSocket if req.method() != Method::GET => {
            Ok(method_not_allowed(&[Method::GET]))
        }
        Route::Chat(_) | Route::Notifications | Route::UnknownSocket => {
            upgrade::upgrade(&mut req, route, &shared).await
        }
        Route::NotFound => Err(ApiError::not_found("no such endpoint")),
        Route::Healthz | Route::Metrics if !allowed(route).contains(req.method()) => {
            Ok(method_not_allowed(allowed(route)))
        }
        Route::Healthz => Ok(rest::healthz(&shared)),
        Route::Metrics if shared.config.metrics => Ok(rest::metrics(&shared)),
        Route::Metrics => Err(ApiError::not_found("no such endpoint")),
        Route::ConsoleToken if !console::may_mint(&shared.config) => {
            Err(ApiError::not_found("no such endpoint"))
        }
        Route::Console | Route::OpenApi | Route::ConsoleToken if !allowed(route).contains(req.method()) => {
            Ok(method_not_allowed(allowed(route)))
        }
        Route::Console => console::asset(req.uri().path()),
        Route::OpenApi => Ok(openapi::document()),
        Route::ConsoleToken => console::mint(req, &shared).await,
        _ => {
            let methods = allowed(route);
            if !methods.contains(req.method()) {
                Ok(method_not_allowed(methods))
            } else {
                match rest_identity(&req, &shared) {
                    Ok(who) => rest::handle(req, route, who, &shared).await,
                    Err(e) => Err(e),
                }
            }
        }
    };
    let mut response = result.unwrap_or_else(ApiError::into_response);
    if cors {
        cors::decorate(&mut response, origin);
    }
    response
}

/// 405 `method_not_allowed` with the `Allow` header.
fn method_not_allowed(methods: &[Method]) -> Response<Body> {
    let allow = methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    let mut r = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("use {allow}"),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&allow) {
        r.headers_mut().insert(ALLOW, v);
    }
    r
}

/// REST takes the header or `?token=`, not the subprotocol.
fn rest_identity(req: &Request<Incoming>, shared: &Shared) -> Result<Identity, ApiError> {
    let p = auth::presented(req.headers(), req.uri().query(), false);
    let token = p.token.ok_or(ApiError::unauthorized(AuthError::Missing))?;
    shared.verifier.verify(token).map_err(ApiError::unauthorized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_with_and_without_trailing_slash() {
        let cases = [
            ("/ws/chat/12/", Route::Chat(Some(12))),
            ("/ws/chat/12", Route::Chat(Some(12))),
            ("/ws/chat/x/", Route::Chat(None)),
            ("/ws/chat/0", Route::Chat(None)),
            ("/ws/chat/012", Route::Chat(Some(12))),
            ("/ws/notifications", Route::Notifications),
            ("/ws/notifications/", Route::Notifications),
            ("/ws/other/", Route::UnknownSocket),
            ("/ws/chat/1/2/3/4", Route::UnknownSocket),
            ("/api/conversations", Route::Conversations),
            ("/api/conversations/5/", Route::Conversation(Some(5))),
            ("/api/conversations/5/messages", Route::Messages(Some(5))),
            ("/api/notifications/", Route::NotificationList),
            ("/api/notifications/unread_count/", Route::UnreadCount),
            ("/api/notifications/read_all", Route::ReadAll),
            ("/api/notifications/9/read/", Route::MarkRead(Some(9))),
            ("/healthz", Route::Healthz),
            ("/metrics/", Route::Metrics),
            ("/", Route::Console),
            ("/console/app.js", Route::Console),
            ("/client/parley.js", Route::Console),
            ("/api/openapi.json", Route::OpenApi),
            ("/api/console/token/", Route::ConsoleToken),
            ("/console", Route::NotFound),
            ("/api/nope", Route::NotFound),
        ];
        for (path, want) in cases {
            assert_eq!(route(path), want, "{path}");
        }
    }
}
