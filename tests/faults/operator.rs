//! What an operator relies on: a bad configuration value exits with code 2
//! and names the flag; the generated secret is a file of mode 0600, reused
//! across restarts; and no token (nor the secret) ever reaches the logs,
//! even at `PARLEY_LOG=trace`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::harness::*;

/// A parley started as an operator starts it: no `--jwt-secret` (so it
/// generates one in the data dir), `PARLEY_LOG` as given, stderr into
/// `log`. Answers the child and its address.
fn start(data_dir: &Path, log_level: &str, log: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("PARLEY_LOG", log_level)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn parley");
    match announced_addr(&mut child) {
        Some(addr) => (child, addr),
        None => {
            let _ = child.kill();
            panic!("parley did not start: {:?}", std::fs::read_to_string(log));
        }
    }
}

/// SIGTERM and wait (so every log line is written).
fn stop(mut child: Child) {
    // SAFETY: kill(2) on a child we own and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().expect("wait for parley");
    assert!(status.success(), "parley exited {status} on SIGTERM");
}

/// A bad configuration: flags, environment, what the first line must name.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[test]
fn a_bad_configuration_value_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[Case] = &[
        (&["--max-frame-bytes", "banana"], &[], "--max-frame-bytes"),
        (&[], &[("PARLEY_MAX_FRAME_BYTES", "banana")], "--max-frame-bytes"),
        (&["--durability", "sometimes"], &[], "--durability"),
        (&[], &[("PARLEY_DURABILITY", "sometimes")], "--durability"),
        (&["--jwt-algorithm", "RS256"], &[], "--jwt-algorithm"),
        (
            &["--jwt-secret-file", "/nonexistent/secret"],
            &[],
            "--jwt-secret-file",
        ),
        (&["--ping-interval", "soon"], &[], "--ping-interval"),
    ];
    for (flags, env, names) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(*flags)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run parley");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or("");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flags:?} {env:?}: exit code (README: 2); stderr {stderr:?}"
        );
        assert!(
            first.contains(names),
            "{flags:?} {env:?}: the first line names {names}: {stderr:?}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening on"),
            "{flags:?} {env:?}: it announced it was listening"
        );
    }
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn the_generated_secret_is_a_0600_file_reused_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("parley.log");
    let data = dir.path().join("data");
    let (child, addr) = start(&data, "parley=info", &log);
    let path = data.join("jwt-secret");
    let mode = std::fs::metadata(&path)
        .expect("the generated secret file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode of {path:?}: {mode:o}");
    let secret = std::fs::read_to_string(&path).unwrap();
    let secret = secret.trim();
    assert!(secret.len() >= 32, "a secret of {} characters", secret.len());
    let token = sign_with(
        jsonwebtoken::Algorithm::HS256,
        secret.as_bytes(),
        &json!({"sub": user("alice"), "exp": now_secs() + 3600}),
    );
    let auth = format!("Bearer {token}");
    let upgrade = |addr: String| {
        let auth = auth.clone();
        async move {
            match RawWs::connect(&addr, "/ws/notifications/", &[("Authorization", &auth)]).await {
                Ok(_) => 101,
                Err(a) => a.status,
            }
        }
    };
    assert_eq!(
        upgrade(addr).await,
        101,
        "a token signed with the generated secret"
    );
    stop(child);

    let (child, addr) = start(&data, "parley=info", &log);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().trim(),
        secret,
        "the secret is reused after a restart"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(upgrade(addr).await, 101, "the same token after a restart");
    stop(child);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn no_token_or_secret_is_logged_even_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("parley.log");
    let data = dir.path().join("data");
    let (child, addr) = start(&data, "trace", &log);
    let secret = std::fs::read_to_string(data.join("jwt-secret"))
        .unwrap()
        .trim()
        .to_string();
    let sign =
        |claims: serde_json::Value| sign_with(jsonwebtoken::Algorithm::HS256, secret.as_bytes(), &claims);
    let alice = user("alice");
    let good = sign(json!({"sub": alice, "exp": now_secs() + 3600}));
    let service = sign(json!({"sub": "svc", "role": "service", "exp": now_secs() + 3600}));
    let expired = sign(json!({"sub": alice, "exp": now_secs() - 3600}));
    let forged = sign_with(
        jsonwebtoken::Algorithm::HS256,
        b"not the secret",
        &json!({"sub": alice, "exp": now_secs() + 3600}),
    );
    let garbage = "eyJub3QiOiJhIHRva2VuIn0.c2VjcmV0LWxvb2tpbmc.Z2FyYmFnZS1zaWduYXR1cmU";

    // Every way a token comes in, accepted or refused.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for t in [&good, &service, &expired, &forged, garbage] {
        let _ = http
            .get(format!("http://{addr}/api/conversations/"))
            .header("Authorization", format!("Bearer {t}"))
            .send()
            .await
            .unwrap();
        for path in ["/ws/notifications/", "/ws/chat/1/"] {
            let _ = RawWs::connect(&addr, path, &[("Authorization", &format!("Bearer {t}"))]).await;
            let _ = RawWs::connect(
                &addr,
                path,
                &[("Sec-WebSocket-Protocol", &format!("bearer, {t}"))],
            )
            .await;
        }
    }
    let (status, _) = {
        let r = http
            .post(format!("http://{addr}/api/notifications/"))
            .header("Authorization", format!("Bearer {service}"))
            .json(&json!({"user": alice, "message": "logged?"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(status, 201, "the service token works");
    let mut ws = RawWs::connect(
        &addr,
        "/ws/notifications/",
        &[("Authorization", &format!("Bearer {good}"))],
    )
    .await
    .unwrap_or_else(|a| panic!("upgrade refused: {a:?}"));
    ws.send_text("{\"type\": \"chat_message\"}").await;
    ws.recv_json().await;
    drop(ws);
    stop(child);

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .filter(|l| l.contains("TRACE") || l.contains("DEBUG"))
            .count()
            >= 5,
        "PARLEY_LOG=trace produced almost no log: nothing was checked ({} bytes)",
        text.len()
    );
    for (what, t) in [
        ("valid token", good.as_str()),
        ("service token", &service),
        ("expired token", &expired),
        ("forged token", &forged),
        ("garbage token", garbage),
    ] {
        // Each part of a JWT identifies it; the signature alone is enough to
        // replay a leaked one, the payload names the user.
        for (i, part) in t.split('.').enumerate().filter(|(_, p)| p.len() >= 8) {
            assert!(
                !text.contains(part),
                "part {i} of the {what} is in the log at PARLEY_LOG=trace"
            );
        }
    }
    assert!(!text.contains(&secret), "the secret is in the log");
}
