//! README: "a bug panics in one socket's task: only that socket ends (tokio
//! contains the panic; its cleanup runs on drop). A panic in the sequencer
//! on one request drops that request and the writer goes on."
//!
//! No input makes parley panic on purpose, so these use the test-only hook
//! `PARLEY_TEST_PANIC=<site>:<text>` (src/test_hooks.rs, compiled only into
//! test builds through the `test-hooks` feature): the chat message with that
//! text panics there.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;
use crate::util::*;

const BOOM: &str = "boom-4f1c";

async fn open_sockets(server: &Spawned) -> f64 {
    let (_, body) = server.request_text("/metrics").await;
    metric(&body, "parley_open_sockets")
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_panic_in_one_socket_task_ends_only_that_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server = Spawned::start_with_env(
        dir.path().to_str().unwrap(),
        &[],
        &[("PARLEY_TEST_PANIC", &format!("socket:{BOOM}"))],
    );
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.conversation(&alice, &[&bob]).await;
    let mut doomed = server.ws_chat(conv, &alice).await;
    let mut a2 = server.ws_chat(conv, &alice).await;
    let mut b = server.ws_chat(conv, &bob).await;
    assert_eq!(open_sockets(&server).await, 3.0);

    send_json(&mut doomed, &json!({"type": "chat_message", "message": BOOM})).await;
    // That socket ends, without anything stored or broadcast.
    let end = recv_within(&mut doomed, Duration::from_secs(5)).await;
    assert!(end.is_none(), "the panicking socket answered {end:?}");
    // Its cleanup ran: the hub and the gauge forgot it.
    let mut n = open_sockets(&server).await;
    for _ in 0..50 {
        if n == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        n = open_sockets(&server).await;
    }
    assert_eq!(n, 2.0, "parley_open_sockets after the panicking socket ended");
    // The others: nothing arrived for the panicking message, and they chat on.
    let echo = say(&mut a2, "still here").await;
    assert_eq!(
        recv_json(&mut b).await,
        echo,
        "Bob's next event is the message after the panic"
    );
    let reply = say(&mut b, "me too").await;
    assert_eq!(recv_json(&mut a2).await, reply);
    let history = server.history(conv, &alice).await.expect("history");
    assert_eq!(
        history.len(),
        2,
        "only the two messages after the panic are stored"
    );
    assert!(alive(server.child.id()), "the server died");
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_panic_in_the_sequencer_drops_that_request_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Spawned::start_with_env(
        dir.path().to_str().unwrap(),
        &[],
        &[("PARLEY_TEST_PANIC", &format!("sequencer:{BOOM}"))],
    );
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.conversation(&alice, &[&bob]).await;
    let mut a = server.ws_chat(conv, &alice).await;
    let mut b = server.ws_chat(conv, &bob).await;
    let before = say(&mut a, "before").await;
    assert_eq!(recv_json(&mut b).await, before);

    send_json(&mut a, &json!({"type": "chat_message", "message": BOOM})).await;
    // The writer goes on: the next message is stored and broadcast, and it
    // is the first thing either socket sees after the dropped one.
    let after = say(&mut a, "after").await;
    assert_eq!(
        recv_json(&mut b).await,
        after,
        "Bob's next event is the message after the panic"
    );
    assert!(id_of(&after) > id_of(&before));
    let mut history = server.history(conv, &alice).await.expect("history");
    history.reverse();
    let texts: Vec<&str> = history.iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        ["before", "after"],
        "the panicking request left nothing behind"
    );
    // REST writes go through the same writer.
    let (status, body) = server
        .request(
            "POST",
            "/api/notifications/",
            Some(&server.service_token()),
            Some(json!({"user": bob, "message": "n"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}
