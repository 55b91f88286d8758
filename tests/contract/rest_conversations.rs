//! Part B "REST API" (conversations, health, metrics, the rules every
//! endpoint shares) and Part C "REST".

use serde_json::{json, Value};

use crate::harness::*;

fn assert_conversation_shape(c: &Value) {
    assert_keys(c, &["id", "title", "participants", "created_at"]);
    assert!(c["id"].as_u64().is_some_and(|id| id > 0), "id: {c}");
    assert!(c["title"].is_null() || c["title"].is_string(), "title: {c}");
    assert!(
        c["participants"]
            .as_array()
            .is_some_and(|p| p.iter().all(Value::is_string)),
        "participants: {c}"
    );
    assert_timestamp(&c["created_at"]);
}

/// Every REST endpoint, as (method, path with the trailing slash).
fn endpoints(conv: u64, notification: u64) -> Vec<(&'static str, String)> {
    vec![
        ("POST", "/api/conversations/".into()),
        ("GET", "/api/conversations/".into()),
        ("GET", format!("/api/conversations/{conv}/")),
        ("GET", format!("/api/conversations/{conv}/messages/")),
        ("GET", "/api/notifications/".into()),
        ("GET", "/api/notifications/unread_count/".into()),
        ("POST", format!("/api/notifications/{notification}/read/")),
        ("POST", "/api/notifications/read_all/".into()),
        ("POST", "/api/notifications/".into()),
    ]
}

// ------------------------------------------------------------------ create --

#[tokio::test]
async fn creating_a_conversation_answers_201_with_id_title_participants_created_at() {
    let server = Server::start();
    let alice = user("alice");
    let bob = user("bob");
    let (status, body) = server
        .post(
            "/api/conversations/",
            &server.token(&alice),
            json!({"participants": [bob], "title": "optional"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_conversation_shape(&body);
    assert_eq!(body["title"], "optional");
    assert_eq!(body["participants"], json!([alice, bob]));
}

#[tokio::test]
async fn the_creator_is_listed_first_then_the_others_in_the_order_given_duplicates_merged() {
    let server = Server::start();
    let (alice, bob, carol, dave) = (user("alice"), user("bob"), user("carol"), user("dave"));
    let (status, body) = server
        .post(
            "/api/conversations/",
            &server.token(&alice),
            json!({"participants": [carol, bob, carol, alice, dave, bob]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["participants"], json!([alice, carol, bob, dave]));
}

#[tokio::test]
async fn a_conversation_created_without_a_title_has_title_null() {
    let server = Server::start();
    let alice = user("alice");
    let (status, body) = server
        .post(
            "/api/conversations/",
            &server.token(&alice),
            json!({"participants": []}),
        )
        .await;
    assert_eq!(status, 201);
    assert_keys(&body, &["id", "title", "participants", "created_at"]);
    assert!(body["title"].is_null(), "{body}");
    let (_, got) = server
        .get(
            &format!("/api/conversations/{}/", body["id"]),
            &server.token(&alice),
        )
        .await;
    assert!(got["title"].is_null(), "{got}");
}

#[tokio::test]
async fn participants_may_be_omitted_the_caller_is_the_only_participant() {
    let server = Server::start();
    let alice = user("alice");
    let (status, body) = server
        .post("/api/conversations/", &server.token(&alice), json!({}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["participants"], json!([alice]));
}

#[tokio::test]
async fn unknown_usernames_are_fine_as_participants() {
    let server = Server::start();
    let alice = user("alice");
    let never_seen = user("nobody");
    let conv = server.create_conversation(&alice, &[&never_seen]).await;
    // Whoever later holds a token for that name is a participant.
    let mut ws = server.ws_chat(conv, &never_seen).await;
    say(&mut ws, "hello, I exist now").await;
}

#[tokio::test]
async fn conversation_ids_are_increasing() {
    let server = Server::start();
    let alice = user("alice");
    let a = server.create_conversation(&alice, &[]).await;
    let b = server.create_conversation(&user("other"), &[]).await;
    let c = server.create_conversation(&alice, &[]).await;
    assert!(a < b && b < c, "{a} {b} {c}");
}

#[tokio::test]
async fn creating_with_fields_of_the_wrong_type_is_400_invalid_field() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    for body in [
        json!({"participants": "bob"}),
        json!({"participants": [1]}),
        json!({"participants": [null]}),
        json!({"participants": ["has space"]}),
        json!({"participants": ["b"], "title": 5}),
        json!({"participants": ["b"], "title": ["t"]}),
    ] {
        let answer = server.post("/api/conversations/", &token, body.clone()).await;
        assert_rest_error(&answer, 400, "invalid_field");
    }
}

// -------------------------------------------------------------- list / get --

#[tokio::test]
async fn listing_conversations_answers_200_results_with_the_callers_only() {
    let server = Server::start();
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let mine = server.create_conversation(&alice, &[&bob]).await;
    let invited = server.create_conversation(&bob, &[&alice]).await;
    let not_mine = server.create_conversation(&bob, &[&carol]).await;
    let (status, body) = server.get("/api/conversations/", &server.token(&alice)).await;
    assert_eq!(status, 200);
    assert_keys(&body, &["results"]);
    let results = body["results"].as_array().unwrap();
    for c in results {
        assert_conversation_shape(c);
    }
    let ids: Vec<u64> = results.iter().map(id_of).collect();
    assert!(ids.contains(&mine) && ids.contains(&invited), "{ids:?}");
    assert!(!ids.contains(&not_mine));
    assert_eq!(ids.len(), 2);
}

#[tokio::test]
async fn a_new_user_has_no_conversations() {
    let server = Server::start();
    let (status, body) = server
        .get("/api/conversations/", &server.token(&user("new")))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"results": []}));
}

#[tokio::test]
async fn getting_a_conversation_answers_200_the_conversation_to_a_participant() {
    let server = Server::start();
    let (alice, bob) = (user("alice"), user("bob"));
    let (_, created) = server
        .post(
            "/api/conversations/",
            &server.token(&alice),
            json!({"participants": [bob], "title": "t"}),
        )
        .await;
    let path = format!("/api/conversations/{}/", created["id"]);
    for who in [&alice, &bob] {
        let (status, body) = server.get(&path, &server.token(who)).await;
        assert_eq!(status, 200);
        assert_eq!(body, created);
    }
}

#[tokio::test]
async fn getting_an_unknown_conversation_is_404_not_found() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    for path in [
        "/api/conversations/999999999/",
        "/api/conversations/0/",
        "/api/conversations/abc/",
    ] {
        assert_rest_error(&server.get(path, &token).await, 404, "not_found");
    }
}

#[tokio::test]
async fn getting_a_conversation_as_a_non_participant_is_403_forbidden() {
    let server = Server::start();
    let conv = server.create_conversation(&user("alice"), &[]).await;
    let answer = server
        .get(
            &format!("/api/conversations/{conv}/"),
            &server.token(&user("mallory")),
        )
        .await;
    assert_rest_error(&answer, 403, "forbidden");
}

// ------------------------------------------------------------ every route --

#[tokio::test]
async fn paths_are_accepted_with_and_without_the_trailing_slash() {
    let server = Server::start();
    let alice = user("alice");
    let token = server.token(&alice);
    let conv = server.create_conversation(&alice, &[]).await;
    let n = id_of(&server.notify(&alice, "hi").await);
    for (method, path) in endpoints(conv, n) {
        let bare = path.trim_end_matches('/').to_string();
        // Creating answers 201, everything else 200; both spellings alike.
        let want = if method == "POST" && (path == "/api/conversations/" || path == "/api/notifications/") {
            201
        } else {
            200
        };
        let mut shapes = vec![];
        for p in [path.clone(), bare] {
            let (status, body) =
                if p.starts_with("/api/notifications") && method == "POST" && !p.contains("read") {
                    server
                        .post(
                            &p,
                            &server.service_token(),
                            json!({"user": alice, "message": "x"}),
                        )
                        .await
                } else if method == "POST" {
                    server.post(&p, &token, json!({})).await
                } else {
                    server.get(&p, &token).await
                };
            assert_eq!(status, want, "{method} {p}: {body}");
            let mut keys: Vec<String> = body
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            shapes.push(keys);
        }
        assert_eq!(
            shapes[0], shapes[1],
            "{method} {path}: the same answer with and without the slash"
        );
        assert!(!shapes[0].is_empty(), "{method} {path}: a JSON object");
    }
    for p in ["/healthz", "/healthz/"] {
        let (status, _, _) = server.get_text(p).await;
        assert_eq!(status, 200, "{p}");
    }
}

#[tokio::test]
async fn every_endpoint_without_a_token_is_401_unauthorized() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let n = id_of(&server.notify(&alice, "hi").await);
    for (method, path) in endpoints(conv, n) {
        let body = (method == "POST").then(|| b"{}".to_vec());
        let answer = server.request(method, &path, None, body).await;
        assert_rest_error(&answer, 401, "unauthorized");
    }
}

#[tokio::test]
async fn every_endpoint_with_a_bad_token_is_401_unauthorized() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let n = id_of(&server.notify(&alice, "hi").await);
    let expired = server.sign(&json!({"sub": alice, "exp": now_secs() - 3600}));
    for (method, path) in endpoints(conv, n) {
        let body = (method == "POST").then(|| b"{}".to_vec());
        let answer = server.request(method, &path, Some(&expired), body).await;
        assert_rest_error(&answer, 401, "unauthorized");
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_method_not_allowed() {
    let server = Server::start();
    let alice = user("alice");
    let token = server.token(&alice);
    let conv = server.create_conversation(&alice, &[]).await;
    let n = id_of(&server.notify(&alice, "hi").await);
    let cases = [
        ("DELETE", "/api/conversations/".to_string()),
        ("PUT", "/api/conversations/".to_string()),
        ("POST", format!("/api/conversations/{conv}/")),
        ("DELETE", format!("/api/conversations/{conv}/")),
        ("POST", format!("/api/conversations/{conv}/messages/")),
        ("PATCH", "/api/notifications/".to_string()),
        ("POST", "/api/notifications/unread_count/".to_string()),
        ("GET", format!("/api/notifications/{n}/read/")),
        ("GET", "/api/notifications/read_all/".to_string()),
        ("DELETE", "/api/notifications/read_all/".to_string()),
    ];
    for (method, path) in cases {
        let body = matches!(method, "POST" | "PUT" | "PATCH").then(|| b"{}".to_vec());
        let answer = server.request(method, &path, Some(&token), body).await;
        assert_rest_error(&answer, 405, "method_not_allowed");
    }
}

#[tokio::test]
async fn an_unknown_api_path_is_404_not_found() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    for path in ["/api/nothing/", "/api/conversations/1/members/", "/nowhere"] {
        let answer = server.get(path, &token).await;
        assert_rest_error(&answer, 404, "not_found");
    }
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_400_invalid_json() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    let service = server.service_token();
    for raw in [
        "not json",
        "[1]",
        "null",
        "\"x\"",
        "42",
        "{",
        r#"{"participants": NaN}"#,
        "{} x",
    ] {
        let answer = server
            .request(
                "POST",
                "/api/conversations/",
                Some(&token),
                Some(raw.as_bytes().to_vec()),
            )
            .await;
        assert_rest_error(&answer, 400, "invalid_json");
        let answer = server
            .request(
                "POST",
                "/api/notifications/",
                Some(&service),
                Some(raw.as_bytes().to_vec()),
            )
            .await;
        assert_rest_error(&answer, 400, "invalid_json");
    }
}

#[tokio::test]
async fn an_empty_body_is_400_invalid_json_on_the_two_endpoints_that_take_one() {
    let server = Server::start();
    let answer = server
        .post_empty("/api/conversations/", &server.token(&user("alice")))
        .await;
    assert_rest_error(&answer, 400, "invalid_json");
    let answer = server
        .request(
            "POST",
            "/api/conversations/",
            Some(&server.token(&user("alice"))),
            Some(vec![]),
        )
        .await;
    assert_rest_error(&answer, 400, "invalid_json");
    let answer = server
        .post_empty("/api/notifications/", &server.service_token())
        .await;
    assert_rest_error(&answer, 400, "invalid_json");
}

/// Sends a request head and then only `sent` bytes of its body, keeping the
/// connection open, and answers the status (and JSON body) the server gives
/// meanwhile: an answer proves the server did not wait for the whole body,
/// which never comes.
async fn answer_to_a_body_never_finished(server: &Server, head: String, sent: Vec<u8>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer and close before taking all of it.
    let _ = stream.write_all(&sent).await;
    let mut buf = vec![];
    let mut chunk = [0u8; 8192];
    // Until the answer is whole: its head, then Content-Length bytes or the
    // last chunk (or the server closes).
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let whole = match len {
                    Some(len) => buf.len() >= end + 4 + len,
                    None => buf[end + 4..].windows(5).any(|w| w == b"0\r\n\r\n"),
                };
                if whole {
                    return end;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    return buf
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .expect("no answer before the close")
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let end = tokio::time::timeout(RECV_TIMEOUT, read)
        .await
        .expect("no answer while the body was unfinished: the server waits for all of it");
    let (status, body) = split_response(&buf, end);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_chunked_body_over_the_size_limit_is_413_before_it_is_read_whole() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    let head = format!(
        "POST /api/conversations/ HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        server.addr
    );
    // 1 MiB + 64 KiB in 64 KiB chunks, and never the last chunk.
    let mut sent = vec![];
    let mut body = br#"{"participants":[""#.to_vec();
    body.resize(64 * 1024, b'x');
    for _ in 0..17 {
        sent.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        sent.extend_from_slice(&body);
        sent.extend_from_slice(b"\r\n");
    }
    let answer = answer_to_a_body_never_finished(&server, head, sent).await;
    assert_rest_error(&answer, 413, "too_large");
    let (_, body) = server.get("/api/conversations/", &token).await;
    assert_eq!(body["results"], json!([]));
}

#[tokio::test]
async fn a_declared_length_over_the_size_limit_is_413_before_the_body_is_read_whole() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    let head = format!(
        "POST /api/conversations/ HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        server.addr,
        8 << 20
    );
    // A little over the limit is sent; the rest of the 8 MiB never is.
    let mut sent = br#"{"participants":[""#.to_vec();
    sent.resize((1 << 20) + 4096, b'x');
    let answer = answer_to_a_body_never_finished(&server, head, sent).await;
    assert_rest_error(&answer, 413, "too_large");
}

#[tokio::test]
async fn a_body_over_the_size_limit_is_413_too_large() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    let answer = server.post_huge("/api/conversations/", &token, 8 << 20).await;
    assert_rest_error(&answer, 413, "too_large");
    // Nothing was created.
    let (_, body) = server.get("/api/conversations/", &token).await;
    assert_eq!(body["results"], json!([]));
}

#[tokio::test]
async fn error_answers_are_error_and_detail_with_the_matching_status() {
    let server = Server::start();
    let answer = server.request("GET", "/api/conversations/", None, None).await;
    assert_rest_error(&answer, 401, "unauthorized");
    let answer = server
        .get("/api/conversations/999999999/", &server.token(&user("a")))
        .await;
    assert_rest_error(&answer, 404, "not_found");
}

// ----------------------------------------------------------- service token --

#[tokio::test]
async fn a_service_token_is_a_participant_of_nothing() {
    let server = Server::start();
    let svc = user("svc");
    let alice = user("alice");
    // A conversation that even names the service's sub.
    let conv = server.create_conversation(&alice, &[&svc]).await;
    let service = server.service_token_for(&svc);
    let answer = server.get(&format!("/api/conversations/{conv}/"), &service).await;
    assert_rest_error(&answer, 403, "forbidden");
    let answer = server
        .get(&format!("/api/conversations/{conv}/messages/"), &service)
        .await;
    assert_rest_error(&answer, 403, "forbidden");
    assert_eq!(
        server
            .upgrade_status_with_token(&format!("/ws/chat/{conv}/"), &service)
            .await,
        403
    );
    let (status, body) = server.get("/api/conversations/", &service).await;
    if status == 200 {
        assert_eq!(body["results"], json!([]), "a service lists no conversation");
    } else {
        assert_rest_error(&(status, body), 403, "forbidden");
    }
}

#[tokio::test]
async fn a_service_token_cannot_create_a_conversation_403() {
    // "who: user": the caller becomes a participant, which a service never is.
    let server = Server::start();
    let answer = server
        .post(
            "/api/conversations/",
            &server.service_token(),
            json!({"participants": [user("bob")]}),
        )
        .await;
    assert_rest_error(&answer, 403, "forbidden");
}

// ---------------------------------------------------------- health, metrics --

#[tokio::test]
async fn healthz_answers_200_to_anyone() {
    let server = Server::start();
    let (status, _, _) = server.get_text("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn metrics_answers_prometheus_text_to_anyone() {
    let server = Server::start();
    let (status, content_type, body) = server.get_text("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain"),
        "content type {content_type}"
    );
    assert!(body.contains("# TYPE "), "not Prometheus text: {body}");
    for line in body.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
}

/// The value of one sample line of `/metrics` (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn metrics_counters_move_when_the_events_happen() {
    let server = crate::own_server!();
    let mut room = Room::open_on(server).await;
    let before = room.server.get_text("/metrics").await.2;
    let m = room.alice_says("counted").await;
    room.alice_does(json!({"type": "edit_message", "message_id": m["id"], "content": "edited"}))
        .await;
    room.alice_does(json!({"type": "delete_message", "message_id": m["id"]}))
        .await;
    room.expect_error(json!({"type": "nope"}), "unknown_type").await;
    let (status, _) = room
        .server
        .post(
            "/api/notifications/",
            &room.server.service_token(),
            json!({"user": room.bob, "message": "hi"}),
        )
        .await;
    assert_eq!(status, 201);
    let bad = room
        .server
        .upgrade_status_with_token(&format!("/ws/chat/{}/", room.conv), "not-a-token")
        .await;
    assert_eq!(bad, 401);
    let after = room.server.get_text("/metrics").await.2;
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    // The probe message of `expect_error` counts as a message too.
    assert_eq!(moved("parley_writes_total{kind=\"message\"}"), 2.0, "{after}");
    assert_eq!(moved("parley_writes_total{kind=\"edit\"}"), 1.0);
    assert_eq!(moved("parley_writes_total{kind=\"delete\"}"), 1.0);
    assert_eq!(moved("parley_writes_total{kind=\"notification\"}"), 1.0);
    assert_eq!(moved("parley_error_frames_total{code=\"unknown_type\"}"), 1.0);
    assert_eq!(moved("parley_refused_upgrades_total{status=\"401\"}"), 1.0);
    // Three sockets saw each of the four events.
    assert!(moved("parley_deliveries_total") >= 12.0, "{after}");
    assert_eq!(sample(&after, "parley_open_sockets{kind=\"chat\"}"), 3.0);
    assert!(sample(&after, "parley_store_flush_seconds_count") > 0.0);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn metrics_can_be_turned_off_by_the_operator() {
    // PROTOCOL.md: `/metrics` is served to anyone "(configurable)".
    let server = crate::own_server!("--metrics", "false");
    let (status, _, _) = server.get_text("/metrics").await;
    assert_eq!(status, 404);
}
