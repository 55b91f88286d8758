//! The OpenAPI 3.1 document of the HTTP API, served at `/api/openapi.json`.
//!
//! Written by hand (`openapi.json` beside this file) and compiled in. The
//! test below keeps it honest against the router: every route `route()`
//! knows is in the document with the methods `allowed()` gives it, and every
//! path and method the document names reaches a route that answers it.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

use super::Body;

const DOCUMENT: &str = include_str!("openapi.json");

pub fn document() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(DOCUMENT.as_bytes())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use hyper::Method;
    use serde_json::Value;

    use super::super::{allowed, console, route, Route};
    use super::DOCUMENT;

    /// One example path per route of the router. The match in `variant`
    /// has no wildcard: a route added to `Route` does not compile until it
    /// is listed here, and then the test demands it in the document.
    const EXAMPLES: &[(&str, Route)] = &[
        ("/ws/chat/1/", Route::Chat(Some(1))),
        ("/ws/notifications/", Route::Notifications),
        ("/api/conversations/", Route::Conversations),
        ("/api/conversations/1/", Route::Conversation(Some(1))),
        ("/api/conversations/1/messages/", Route::Messages(Some(1))),
        ("/api/notifications/", Route::NotificationList),
        ("/api/notifications/unread_count/", Route::UnreadCount),
        ("/api/notifications/read_all/", Route::ReadAll),
        ("/api/notifications/1/read/", Route::MarkRead(Some(1))),
        ("/healthz", Route::Healthz),
        ("/metrics", Route::Metrics),
        ("/", Route::Console),
        ("/api/openapi.json", Route::OpenApi),
        ("/api/console/token", Route::ConsoleToken),
    ];

    /// Routes that are not endpoints: nothing to document.
    fn variant(r: Route) -> Option<usize> {
        Some(match r {
            Route::Chat(_) => 0,
            Route::Notifications => 1,
            Route::Conversations => 2,
            Route::Conversation(_) => 3,
            Route::Messages(_) => 4,
            Route::NotificationList => 5,
            Route::UnreadCount => 6,
            Route::ReadAll => 7,
            Route::MarkRead(_) => 8,
            Route::Healthz => 9,
            Route::Metrics => 10,
            Route::Console => 11,
            Route::OpenApi => 12,
            Route::ConsoleToken => 13,
            Route::UnknownSocket | Route::NotFound => return None,
        })
    }

    /// The methods a route answers: `allowed()` for REST, GET for the rest.
    fn methods(r: Route) -> Vec<Method> {
        allowed(r).to_vec()
    }

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// `{id}` → 1, `{file}` → each value of its enum.
    fn concrete(path: &str, op: &Value) -> Vec<String> {
        if !path.contains("{file}") {
            return vec![path.replace("{id}", "1")];
        }
        let files = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "file")
            .and_then(|p| p["schema"]["enum"].as_array())
            .expect("{file} has an enum");
        files
            .iter()
            .map(|f| path.replace("{file}", f.as_str().expect("file name")))
            .collect()
    }

    #[test]
    fn document_is_openapi_3_1() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"].as_object().is_some_and(|p| !p.is_empty()));
    }

    #[test]
    fn every_route_of_the_router_is_documented_with_its_methods() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        let mut seen = [false; 14];
        for (example, want) in EXAMPLES {
            assert_eq!(route(example), *want, "example {example} routes elsewhere");
            seen[variant(*want).expect("an endpoint")] = true;
            // The document's path that routes to the same variant.
            let documented: Vec<&String> = paths
                .iter()
                .filter(|(p, item)| {
                    let op = item
                        .as_object()
                        .and_then(|m| m.values().next())
                        .expect("an operation");
                    concrete(p, op)
                        .iter()
                        .any(|c| variant(route(c)) == variant(*want))
                })
                .map(|(p, _)| p)
                .collect();
            assert!(
                !documented.is_empty(),
                "route {want:?} ({example}) is missing from openapi.json"
            );
            for m in methods(*want) {
                let name = m.as_str().to_ascii_lowercase();
                assert!(
                    documented.iter().any(|p| paths[p.as_str()].get(&name).is_some()),
                    "{} {example} is missing from openapi.json",
                    m.as_str()
                );
            }
        }
        assert!(seen.iter().all(|s| *s), "an endpoint has no example: {seen:?}");
    }

    #[test]
    fn every_documented_path_and_method_exists() {
        let doc = document();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                for p in concrete(path, op) {
                    let r = route(&p);
                    assert!(
                        variant(r).is_some(),
                        "openapi.json names {p}, which the router does not know"
                    );
                    let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).expect("method");
                    assert!(
                        methods(r).contains(&m),
                        "openapi.json names {method} {p}, which the router refuses"
                    );
                    if r == Route::Console {
                        assert!(
                            console::asset_paths().any(|a| a == p),
                            "openapi.json names {p}, which the console does not serve"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_console_file_is_documented() {
        let doc = document();
        let documented: Vec<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(p, item)| concrete(p, &item["get"]))
            .collect();
        for asset in console::asset_paths() {
            assert!(
                documented.iter().any(|d| d == asset),
                "{asset} is served but not in openapi.json"
            );
        }
    }
}
