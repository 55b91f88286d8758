//! CORS for the REST API (`--cors-origins`): a browser page on another
//! origin may call it when its origin is listed. Off (no header added, every
//! preflight refused) by default. WebSockets are not subject to CORS and are
//! not touched here.

use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use hyper::{Method, Response, StatusCode};

use super::{ApiError, Body};

/// The request's `Origin` when `--cors-origins` lists it (or is `*`).
pub fn allowed_origin(origins: &[String], headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(ORIGIN)?;
    let text = origin.to_str().ok()?;
    origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(text))
        .then(|| origin.clone())
}

/// A CORS preflight: `OPTIONS` carrying `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight: 204 with what the route allows for a listed
/// origin, 403 for any other (the browser then refuses the call).
pub fn preflight(origin: Option<HeaderValue>, methods: &[Method]) -> Response<Body> {
    let Some(origin) = origin else {
        let mut r = ApiError::forbidden("this origin is not allowed (--cors-origins)").into_response();
        r.headers_mut().insert(VARY, HeaderValue::from_static("Origin"));
        return r;
    };
    let mut r = Response::new(Body::default());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let allow = methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    let h = r.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if let Ok(v) = HeaderValue::from_str(&allow) {
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    h.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    h.insert(VARY, HeaderValue::from_static("Origin"));
    r
}

/// Marks an actual response as readable by `origin` (when listed).
pub fn decorate(r: &mut Response<Body>, origin: Option<HeaderValue>) {
    let h = r.headers_mut();
    if let Some(origin) = origin {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    h.insert(VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_are_allowed() {
        let listed = vec![
            "https://app.example".to_string(),
            "http://localhost:3000".to_string(),
        ];
        let cases = [
            (Some("https://app.example"), true),
            (Some("HTTPS://APP.EXAMPLE"), true),
            (Some("http://localhost:3000"), true),
            (Some("http://localhost:3001"), false),
            (Some("https://evil.example"), false),
            (None, false),
        ];
        for (origin, want) in cases {
            let mut h = HeaderMap::new();
            if let Some(o) = origin {
                h.insert(ORIGIN, HeaderValue::from_static(o));
            }
            assert_eq!(allowed_origin(&listed, &h).is_some(), want, "{origin:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(ORIGIN, HeaderValue::from_static("https://any.example"));
        assert!(allowed_origin(&["*".into()], &h).is_some());
        assert!(allowed_origin(&[], &h).is_none());
    }
}
