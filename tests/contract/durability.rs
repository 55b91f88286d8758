//! Part B "Durability": what a client saw survives a `kill -9`; ids keep
//! increasing across restarts; SIGTERM is a clean shutdown. These tests need
//! a parley of their own and are ignored against an external server.

use serde_json::json;

use crate::harness::*;
use crate::own_server;

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn acknowledged_messages_survive_kill_9() {
    let mut server = own_server!();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    for i in 0..300 {
        send_json(
            &mut ws,
            &json!({"type": "chat_message", "message": format!("durable {i}")}),
        )
        .await;
    }
    // Acknowledged = echoed back on the sender's socket.
    let acked = recv_n(&mut ws, 300).await;
    server.kill9();
    server.start_again();
    let mut history = server.history(conv, &alice).await;
    history.reverse();
    let history: Vec<_> = history
        .into_iter()
        .map(|mut m| {
            m.as_object_mut().unwrap().remove("edited");
            m
        })
        .collect();
    assert_eq!(history, acked);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn acknowledged_edits_and_deletes_survive_kill_9() {
    let mut server = own_server!();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let a = id_of(&say(&mut ws, "to edit").await);
    let b = id_of(&say(&mut ws, "to delete").await);
    send_json(
        &mut ws,
        &json!({"type": "edit_message", "message_id": a, "content": "edited"}),
    )
    .await;
    send_json(&mut ws, &json!({"type": "delete_message", "message_id": b})).await;
    recv_n(&mut ws, 2).await;
    server.kill9();
    server.start_again();
    let history = server.history(conv, &alice).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["id"], a);
    assert_eq!(history[0]["content"], "edited");
    assert_eq!(history[0]["edited"], true);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn answered_rest_writes_survive_kill_9() {
    let mut server = own_server!();
    let (alice, bob) = (user("alice"), user("bob"));
    let (_, conv) = server
        .post(
            "/api/conversations/",
            &server.token(&alice),
            json!({"participants": [bob], "title": "kept"}),
        )
        .await;
    let n1 = server.notify(&bob, "one").await;
    let n2 = server.notify(&bob, "two").await;
    let (_, read) = server
        .post(
            &format!("/api/notifications/{}/read/", n1["id"]),
            &server.token(&bob),
            json!({}),
        )
        .await;
    server.kill9();
    server.start_again();
    let (status, got) = server
        .get(
            &format!("/api/conversations/{}/", conv["id"]),
            &server.token(&bob),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(got, conv);
    let (_, list) = server.get("/api/notifications/", &server.token(&bob)).await;
    assert_eq!(list["results"], json!([n2, read]));
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn ids_keep_increasing_across_restarts() {
    let mut server = own_server!();
    let alice = user("alice");
    let c1 = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(c1, &alice).await;
    let m1 = id_of(&say(&mut ws, "before").await);
    let n1 = id_of(&server.notify(&alice, "before").await);
    drop(ws);
    server.restart();
    let c2 = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(c1, &alice).await;
    let m2 = id_of(&say(&mut ws, "after restart").await);
    let n2 = id_of(&server.notify(&alice, "after").await);
    drop(ws);
    server.kill9();
    server.start_again();
    let c3 = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(c1, &alice).await;
    let m3 = id_of(&say(&mut ws, "after kill").await);
    let n3 = id_of(&server.notify(&alice, "after kill").await);
    assert!(c1 < c2 && c2 < c3, "conversations {c1} {c2} {c3}");
    assert!(m1 < m2 && m2 < m3, "messages {m1} {m2} {m3}");
    assert!(n1 < n2 && n2 < n3, "notifications {n1} {n2} {n3}");
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn sigterm_closes_open_sockets_with_1001_and_exits_0() {
    let mut server = own_server!();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut chat = server.ws_chat(conv, &alice).await;
    let mut notes = server.ws_notifications(&alice).await;
    say(&mut chat, "last words").await;
    let (chat_close, notes_close, status) = tokio::join!(
        expect_close(&mut chat),
        expect_close(&mut notes),
        tokio::task::spawn_blocking(move || {
            let status = server.terminate();
            (status, server)
        })
    );
    let (status, mut server) = status.unwrap();
    assert_eq!(chat_close, Some(1001));
    assert_eq!(notes_close, Some(1001));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    // What was acknowledged before is there after.
    server.start_again();
    assert_eq!(server.history(conv, &alice).await[0]["content"], "last words");
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn healthz_is_200_after_a_restart() {
    let mut server = own_server!();
    server.restart();
    let (status, _, _) = server.get_text("/healthz").await;
    assert_eq!(status, 200);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn acknowledged_messages_survive_kill_9_in_fsync_mode() {
    let mut server = own_server!("--durability", "fsync");
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    for i in 0..50 {
        send_json(
            &mut ws,
            &json!({"type": "chat_message", "message": format!("fsynced {i}")}),
        )
        .await;
    }
    let acked = recv_n(&mut ws, 50).await;
    server.kill9();
    server.start_again();
    let history = server.history(conv, &alice).await;
    let mut contents: Vec<_> = history.iter().map(|m| m["content"].clone()).collect();
    contents.reverse();
    let want: Vec<_> = acked.iter().map(|m| m["content"].clone()).collect();
    assert_eq!(contents, want);
}
