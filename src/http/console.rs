//! The console: a page served at `/` that signs in, chats, shows
//! notifications and charts `/metrics`, built on the JavaScript client
//! (`clients/js`, served at `/client/parley.js`). Every file is compiled into
//! the binary (no build step, nothing read from disk at run time), and none
//! of this is on a socket's path.
//!
//! In the zero-configuration case only (the HS256 secret is the one parley
//! generated in its data dir, and it listens on a loopback address) the page
//! may ask `POST /api/console/token` for a token for any username; anywhere
//! else that path answers 404, so a configured deployment never mints.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::{json, ApiError, Body};
use crate::config::Config;
use crate::state::Shared;

/// How long a minted token is valid.
const MINTED_TTL_SECS: u64 = 12 * 3600;

/// The console's files: path, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("console/index.html"),
    ),
    (
        "/console/app.js",
        "text/javascript; charset=utf-8",
        include_str!("console/app.js"),
    ),
    (
        "/console/charts.js",
        "text/javascript; charset=utf-8",
        include_str!("console/charts.js"),
    ),
    (
        "/console/style.css",
        "text/css; charset=utf-8",
        include_str!("console/style.css"),
    ),
    (
        "/client/parley.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/js/parley.js"),
    ),
    (
        "/client/parley.d.ts",
        "text/plain; charset=utf-8",
        include_str!("../../clients/js/parley.d.ts"),
    ),
];

/// The paths [`asset`] serves (for the OpenAPI route test).
#[cfg(test)]
pub fn asset_paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|(p, _, _)| *p)
}

/// One of the console's files, or 404.
pub fn asset(path: &str) -> Result<Response<Body>, ApiError> {
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let (_, content_type, text) = ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .ok_or(ApiError::not_found("no such file"))?;
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    if path == "/" {
        h.insert(
            "content-security-policy",
            HeaderValue::from_static(
                "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        );
    }
    Ok(r)
}

/// Whether the console may mint tokens: no secret was configured (parley
/// uses the one it generated in its data dir) and only this machine can
/// reach the server.
pub fn may_mint(config: &Config) -> bool {
    config.console_may_mint()
}

/// `POST /api/console/token` `{"username": "alice"}` → `{"token", "username", "expires_in"}`.
pub async fn mint(req: Request<Incoming>, shared: &Shared) -> Result<Response<Body>, ApiError> {
    let secret = match &shared.config.jwt.secret {
        Some(s) if may_mint(&shared.config) => s,
        _ => return Err(ApiError::not_found("no such endpoint")),
    };
    let bytes = Limited::new(req.into_body(), 4096)
        .collect()
        .await
        .map_err(|_| ApiError::invalid_json("the body could not be read (at most 4096 bytes)"))?
        .to_bytes();
    let body: Value =
        serde_json::from_slice(&bytes).map_err(|_| ApiError::invalid_json("the body is not valid JSON"))?;
    let Value::Object(body) = body else {
        return Err(ApiError::invalid_json("the body must be a JSON object"));
    };
    let username = match body.get("username") {
        Some(Value::String(s)) if crate::auth::valid_username(s) => s.as_str(),
        _ => {
            return Err(ApiError::invalid_field(
                "'username' must be 1-150 of A-Z a-z 0-9 _ . @ + -",
            ))
        }
    };
    #[derive(Serialize)]
    struct Minted<'a> {
        token: String,
        username: &'a str,
        expires_in: u64,
    }
    let token = crate::auth::issue_hs256(secret, username, false, MINTED_TTL_SECS);
    Ok(json(
        StatusCode::OK,
        &Minted {
            token,
            username,
            expires_in: MINTED_TTL_SECS,
        },
    ))
}
