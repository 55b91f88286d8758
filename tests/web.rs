//! What sits around the API, against the real binary as an operator starts
//! it: the console's files, its token minting (zero-configuration on
//! loopback only), the OpenAPI document, CORS, `--log-format json` with a
//! connection id per socket line, and `parley check-config`.
//!
//! These tests spawn their own `parley` with their own flags (no
//! `--jwt-secret` where minting is tested), so they use only the contract
//! harness's start-up wait.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

#[path = "contract/harness.rs"]
mod harness;

const BIN: &str = env!("CARGO_BIN_EXE_parley");

/// A spawned parley; killed on drop.
struct Parley {
    child: Child,
    /// `127.0.0.1:port`, whatever address it listens on.
    addr: String,
    _dir: tempfile::TempDir,
}

impl Parley {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Parley {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn parley");
        let addr = harness::announced_addr(&mut child).expect("parley printed `listening on http://ADDR`");
        let port = addr.rsplit(':').next().expect("port");
        Parley {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops it and answers everything it wrote to stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Parley {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn mint(p: &Parley, username: &str) -> (u16, Value) {
    let r = http()
        .post(p.url("/api/console/token"))
        .body(json!({ "username": username }).to_string())
        .send()
        .await
        .expect("mint request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn console_client_and_openapi_are_served_from_the_binary() {
    let p = Parley::start(&[], &[]);
    let c = http();
    for (path, ctype, needle) in [
        ("/", "text/html", "parley console"),
        ("/console/app.js", "text/javascript", "/client/parley.js"),
        ("/client/parley.js", "text/javascript", "export function connect"),
        ("/client/parley.d.ts", "text/plain", "export class Connection"),
        ("/api/openapi.json", "application/json", "\"openapi\""),
    ] {
        let r = c.get(p.url(path)).send().await.expect("get");
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with(ctype), "{path}: {ct}");
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    let doc: Value = c
        .get(p.url("/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        c.get(p.url("/console/nope.js")).send().await.unwrap().status(),
        404
    );
    assert_eq!(c.post(p.url("/")).send().await.unwrap().status(), 405);
}

#[tokio::test]
async fn zero_config_on_loopback_mints_tokens_the_api_accepts() {
    let p = Parley::start(&[], &[]);
    let (status, body) = mint(&p, "alice").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["username"], "alice");
    let token = body["token"].as_str().expect("token");
    let r = http()
        .get(p.url("/api/conversations/"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, body) = mint(&p, "not a name").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_field")));
    let r = http().get(p.url("/api/console/token")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn a_configured_secret_turns_minting_off() {
    let p = Parley::start(&["--jwt-secret", "configured"], &[]);
    let (status, body) = mint(&p, "alice").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let p = Parley::start(&[], &[("PARLEY_JWT_SECRET", "configured")]);
    assert_eq!(mint(&p, "alice").await.0, 404);
}

#[tokio::test]
async fn a_non_loopback_address_turns_minting_off() {
    // Zero configuration otherwise: the secret is generated in the data dir.
    let p = Parley::start(&["--listen", "0.0.0.0:0"], &[]);
    let (status, body) = mint(&p, "alice").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn cors_answers_listed_origins_and_refuses_others() {
    let p = Parley::start(
        &["--cors-origins", "http://app.example:3000, https://other.example"],
        &[],
    );
    let c = http();
    let preflight = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, p.url("/api/conversations/"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let ok = preflight("http://app.example:3000").await.unwrap();
    assert_eq!(ok.status(), 204);
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], "http://app.example:3000");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let refused = preflight("http://evil.example").await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.headers().get("access-control-allow-origin").is_none());

    // The actual call: readable by a listed origin only.
    let token = mint(&p, "alice").await.1["token"].as_str().unwrap().to_string();
    let get = |origin: &'static str| {
        c.get(p.url("/api/conversations/"))
            .bearer_auth(&token)
            .header("origin", origin)
            .send()
    };
    let r = get("https://other.example").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://other.example"
    );
    assert_eq!(r.headers()["vary"], "Origin");
    let r = get("http://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Errors carry the header too, so a page can read them.
    let r = c
        .get(p.url("/api/conversations/"))
        .header("origin", "https://other.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://other.example"
    );
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let p = Parley::start(&[], &[]);
    let c = http();
    let r = c
        .request(reqwest::Method::OPTIONS, p.url("/api/conversations/"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .get(p.url("/healthz"))
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(r.headers().get("vary").is_none());
}

#[tokio::test]
async fn only_get_opens_a_socket_or_reads_health() {
    let p = Parley::start(&[], &[]);
    let c = http();
    for path in ["/ws/notifications/", "/ws/chat/1/", "/healthz", "/metrics"] {
        let r = c.post(p.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 405, "POST {path}");
        assert_eq!(r.headers()["allow"], "GET", "POST {path}");
    }
}

#[tokio::test]
async fn json_logs_carry_the_connection_id_of_each_socket() {
    let p = Parley::start(&["--log-format", "json"], &[("PARLEY_LOG", "parley=debug")]);
    let token = mint(&p, "alice").await.1["token"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let mut req = format!("ws://{}/ws/notifications/", p.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("socket");
        ws.close(None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = p.stop();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let of = |msg: &str| -> Vec<u64> {
        lines
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(msg))
            })
            .map(|l| {
                l["fields"]["conn"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no conn id: {l}"))
            })
            .collect()
    };
    let opened = of("socket open");
    assert_eq!(opened.len(), 2, "{logs}");
    assert_ne!(opened[0], opened[1], "each socket has its own id");
    let mut closed = of("socket");
    closed.retain(|id| opened.contains(id));
    assert_eq!(closed.len(), 4, "every line of both sockets has its id: {logs}");
}

#[test]
fn check_config_prints_the_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--data-dir"])
        .arg(dir.path())
        .args([
            "--jwt-secret",
            "hunter2-very-secret",
            "--cors-origins",
            "https://app.example",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("<redacted, 19 bytes>"), "{text}");
    assert!(text.contains("https://app.example"), "{text}");
    assert!(text.contains("durability             sync"), "{text}");
    assert!(text.contains("console-token-minting  off"), "{text}");
    // Nothing was created in the data dir.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let out = Command::new(BIN)
        .args(["check-config", "--max-frame-bytes", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--max-frame-bytes"), "{err}");
}
