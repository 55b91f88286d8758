//! Part B "Identity and tokens" and Part C "Handshake and paths": where the
//! token comes from, which tokens are refused, and which upgrades are
//! refused with which HTTP status, before any socket exists.

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use crate::harness::*;

/// A conversation of alice (and bob) for the handshake tests.
async fn setup() -> (Server, String, String, u64) {
    let server = Server::start();
    let alice = user("alice");
    let bob = user("bob");
    let conv = server.create_conversation(&alice, &[&bob]).await;
    (server, alice, bob, conv)
}

/// Opens a raw chat socket with these headers and answers who the server
/// thinks sent a message on it.
async fn sender_seen_with(server: &Server, path: &str, headers: &[(&str, &str)]) -> String {
    let mut ws = server
        .raw_ws(path, headers)
        .await
        .unwrap_or_else(|a| panic!("refused: {} {:?}", a.status, String::from_utf8_lossy(&a.body)));
    ws.send_json(&json!({"type": "chat_message", "message": "who am i"}))
        .await;
    ws.recv_json().await["sender"].as_str().unwrap().to_string()
}

/// The status of a chat upgrade with this token in the header.
async fn chat_status(server: &Server, conv: u64, token: &str) -> u16 {
    server
        .upgrade_status_with_token(&format!("/ws/chat/{conv}/"), token)
        .await
}

// ---------------------------------------------------------- token sources --

#[tokio::test]
async fn authorization_bearer_header_is_accepted_on_both_sockets() {
    let (server, alice, _, conv) = setup().await;
    let auth = format!("Bearer {}", server.token(&alice));
    let path = format!("/ws/chat/{conv}/");
    assert_eq!(
        sender_seen_with(&server, &path, &[("Authorization", &auth)]).await,
        alice
    );
    assert_eq!(
        server
            .upgrade_status("/ws/notifications/", &[("Authorization", &auth)])
            .await,
        101
    );
}

#[tokio::test]
async fn bearer_scheme_matches_in_any_case() {
    let (server, alice, _, conv) = setup().await;
    let token = server.token(&alice);
    for scheme in ["bearer", "BEARER", "BeArEr", "Bearer"] {
        let auth = format!("{scheme} {token}");
        let path = format!("/ws/chat/{conv}/");
        assert_eq!(
            sender_seen_with(&server, &path, &[("Authorization", &auth)]).await,
            alice,
            "scheme {scheme}"
        );
        let status = server.request_with_header("/api/conversations/", &auth).await;
        assert_eq!(status, 200, "REST with scheme {scheme}");
    }
}

#[tokio::test]
async fn basic_authorization_is_not_a_match_and_the_subprotocol_is_tried_next() {
    let (server, alice, bob, conv) = setup().await;
    let proto = format!("bearer, {}", server.token(&bob));
    let path = format!("/ws/chat/{conv}/");
    let who = sender_seen_with(
        &server,
        &path,
        &[
            (
                "Authorization",
                &format!("Basic {}", base64url(format!("{alice}:pw").as_bytes())),
            ),
            ("Sec-WebSocket-Protocol", &proto),
        ],
    )
    .await;
    assert_eq!(who, bob);
}

#[tokio::test]
async fn basic_authorization_is_not_a_match_and_the_query_token_is_tried_next() {
    let (server, alice, bob, conv) = setup().await;
    let path = format!("/ws/chat/{conv}/?token={}", server.token(&bob));
    let basic = format!("Basic {}", base64url(format!("{alice}:pw").as_bytes()));
    assert_eq!(
        sender_seen_with(&server, &path, &[("Authorization", &basic)]).await,
        bob
    );
}

#[tokio::test]
async fn subprotocol_bearer_jwt_is_accepted_and_answered_with_bearer() {
    let (server, alice, _, conv) = setup().await;
    let proto = format!("bearer, {}", server.token(&alice));
    let ws = server
        .raw_ws(
            &format!("/ws/chat/{conv}/"),
            &[("Sec-WebSocket-Protocol", &proto)],
        )
        .await
        .unwrap_or_else(|a| panic!("refused {}", a.status));
    assert_eq!(ws.handshake.header("sec-websocket-protocol"), Some("bearer"));
    let path = format!("/ws/chat/{conv}/");
    assert_eq!(
        sender_seen_with(&server, &path, &[("Sec-WebSocket-Protocol", &proto)]).await,
        alice
    );
    let notif = server
        .raw_ws("/ws/notifications/", &[("Sec-WebSocket-Protocol", &proto)])
        .await
        .unwrap_or_else(|a| panic!("refused {}", a.status));
    assert_eq!(notif.handshake.header("sec-websocket-protocol"), Some("bearer"));
}

#[tokio::test]
async fn bearer_subprotocol_is_answered_even_when_the_header_carried_the_token() {
    let (server, alice, _, conv) = setup().await;
    let auth = format!("Bearer {}", server.token(&alice));
    let ws = server
        .raw_ws(
            &format!("/ws/chat/{conv}/"),
            &[("Authorization", &auth), ("Sec-WebSocket-Protocol", "bearer")],
        )
        .await
        .unwrap_or_else(|a| panic!("refused {}", a.status));
    assert_eq!(ws.handshake.header("sec-websocket-protocol"), Some("bearer"));
}

#[tokio::test]
async fn no_subprotocol_is_answered_when_none_was_offered() {
    let (server, alice, _, conv) = setup().await;
    let ws = server.raw_chat(conv, &alice).await;
    assert_eq!(ws.handshake.header("sec-websocket-protocol"), None);
}

#[tokio::test]
async fn query_token_is_accepted_as_the_last_resort() {
    let (server, alice, _, conv) = setup().await;
    let path = format!("/ws/chat/{conv}/?token={}", server.token(&alice));
    assert_eq!(sender_seen_with(&server, &path, &[]).await, alice);
    let path = format!("/ws/notifications/?token={}", server.token(&alice));
    assert_eq!(server.upgrade_status(&path, &[]).await, 101);
}

#[tokio::test]
async fn the_header_wins_over_the_subprotocol_and_the_query() {
    let (server, alice, bob, conv) = setup().await;
    let path = format!("/ws/chat/{conv}/?token={}", server.token(&bob));
    let auth = format!("Bearer {}", server.token(&alice));
    let proto = format!("bearer, {}", server.token(&bob));
    let who = sender_seen_with(
        &server,
        &path,
        &[("Authorization", &auth), ("Sec-WebSocket-Protocol", &proto)],
    )
    .await;
    assert_eq!(who, alice);
}

#[tokio::test]
async fn the_subprotocol_wins_over_the_query() {
    let (server, alice, bob, conv) = setup().await;
    let path = format!("/ws/chat/{conv}/?token={}", server.token(&bob));
    let proto = format!("bearer, {}", server.token(&alice));
    assert_eq!(
        sender_seen_with(&server, &path, &[("Sec-WebSocket-Protocol", &proto)]).await,
        alice
    );
}

#[tokio::test]
async fn first_match_wins_a_bad_header_token_is_not_rescued_by_a_good_query_token() {
    let (server, alice, _, conv) = setup().await;
    let path = format!("/ws/chat/{conv}/?token={}", server.token(&alice));
    assert_eq!(
        server
            .upgrade_status(&path, &[("Authorization", "Bearer not.a.token")])
            .await,
        401
    );
}

// -------------------------------------------------------- refused tokens --

#[tokio::test]
async fn a_missing_token_is_401() {
    let (server, _, _, conv) = setup().await;
    assert_eq!(
        server.upgrade_status(&format!("/ws/chat/{conv}/"), &[]).await,
        401
    );
    assert_eq!(server.upgrade_status("/ws/notifications/", &[]).await, 401);
    assert_eq!(
        server
            .upgrade_status("/ws/notifications/", &[("Authorization", "Bearer")])
            .await,
        401
    );
    assert_eq!(
        server
            .upgrade_status("/ws/notifications/", &[("Authorization", "Bearer ")])
            .await,
        401
    );
}

#[tokio::test]
async fn a_malformed_token_is_401() {
    let (server, _, _, conv) = setup().await;
    for bad in [
        "abc",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "Bearer x",
    ] {
        assert_eq!(chat_status(&server, conv, bad).await, 401, "token {bad:?}");
    }
}

#[tokio::test]
async fn an_expired_token_is_401() {
    let (server, alice, _, conv) = setup().await;
    let token = server.sign(&json!({"sub": alice, "exp": now_secs() - 120}));
    assert_eq!(chat_status(&server, conv, &token).await, 401);
}

#[tokio::test]
async fn a_token_expired_less_than_60_seconds_ago_is_accepted() {
    let (server, alice, _, conv) = setup().await;
    let token = server.sign(&json!({"sub": alice, "exp": now_secs() - 30}));
    assert_eq!(chat_status(&server, conv, &token).await, 101);
}

#[tokio::test]
async fn a_token_signed_with_another_key_is_401() {
    let (server, alice, _, conv) = setup().await;
    let claims = json!({"sub": alice, "exp": now_secs() + 3600});
    let token = sign_with(Algorithm::HS256, b"some-other-secret", &claims);
    assert_eq!(chat_status(&server, conv, &token).await, 401);
}

#[tokio::test]
async fn an_alg_none_token_is_401() {
    let (server, alice, _, conv) = setup().await;
    let token = unsigned_token(&json!({"sub": alice, "exp": now_secs() + 3600}));
    assert_eq!(chat_status(&server, conv, &token).await, 401);
}

#[tokio::test]
async fn an_hs512_token_when_hs256_is_configured_is_401() {
    let (server, alice, _, conv) = setup().await;
    let claims = json!({"sub": alice, "exp": now_secs() + 3600});
    let token = sign_with(Algorithm::HS512, server.secret().as_bytes(), &claims);
    assert_eq!(chat_status(&server, conv, &token).await, 401);
    let token = sign_with(Algorithm::HS384, server.secret().as_bytes(), &claims);
    assert_eq!(chat_status(&server, conv, &token).await, 401);
}

#[tokio::test]
async fn a_token_without_exp_is_401() {
    let (server, alice, _, conv) = setup().await;
    let token = server.sign(&json!({"sub": alice}));
    assert_eq!(chat_status(&server, conv, &token).await, 401);
}

#[tokio::test]
async fn a_token_whose_sub_is_not_a_username_is_401() {
    let (server, _, _, _) = setup().await;
    let bad_subs: Vec<Value> = vec![
        json!("has space"),
        json!("a".repeat(151)),
        json!(""),
        json!("slash/inside"),
        json!("sémaphore"),
        json!("colon:inside"),
        json!(42),
        json!(null),
        json!(["alice"]),
    ];
    for sub in bad_subs {
        let token = server.sign(&json!({"sub": sub, "exp": now_secs() + 3600}));
        assert_eq!(
            server
                .upgrade_status_with_token("/ws/notifications/", &token)
                .await,
            401,
            "sub {sub}"
        );
    }
    let token = server.sign(&json!({"exp": now_secs() + 3600}));
    assert_eq!(
        server
            .upgrade_status_with_token("/ws/notifications/", &token)
            .await,
        401,
        "no sub"
    );
}

#[tokio::test]
async fn a_username_of_150_characters_from_the_allowed_set_is_accepted() {
    let server = Server::start();
    let long = format!("{}{}", user("u"), "x".repeat(150))
        .chars()
        .take(150)
        .collect::<String>();
    let punct = user("a_b.c@d+e-F9");
    for name in [long, punct] {
        let token = server.token(&name);
        assert_eq!(
            server
                .upgrade_status_with_token("/ws/notifications/", &token)
                .await,
            101,
            "{name}"
        );
        let conv = server.create_conversation(&name, &[]).await;
        let mut ws = server.ws_chat(conv, &name).await;
        assert_eq!(say(&mut ws, "hi").await["sender"], name.as_str());
    }
}

#[tokio::test]
async fn nbf_in_the_future_is_refused() {
    let (server, alice, _, conv) = setup().await;
    let token = server.sign(&json!({"sub": alice, "exp": now_secs() + 3600, "nbf": now_secs() + 300}));
    assert_eq!(chat_status(&server, conv, &token).await, 401);
}

#[tokio::test]
async fn nbf_less_than_60_seconds_ahead_is_accepted() {
    let (server, alice, _, conv) = setup().await;
    let token = server.sign(&json!({"sub": alice, "exp": now_secs() + 3600, "nbf": now_secs() + 30}));
    assert_eq!(chat_status(&server, conv, &token).await, 101);
}

#[tokio::test]
async fn aud_and_iss_are_not_checked_unless_configured() {
    let (server, alice, _, conv) = setup().await;
    let token = server.sign(&json!({
        "sub": alice, "exp": now_secs() + 3600, "aud": "someone-else", "iss": "https://elsewhere"
    }));
    assert_eq!(chat_status(&server, conv, &token).await, 101);
}

// --------------------------------------------------- conversations, paths --

#[tokio::test]
async fn an_unknown_conversation_is_404() {
    let (server, alice, _, conv) = setup().await;
    let token = server.token(&alice);
    for path in [
        format!("/ws/chat/{}/", conv + 1_000_000),
        "/ws/chat/0/".to_string(),
        "/ws/chat/-1/".to_string(),
        "/ws/chat/abc/".to_string(),
        "/ws/chat/99999999999999999999999/".to_string(),
    ] {
        assert_eq!(
            server.upgrade_status_with_token(&path, &token).await,
            404,
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_user_who_is_not_a_participant_is_403() {
    let (server, _, _, conv) = setup().await;
    let token = server.token(&user("mallory"));
    assert_eq!(chat_status(&server, conv, &token).await, 403);
}

#[tokio::test]
async fn auth_is_checked_first_no_token_on_an_unknown_conversation_is_401() {
    let server = Server::start();
    assert_eq!(server.upgrade_status("/ws/chat/999999999/", &[]).await, 401);
    assert_eq!(server.upgrade_status("/ws/nowhere/", &[]).await, 401);
    let (server, _, _, conv) = setup().await;
    assert_eq!(chat_status(&server, conv, "garbage").await, 401);
}

#[tokio::test]
async fn an_unknown_ws_path_with_a_valid_token_is_404() {
    let server = Server::start();
    let token = server.token(&user("alice"));
    for path in [
        "/ws/nowhere/",
        "/ws/",
        "/ws/chat/",
        "/ws/notifications/extra/",
        "/ws/chat/1/x/",
    ] {
        assert_eq!(
            server.upgrade_status_with_token(path, &token).await,
            404,
            "{path}"
        );
    }
}

#[tokio::test]
async fn ws_paths_work_with_and_without_the_trailing_slash() {
    let (server, alice, _, conv) = setup().await;
    let token = server.token(&alice);
    for path in [
        format!("/ws/chat/{conv}/"),
        format!("/ws/chat/{conv}"),
        "/ws/notifications/".to_string(),
        "/ws/notifications".to_string(),
    ] {
        assert_eq!(
            server.upgrade_status_with_token(&path, &token).await,
            101,
            "{path}"
        );
    }
    let mut ws = server.ws(&format!("/ws/chat/{conv}"), &token).await;
    say(&mut ws, "no slash").await;
}

#[tokio::test]
async fn usernames_are_case_sensitive() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let upper = alice.to_uppercase();
    assert_eq!(chat_status(&server, conv, &server.token(&upper)).await, 403);
    let (status, _) = server
        .get(&format!("/api/conversations/{conv}/"), &server.token(&upper))
        .await;
    assert_eq!(status, 403);
}

/// (path, header lines, expected status)
type Refusal<'a> = (String, Vec<(&'a str, &'a str)>, u16);

#[tokio::test]
async fn refusals_are_http_answers_before_any_upgrade() {
    let (server, _, _, conv) = setup().await;
    let outsider = format!("Bearer {}", server.token(&user("mallory")));
    let cases: Vec<Refusal> = vec![
        (format!("/ws/chat/{conv}/"), vec![], 401),
        (
            "/ws/notifications/".into(),
            vec![("Authorization", "Bearer nope")],
            401,
        ),
        (
            "/ws/chat/999999999/".into(),
            vec![("Authorization", &outsider)],
            404,
        ),
        (
            format!("/ws/chat/{conv}/"),
            vec![("Authorization", &outsider)],
            403,
        ),
        ("/ws/elsewhere/".into(), vec![("Authorization", &outsider)], 404),
    ];
    for (path, headers, status) in cases {
        match server.raw_ws(&path, &headers).await {
            Ok(_) => panic!("{path} was upgraded"),
            Err(answer) => {
                assert_eq!(answer.status, status, "{path}");
                assert!(
                    answer.header("sec-websocket-accept").is_none(),
                    "{path}: a refusal carries no Sec-WebSocket-Accept"
                );
            }
        }
    }
}

// ------------------------------------------------------------------- REST --

#[tokio::test]
async fn rest_takes_the_token_from_the_header_or_the_query() {
    let server = Server::start();
    let alice = user("alice");
    let token = server.token(&alice);
    let (status, _) = server.get("/api/conversations/", &token).await;
    assert_eq!(status, 200);
    let (status, _) = server
        .request("GET", &format!("/api/conversations/?token={token}"), None, None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn rest_does_not_take_the_token_from_the_subprotocol_header() {
    let server = Server::start();
    let proto = format!("bearer, {}", server.token(&user("alice")));
    let status = server
        .request_with_headers("/api/conversations/", &[("Sec-WebSocket-Protocol", &proto)])
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn rest_refuses_the_same_bad_tokens_with_401() {
    let server = Server::start();
    let alice = user("alice");
    let tokens = vec![
        "garbage".to_string(),
        server.sign(&json!({"sub": alice, "exp": now_secs() - 120})),
        server.sign(&json!({"sub": alice})),
        unsigned_token(&json!({"sub": alice, "exp": now_secs() + 3600})),
        sign_with(
            Algorithm::HS512,
            server.secret().as_bytes(),
            &json!({"sub": alice, "exp": now_secs() + 3600}),
        ),
        server.sign(&json!({"sub": "bad sub", "exp": now_secs() + 3600})),
    ];
    for token in tokens {
        let answer = server.get("/api/conversations/", &token).await;
        assert_rest_error(&answer, 401, "unauthorized");
    }
}

// ------------------------------------------- operator options (own parley) --
//
// The flag names below are parley's CLI; PROTOCOL.md names only the options.

/// Flags that configure EdDSA with a public key file (the path is appended).
const FLAG_JWT_ALGORITHM: &str = "--jwt-algorithm";
const FLAG_JWT_PUBLIC_KEY_FILE: &str = "--jwt-public-key";
/// Turns off "a token without `exp` is refused".
const FLAGS_NO_EXP_REQUIRED: [&str; 2] = ["--jwt-require-exp", "false"];
const FLAG_JWT_AUDIENCE: &str = "--jwt-audience";
const FLAG_JWT_ISSUER: &str = "--jwt-issuer";

const ED25519_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJGqofbcDJv8MUY5PgCrr42Cj9FeH3M/H0F7udLhExDS
-----END PRIVATE KEY-----
";
const ED25519_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAmEXAjLXJbk41fpo4Oc/aAj2TbvPwvZSi7GPZGVxnAaY=
-----END PUBLIC KEY-----
";

// Test-only key pairs (generated with openssl for this suite).
const P256_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgiljwI2NW9wuHhJJD
LsalHkBYg6uk4+/mXmVNoSBS90mhRANCAAR+QsCLmL/AgD+H1qDlXpQkN4KQIXuz
lrnHJ9uofUZf62Cgbekxf5sMiEYqRl0Xw7Ksl3xDNkJTtQS2FsW3D2X7
-----END PRIVATE KEY-----
";
const P256_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEfkLAi5i/wIA/h9ag5V6UJDeCkCF7
s5a5xyfbqH1GX+tgoG3pMX+bDIhGKkZdF8OyrJd8QzZCU7UEthbFtw9l+w==
-----END PUBLIC KEY-----
";
const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDFTL1hYK/qvlfq
pxJjRY5jl8jZ0/uri6f5TdBQHW/HRWrklTb6x/hTQOLwGOU/rHvqNV1XzGCzphRp
VaBFlvgQKcvMxmn+tDr2jiSGtjFsBMb1cBRrBuFfv2HiKutD6FbdSSgzohCLywPB
jqcNe1Sn1AJwHoGWp96GLPq8F7x9Q4lp7hPXnqAMqdgZJ9aDZUl74GJIycUgT/HW
5yGpVKGgc60cnzdiAm6km29ivl4zOmiGN1R1UVTlLZEQJ9Sa+KMm2/cQL6E7sDLn
OUDhdZdpJPJCiV+oe68rvv6kdtr3y5VHnpowfoL6250I85l4Nn9puB8VMkRC0wjE
BM8phNDJAgMBAAECggEAQ2aaYaxKnIpm9Voa7X/jC0HckxGYbbuZaBD9o4jS2UPt
JuaUsCplOme1vyj6E/0EHfgaCbbfqC+J1Iw0YuGWn8rvfOahaio+5GCduMl/67Nc
Fpex2fgxQOjb8wwPcBTsq87kpXLtbRwvDc4CYpgpzOWf6ZZ6VbHGUpcGFwCS20V/
HZNlKWMyEjLF8MZULeGkSIi8iS2hsh1kCYadHKb0+tCuZzkhjX0CEWyGx+XWywM9
Qzp4I4WZf1UatJal3zs0XtN7+b8TP0FRiW/bIKhcq/nu/lgl3WPn4yAjoAsAHlde
spXQ48UsAnmjhgAc20uhhY5PLQ9Pn9iqRR8vZhR6WwKBgQD7zjF+WLAI0RIcyrYy
ySYB4hxyf6RCkmCbfcO5bDmzdgGO7c1AesuXhDHswFquCZ326ZrD5HJN2Dye/kVp
CQ4rZusy0DJHfETZjTE8YYChlvx5dNKaotRj9am3aT+pviFAQeIjPuF/xCSuOeZl
ibWxueacU2DOlJK5bShygy2pFwKBgQDIlhxcooSCGPFBi9UUZ+SFy9kW7rlRmFVj
UNi7pOl4GiH4rdPtk7gfiq1TXAgrnzVQPCjPRcFw0eX2XfQpQ1ZoYavAJeg4RQY5
pwmsweqkgboeUdTisyI9TQggMqB8B/ubkVVa1kLtxzc0VZZwz0acJpEns07b7m3u
mEz05XXBHwKBgFI7Adq657HZZMrWQC3RloHi71tM5719w+LDbVluSGGc1eFxMygt
cbMnTo58OqC/L0DlBM+YGOPnC9T4QH6OoHv3/jL33pONt4Y8H6oSRUl/3y9iwSwS
pL2ICkaFLm8mUgGEAm90J3vr9/aVnfHmyNkjVnYSnHiZ+Fhpl13eDNk9AoGBAJbu
7VR/Lbo/TnqF38ZFDt3mr+njpCrTt5zN3ugDhXJMJ7faBRhGCUwiq52IKNW6LQG8
4vBkitR7/NBPjkPmWYSdygECBSUiOzbyjAMkv40d2JCr/sa/CEqcRjsEHWJ3F0rO
Jy38/8uwFcgZhuRH89fX5W28LOCtHqdkjrPQXbT9AoGANpR4QeDBQfwd37xEw0H+
L7U6YyI/bAH8dvcFRJwtj30k5k8h7nhAsA0/B+gzwdOHFPHVPoPXTvP7m9HyN2wd
nsxrK+26ERVNoy0sT0PDiLcJkg5v/M/roJ3FcDMVZRecX5+4tSQeIMZNJ1WT6jOF
n+ANq/EdO7apq99njfeI0nI=
-----END PRIVATE KEY-----
";
const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxUy9YWCv6r5X6qcSY0WO
Y5fI2dP7q4un+U3QUB1vx0Vq5JU2+sf4U0Di8BjlP6x76jVdV8xgs6YUaVWgRZb4
ECnLzMZp/rQ69o4khrYxbATG9XAUawbhX79h4irrQ+hW3UkoM6IQi8sDwY6nDXtU
p9QCcB6Blqfehiz6vBe8fUOJae4T156gDKnYGSfWg2VJe+BiSMnFIE/x1uchqVSh
oHOtHJ83YgJupJtvYr5eMzpohjdUdVFU5S2RECfUmvijJtv3EC+hO7Ay5zlA4XWX
aSTyQolfqHuvK77+pHba98uVR56aMH6C+tudCPOZeDZ/abgfFTJEQtMIxATPKYTQ
yQIDAQAB
-----END PUBLIC KEY-----
";

/// An operator configures a public-key algorithm: tokens signed with the
/// matching private key pass; HS256 ones (even signed with the public key's
/// bytes, or with any secret) are refused.
async fn public_key_algorithm_accepts_its_tokens_and_refuses_hs256_ones(
    alg: Algorithm,
    name: &str,
    private: jsonwebtoken::EncodingKey,
    public_pem: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("public.pem");
    std::fs::write(&key_file, public_pem).unwrap();
    let key_path = key_file.to_str().unwrap();
    let server = crate::own_server!(FLAG_JWT_ALGORITHM, name, FLAG_JWT_PUBLIC_KEY_FILE, key_path);
    let claims = json!({"sub": user("alice"), "exp": now_secs() + 3600});
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &private).unwrap();
    assert_eq!(
        server
            .upgrade_status_with_token("/ws/notifications/", &token)
            .await,
        101,
        "{name} token"
    );
    let hs = sign_with(Algorithm::HS256, public_pem.as_bytes(), &claims);
    assert_eq!(
        server.upgrade_status_with_token("/ws/notifications/", &hs).await,
        401,
        "HS256 token signed with the {name} public key"
    );
    assert_eq!(
        server
            .upgrade_status_with_token("/ws/notifications/", &server.token("bob"))
            .await,
        401,
        "HS256 token on a {name} server"
    );
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn eddsa_with_a_configured_public_key_accepts_its_tokens_and_refuses_hs256_ones() {
    let key = jsonwebtoken::EncodingKey::from_ed_pem(ED25519_PRIVATE_PEM.as_bytes()).unwrap();
    public_key_algorithm_accepts_its_tokens_and_refuses_hs256_ones(
        Algorithm::EdDSA,
        "EdDSA",
        key,
        ED25519_PUBLIC_PEM,
    )
    .await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn es256_with_a_configured_public_key_accepts_its_tokens_and_refuses_hs256_ones() {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(P256_PRIVATE_PEM.as_bytes()).unwrap();
    public_key_algorithm_accepts_its_tokens_and_refuses_hs256_ones(
        Algorithm::ES256,
        "ES256",
        key,
        P256_PUBLIC_PEM,
    )
    .await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn rs256_with_a_configured_public_key_accepts_its_tokens_and_refuses_hs256_ones() {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
    public_key_algorithm_accepts_its_tokens_and_refuses_hs256_ones(
        Algorithm::RS256,
        "RS256",
        key,
        RSA_PUBLIC_PEM,
    )
    .await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_token_without_exp_is_accepted_when_the_operator_turns_that_off() {
    let server = crate::own_server!(FLAGS_NO_EXP_REQUIRED[0], FLAGS_NO_EXP_REQUIRED[1]);
    let token = server.sign(&json!({"sub": user("alice")}));
    assert_eq!(
        server
            .upgrade_status_with_token("/ws/notifications/", &token)
            .await,
        101
    );
    // exp, when present, is still checked.
    let expired = server.sign(&json!({"sub": user("alice"), "exp": now_secs() - 120}));
    assert_eq!(
        server
            .upgrade_status_with_token("/ws/notifications/", &expired)
            .await,
        401
    );
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn aud_and_iss_are_checked_when_configured() {
    let server = crate::own_server!(
        FLAG_JWT_AUDIENCE,
        "parley",
        FLAG_JWT_ISSUER,
        "https://auth.example"
    );
    let sub = user("alice");
    let exp = now_secs() + 3600;
    let good = server.sign(&json!({"sub": sub, "exp": exp, "aud": "parley", "iss": "https://auth.example"}));
    assert_eq!(
        server
            .upgrade_status_with_token("/ws/notifications/", &good)
            .await,
        101
    );
    for claims in [
        json!({"sub": sub, "exp": exp, "aud": "other", "iss": "https://auth.example"}),
        json!({"sub": sub, "exp": exp, "aud": "parley", "iss": "https://evil.example"}),
        json!({"sub": sub, "exp": exp, "iss": "https://auth.example"}),
        json!({"sub": sub, "exp": exp, "aud": "parley"}),
    ] {
        let token = server.sign(&claims);
        assert_eq!(
            server
                .upgrade_status_with_token("/ws/notifications/", &token)
                .await,
            401,
            "{claims}"
        );
    }
}
