//! `GET /api/conversations/{id}/messages/`: Part B's table row and Part C's
//! paging rules.

use serde_json::{json, Value};

use crate::harness::*;

fn path(conv: u64, query: &str) -> String {
    format!("/api/conversations/{conv}/messages/{query}")
}

async fn page(server: &Server, conv: u64, user: &str, query: &str) -> Value {
    let (status, body) = server.get(&path(conv, query), &server.token(user)).await;
    assert_eq!(status, 200, "{body}");
    assert_keys(&body, &["results", "next"]);
    body
}

fn ids(page: &Value) -> Vec<u64> {
    page["results"].as_array().unwrap().iter().map(id_of).collect()
}

/// Alice sends `n` messages without waiting; answers their echoes.
async fn burst(ws: &mut Ws, n: usize) -> Vec<Value> {
    for i in 0..n {
        send_json(ws, &json!({"type": "chat_message", "message": format!("m{i}")})).await;
    }
    recv_n(ws, n).await
}

#[tokio::test]
async fn history_items_are_the_message_shape_plus_edited() {
    let mut room = Room::open().await;
    let live = room.alice_says("hello").await;
    let body = page(&room.server, room.conv, &room.alice, "").await;
    let item = &body["results"][0];
    assert_keys(item, &["id", "sender", "content", "timestamp", "edited"]);
    let mut want = live.clone();
    want["edited"] = json!(false);
    assert_eq!(*item, want, "history shows what went out live");
}

#[tokio::test]
async fn history_is_newest_first() {
    let mut room = Room::open().await;
    let mut sent = vec![];
    for i in 0..4 {
        sent.push(id_of(&room.alice_says(&format!("{i}")).await));
        sent.push(id_of(&room.bob_says(&format!("reply {i}")).await));
    }
    sent.reverse();
    let body = page(&room.server, room.conv, &room.bob, "").await;
    assert_eq!(ids(&body), sent);
    assert!(body["next"].is_null());
}

#[tokio::test]
async fn history_items_always_carry_edited_false_when_never_edited() {
    let mut room = Room::open().await;
    room.alice_says("a").await;
    room.bob_says("b").await;
    for item in room.history().await {
        assert_eq!(item["edited"], false, "{item}");
    }
}

#[tokio::test]
async fn an_edited_message_shows_its_current_content_and_edited_true() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("v1").await);
    let other = id_of(&room.alice_says("untouched").await);
    for v in ["v2", "v3"] {
        room.alice_does(json!({"type": "edit_message", "message_id": id, "content": v}))
            .await;
    }
    let history = room.history().await;
    let item = history.iter().find(|m| m["id"] == id).unwrap();
    assert_eq!(item["content"], "v3");
    assert_eq!(item["edited"], true);
    assert_eq!(item["sender"], room.alice.as_str());
    let item = history.iter().find(|m| m["id"] == other).unwrap();
    assert_eq!(item["edited"], false);
}

#[tokio::test]
async fn deleted_messages_are_left_out() {
    let mut room = Room::open().await;
    let keep = id_of(&room.alice_says("keep").await);
    let gone = id_of(&room.alice_says("gone").await);
    let edited_then_gone = id_of(&room.alice_says("x").await);
    room.alice_does(json!({"type": "edit_message", "message_id": edited_then_gone, "content": "y"}))
        .await;
    for id in [gone, edited_then_gone] {
        room.alice_does(json!({"type": "delete_message", "message_id": id}))
            .await;
    }
    let history = room.history().await;
    assert_eq!(history.iter().map(id_of).collect::<Vec<_>>(), vec![keep]);
}

#[tokio::test]
async fn two_hundred_fifty_messages_walk_in_three_pages_of_100_without_gap_or_repeat() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let sent = burst(&mut ws, 250).await;
    // Delete every 25th: the walk skips them and still fills whole pages.
    let mut deleted = vec![];
    for m in sent.iter().step_by(25) {
        send_json(&mut ws, &json!({"type": "delete_message", "message_id": m["id"]})).await;
        deleted.push(id_of(m));
    }
    recv_n(&mut ws, deleted.len()).await;
    let mut want: Vec<u64> = sent
        .iter()
        .map(id_of)
        .filter(|id| !deleted.contains(id))
        .collect();
    want.reverse();
    assert_eq!(want.len(), 240);

    let p1 = page(&server, conv, &alice, "?limit=100").await;
    assert_eq!(ids(&p1), want[0..100]);
    assert_eq!(p1["next"], want[99]);
    let p2 = page(
        &server,
        conv,
        &alice,
        &format!("?limit=100&before={}", p1["next"]),
    )
    .await;
    assert_eq!(ids(&p2), want[100..200]);
    assert_eq!(p2["next"], want[199]);
    let p3 = page(
        &server,
        conv,
        &alice,
        &format!("?limit=100&before={}", p2["next"]),
    )
    .await;
    assert_eq!(ids(&p3), want[200..240]);
    assert!(p3["next"].is_null());
}

#[tokio::test]
async fn next_is_null_as_soon_as_no_older_message_remains_even_when_the_page_is_full() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let sent = burst(&mut ws, 5).await;
    let body = page(&server, conv, &alice, "?limit=5").await;
    assert_eq!(ids(&body).len(), 5);
    assert!(body["next"].is_null(), "{body}");
    // Also when the only older one is deleted.
    send_json(
        &mut ws,
        &json!({"type": "delete_message", "message_id": sent[0]["id"]}),
    )
    .await;
    recv_json(&mut ws).await;
    let body = page(&server, conv, &alice, "?limit=4").await;
    assert_eq!(ids(&body).len(), 4);
    assert!(body["next"].is_null(), "{body}");
}

#[tokio::test]
async fn before_is_exclusive_and_next_is_the_value_to_pass_as_before() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let sent: Vec<u64> = burst(&mut ws, 6).await.iter().map(id_of).collect();
    let body = page(&server, conv, &alice, &format!("?before={}", sent[3])).await;
    assert_eq!(ids(&body), vec![sent[2], sent[1], sent[0]]);
    let body = page(&server, conv, &alice, &format!("?before={}&limit=2", sent[5])).await;
    assert_eq!(ids(&body), vec![sent[4], sent[3]]);
    assert_eq!(body["next"], sent[3]);
    // before may be any positive integer, not only a message id.
    let body = page(&server, conv, &alice, &format!("?before={}", sent[5] + 1000)).await;
    assert_eq!(ids(&body).len(), 6);
}

#[tokio::test]
async fn the_default_limit_is_50() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    burst(&mut ws, 51).await;
    let body = page(&server, conv, &alice, "").await;
    assert_eq!(ids(&body).len(), 50);
    assert!(body["next"].is_u64());
}

#[tokio::test]
async fn an_empty_conversation_has_an_empty_history() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    assert_eq!(
        page(&server, conv, &alice, "").await,
        json!({"results": [], "next": null})
    );
}

#[tokio::test]
async fn bad_limit_or_before_is_400_invalid_field_nothing_clamped() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let token = server.token(&alice);
    for q in [
        "limit=0",
        "limit=101",
        "limit=-5",
        "limit=x",
        "limit=2.0",
        "limit=",
        "before=0",
        "before=-3",
        "before=x",
        "before=1e3",
        "before=",
    ] {
        let answer = server.get(&path(conv, &format!("?{q}")), &token).await;
        assert_rest_error(&answer, 400, "invalid_field");
    }
    for q in ["limit=1", "limit=100"] {
        let (status, _) = server.get(&path(conv, &format!("?{q}")), &token).await;
        assert_eq!(status, 200, "{q}");
    }
}

#[tokio::test]
async fn history_of_an_unknown_conversation_is_404_and_of_someone_elses_403() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let answer = server.get(&path(999_999_999, ""), &server.token(&alice)).await;
    assert_rest_error(&answer, 404, "not_found");
    let answer = server.get(&path(conv, ""), &server.token(&user("mallory"))).await;
    assert_rest_error(&answer, 403, "forbidden");
    let answer = server.request("GET", &path(conv, ""), None, None).await;
    assert_rest_error(&answer, 401, "unauthorized");
}
