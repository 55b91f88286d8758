//! The store cannot be written (a full disk): writes are refused with
//! `unavailable` / 503 and nothing is broadcast, the server stays up, and it
//! recovers when space returns. And a second parley on the same data dir
//! refuses to start.

use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;
use crate::own_server;
use crate::util::*;

/// A tmpfs mounted for one test, unmounted when dropped (also on panic).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it, or fails the test: a full-disk test that cannot make a
    /// full disk has not checked anything. (Without root the test is
    /// compiled as ignored, see `build.rs`.)
    fn mount(size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "storage_faults needs root to mount a tmpfs (the build saw root, this run does not: \
             rebuild as this user so it is compiled as ignored, or run as root)"
        );
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Tmpfs { dir },
            other => panic!("cannot mount a tmpfs as root ({other:?}): the full-disk test cannot run"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn unavailable(frame: &Value) -> bool {
    frame["type"] == "error" && frame["code"] == "unavailable"
}

async fn healthz(server: &Spawned) -> u16 {
    server.request("GET", "/healthz", None, None).await.0
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[cfg_attr(parley_not_root, ignore = "needs root to mount a tmpfs (CI runs as root)")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_without_broadcasting_and_recovers_when_space_returns() {
    let fs = Tmpfs::mount("24m");
    // Space to give back later.
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 8 << 20]).expect("write filler");
    let data_dir: PathBuf = fs.path().join("data");
    let data = data_dir.to_str().unwrap().to_string();
    // parley refuses writes while less than 8 MiB are free, so neither the
    // commit log (1 MiB segments here) nor sled, which the background
    // applier writes in bursts of up to 1 MiB of log, ever meets a full disk
    // (sled cannot recover from one in-process). 4 MiB was enough when sled
    // was written synchronously; the margin must cover a burst.
    const FLAGS: [&str; 6] = [
        "--max-message-chars",
        "60000",
        "--min-free-bytes",
        "8388608",
        "--wal-segment-mib",
        "1",
    ];
    let server = Spawned::start(&data, &FLAGS);
    let pid = server.child.id();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.conversation(&alice, &[&bob]).await;
    let mut a = server.ws_chat(conv, &alice).await;
    let mut b = server.ws_chat(conv, &bob).await;

    // Fill the disk with big messages until the store refuses.
    let mut acked = vec![];
    let mut refused = None;
    for i in 0..2000 {
        let text = format!("{i:05} {}", "f".repeat(59_000));
        send_json(&mut a, &json!({"type": "chat_message", "message": text})).await;
        let answer = recv_json(&mut a).await;
        if unavailable(&answer) {
            assert_error(&answer, "unavailable");
            refused = Some(i);
            break;
        }
        assert_eq!(answer["content"], text, "{}", answer["type"]);
        assert_eq!(recv_json(&mut b).await, answer);
        acked.push(answer);
    }
    let refused = refused.expect("the store never filled up");
    eprintln!(
        "storage_faults: first `unavailable` after {} stored messages",
        acked.len()
    );

    // While full: every chat write is refused on its socket only.
    for i in 0..3 {
        send_json(
            &mut a,
            &json!({"type": "chat_message", "message": format!("small {i}")}),
        )
        .await;
        let answer = recv_json(&mut a).await;
        assert!(unavailable(&answer), "a write on a full disk: {answer}");
    }
    if let Some(last) = acked.last() {
        send_json(
            &mut a,
            &json!({"type": "edit_message", "message_id": id_of(last), "content": "e".repeat(50_000)}),
        )
        .await;
        let answer = recv_json(&mut a).await;
        assert!(unavailable(&answer), "an edit on a full disk: {answer}");
    }
    expect_silence(&mut b, 500).await;
    let answer = server
        .post(
            "/api/notifications/",
            &server.service_token(),
            json!({"user": bob, "message": "x"}),
        )
        .await;
    assert_rest_error(&answer, 503, "unavailable");
    let answer = server
        .post(
            "/api/conversations/",
            &server.token(&alice),
            json!({"participants": [bob]}),
        )
        .await;
    assert_rest_error(&answer, 503, "unavailable");
    assert_eq!(healthz(&server).await, 503, "/healthz on a full disk");
    assert!(alive(pid), "the server died on a full disk");
    // Reads go on, and show exactly what was acknowledged.
    let mut problems = vec![];
    let acked_ids: Vec<u64> = acked.iter().map(id_of).collect();
    let mut stored = server
        .history(conv, &alice)
        .await
        .unwrap_or_else(|e| panic!("history while the disk is full: {e:?}"));
    stored.reverse();
    assert_eq!(
        stored.iter().map(id_of).collect::<Vec<_>>(),
        acked_ids,
        "history while the disk is full: exactly the acknowledged messages"
    );
    // And a resume replays what followed its `after`, then stays open.
    assert!(
        acked.len() >= 4,
        "only {} messages fit before the disk filled",
        acked.len()
    );
    let after = id_of(&acked[acked.len() - 4]);
    let mut resumed = server
        .ws_path(&format!("/ws/chat/{conv}/?after={after}"), &bob)
        .await
        .unwrap_or_else(|status| panic!("resume while the disk is full: upgrade answered {status}"));
    let want = &acked[acked.len() - 3..];
    let got = recv_n(&mut resumed, want.len()).await;
    assert_eq!(got, want, "resume with ?after={after} while the disk is full");
    expect_silence(&mut resumed, 200).await;

    // Space returns: writes are taken again, without a restart.
    std::fs::remove_file(&filler).expect("remove filler");
    let start = Instant::now();
    let mut health = healthz(&server).await;
    while health != 200 && start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = healthz(&server).await;
    }
    assert_eq!(health, 200, "/healthz 3 s after space returned");
    send_json(
        &mut a,
        &json!({"type": "chat_message", "message": "space is back"}),
    )
    .await;
    let recovered = recv_json(&mut a).await;
    assert_eq!(recovered["content"], "space is back", "{recovered}");
    assert_eq!(recv_json(&mut b).await, recovered);
    assert_eq!(
        recv_json(&mut resumed).await,
        recovered,
        "the socket resumed during the full disk continues live"
    );
    let (status, n) = server
        .request(
            "POST",
            "/api/notifications/",
            Some(&server.service_token()),
            Some(json!({"user": bob, "message": "back"})),
        )
        .await;
    if status != 201 {
        problems.push(format!("a REST write after space returned answered {status} {n}"));
    }
    match server.history(conv, &alice).await {
        Ok(mut history) => {
            history.reverse();
            let ids: Vec<u64> = history.iter().map(id_of).collect();
            let mut want = acked_ids.clone();
            want.push(id_of(&recovered));
            if ids != want {
                problems.push(format!(
                    "after recovery, history ends {:?}, not with the acknowledged {:?}",
                    &ids[ids.len().saturating_sub(4)..],
                    &want[want.len().saturating_sub(4)..]
                ));
            }
        }
        Err(e) => problems.push(format!("history after recovery: {e:?}")),
    }
    assert!(alive(pid), "the server died");
    drop(server);

    // And what was stored survives a restart.
    let server = Spawned::start(&data, &FLAGS);
    let history = server
        .history(conv, &alice)
        .await
        .expect("history after a restart");
    assert_eq!(history.len(), acked_ids.len() + 1, "history after a restart");
    assert!(
        problems.is_empty(),
        "full disk (refused from message #{refused}): {problems:#?}"
    );
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_second_parley_on_the_same_data_dir_refuses_to_start() {
    let server = own_server!();
    let data = data_dir_of(&server);
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;

    let mut second = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--jwt-secret",
            SECRET,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a second parley");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let out = second.wait_with_output().unwrap();
            panic!(
                "a second parley on the same data dir is still running after 10 s; stdout {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("storage_faults: second parley exited {status}: {}", stderr.trim());
    assert_eq!(
        status.code(),
        Some(1),
        "the second parley's exit code (README: exit 1)"
    );
    assert!(
        stderr.contains(&format!("the data dir {data}")) && stderr.contains("is in use by another parley"),
        "README promises \"the data dir … is in use by another parley\"; stderr was {stderr:?}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "the second parley announced it was listening"
    );
    // The first keeps serving.
    say(&mut ws, "still serving").await;
    assert_eq!(server.request("GET", "/healthz", None, None).await.0, 200);
}

/// README's "another store I/O error" row, caused from outside: with no free
/// margin (`--min-free-bytes 0`) the engines themselves meet a full disk
/// (the commit log when it needs a new segment, or sled, which keeps such
/// an error for good). Writes answer `unavailable`/503 and nothing refused
/// is shown, reads go on showing exactly what was acknowledged, `/healthz`
/// is 503, SIGTERM still exits promptly, and a restart recovers every
/// acknowledged write.
#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[cfg_attr(parley_not_root, ignore = "needs root to mount a tmpfs (CI runs as root)")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_io_error_refuses_writes_keeps_reads_and_a_restart_keeps_every_acknowledged_write() {
    let fs = Tmpfs::mount("24m");
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 8 << 20]).expect("write filler");
    let data = fs.path().join("data").to_str().unwrap().to_string();
    const FLAGS: [&str; 6] = [
        "--max-message-chars",
        "60000",
        "--min-free-bytes",
        "0",
        "--wal-segment-mib",
        "1",
    ];
    let mut server = Spawned::start(&data, &FLAGS);
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.conversation(&alice, &[&bob]).await;
    let mut a = server.ws_chat(conv, &alice).await;
    let mut b = server.ws_chat(conv, &bob).await;

    let mut acked = vec![];
    let mut failed = false;
    for i in 0..2000 {
        let text = format!("{i:05} {}", "f".repeat(59_000));
        send_json(&mut a, &json!({"type": "chat_message", "message": text})).await;
        let answer = recv_json(&mut a).await;
        if unavailable(&answer) {
            failed = true;
            break;
        }
        assert_eq!(answer["content"], text);
        assert_eq!(recv_json(&mut b).await, answer);
        acked.push(id_of(&answer));
    }
    assert!(failed, "the store never failed");
    eprintln!(
        "storage_faults: the store failed after {} stored messages",
        acked.len()
    );

    // While it lasts: writes refused (small ones too), health 503, and
    // nothing refused is ever shown: reads show exactly what was
    // acknowledged, or, if it was sled that met the full disk (sled 0.34
    // then fails every operation), answer 503 until the restart.
    send_json(
        &mut a,
        &json!({"type": "chat_message", "message": "after the error"}),
    )
    .await;
    assert!(unavailable(&recv_json(&mut a).await), "a write on a full disk");
    let answer = server
        .post(
            "/api/notifications/",
            &server.service_token(),
            json!({"user": bob, "message": "x"}),
        )
        .await;
    assert_rest_error(&answer, 503, "unavailable");
    match server.history(conv, &alice).await {
        Ok(mut history) => {
            history.reverse();
            assert_eq!(
                history.iter().map(id_of).collect::<Vec<_>>(),
                acked,
                "history on a full disk"
            );
        }
        Err((503, body)) => assert_eq!(body["error"], "unavailable", "{body}"),
        Err(other) => panic!("history on a full disk: {other:?}"),
    }
    assert_eq!(healthz(&server).await, 503, "/healthz on a full disk");
    expect_silence(&mut b, 200).await;
    std::fs::remove_file(&filler).expect("remove filler");

    // SIGTERM exits promptly.
    let pid = server.child.id();
    // SAFETY: kill(2) on a child we own and have not reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no exit within 5 s of SIGTERM on a failed store"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "storage_faults: failed store, SIGTERM → {status} in {:?}",
        start.elapsed()
    );
    drop(server);

    // A restart recovers, with every acknowledged write and nothing else.
    let server = Spawned::start(&data, &FLAGS);
    let mut history = server
        .history(conv, &alice)
        .await
        .expect("history after a restart");
    history.reverse();
    assert_eq!(
        history.iter().map(id_of).collect::<Vec<_>>(),
        acked,
        "history after a restart"
    );
    let mut a = server.ws_chat(conv, &alice).await;
    assert_eq!(say(&mut a, "recovered").await["content"], "recovered");
}
