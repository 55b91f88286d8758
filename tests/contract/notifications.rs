//! Part A and Part B "Notifications socket", the notification REST
//! endpoints, and the notifications socket's side of Part C "Frames".

use serde_json::{json, Value};

use crate::harness::*;

/// The live push of a notification: Part A's `{"message": {...}}`, nothing else.
async fn recv_notification(ws: &mut Ws) -> Value {
    let frame = recv_json(ws).await;
    assert_keys(&frame, &["message"]);
    assert_notification_shape(&frame["message"]);
    frame["message"].clone()
}

/// Posts a notification to `user` and checks it is the next thing on `ws`:
/// nothing else (e.g. a chat message's notification) came before it. A
/// notification is pushed in the order it is stored, so this proves absence
/// without waiting on silence.
async fn sentinel(server: &Server, user: &str, ws: &mut Ws) {
    let text = format!("sentinel {}", rand::random::<u32>());
    let posted = server.notify(user, &text).await;
    let got = recv_notification(ws).await;
    assert_eq!(
        got["message"], text,
        "{user}'s next notification is the sentinel, not {got}"
    );
    assert_eq!(got["id"], posted["id"]);
}

async fn list(server: &Server, user: &str, query: &str) -> Value {
    let (status, body) = server
        .get(&format!("/api/notifications/{query}"), &server.token(user))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_keys(&body, &["results", "next"]);
    for n in body["results"].as_array().unwrap() {
        assert_notification_shape(n);
    }
    body
}

fn ids(page: &Value) -> Vec<u64> {
    page["results"].as_array().unwrap().iter().map(id_of).collect()
}

async fn unread_count(server: &Server, user: &str) -> u64 {
    let (status, body) = server
        .get("/api/notifications/unread_count/", &server.token(user))
        .await;
    assert_eq!(status, 200);
    assert_keys(&body, &["count"]);
    body["count"].as_u64().unwrap()
}

// ------------------------------------------------------ service POST, live --

#[tokio::test]
async fn a_service_post_answers_201_with_the_notification() {
    let server = Server::start();
    let bob = user("bob");
    let (status, body) = server
        .post(
            "/api/notifications/",
            &server.service_token(),
            json!({"user": bob, "message": "notification text"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_notification_shape(&body);
    assert_eq!(body["message"], "notification text");
    assert_eq!(body["is_read"], false);
}

#[tokio::test]
async fn a_service_post_is_pushed_live_to_every_socket_of_the_user_in_part_a_shape() {
    let server = Server::start();
    let bob = user("bob");
    let mut n1 = server.ws_notifications(&bob).await;
    let mut n2 = server.ws_notifications(&bob).await;
    let created = server.notify(&bob, "you have mail").await;
    assert_eq!(recv_notification(&mut n1).await, created);
    assert_eq!(recv_notification(&mut n2).await, created);
}

#[tokio::test]
async fn a_service_post_reaches_no_other_user() {
    let server = Server::start();
    let (bob, carol) = (user("bob"), user("carol"));
    let mut carols = server.ws_notifications(&carol).await;
    let mut bobs = server.ws_notifications(&bob).await;
    server.notify(&bob, "for bob").await;
    recv_notification(&mut bobs).await;
    sentinel(&server, &carol, &mut carols).await;
    assert_eq!(
        ids(&list(&server, &carol, "").await).len(),
        1,
        "Carol: only the sentinel"
    );
}

#[tokio::test]
async fn posting_a_notification_with_a_user_token_is_403_forbidden() {
    let server = Server::start();
    let bob = user("bob");
    let answer = server
        .post(
            "/api/notifications/",
            &server.token(&user("alice")),
            json!({"user": bob, "message": "spoof"}),
        )
        .await;
    assert_rest_error(&answer, 403, "forbidden");
    assert_eq!(list(&server, &bob, "").await["results"], json!([]));
}

#[tokio::test]
async fn posting_a_notification_with_bad_fields_is_400_invalid_field() {
    let server = Server::start();
    let service = server.service_token();
    for body in [
        json!({"message": "no user"}),
        json!({"user": 5, "message": "x"}),
        json!({"user": "has space", "message": "x"}),
        json!({"user": "bob"}),
        json!({"user": "bob", "message": 5}),
        json!({"user": "bob", "message": ""}),
        json!({"user": "bob", "message": " \n\u{3000}"}),
    ] {
        let answer = server.post("/api/notifications/", &service, body.clone()).await;
        assert_rest_error(&answer, 400, "invalid_field");
    }
}

#[tokio::test]
async fn posting_a_notification_text_over_the_limit_is_400_too_large() {
    let server = Server::start();
    let answer = server
        .post(
            "/api/notifications/",
            &server.service_token(),
            json!({"user": user("bob"), "message": "a".repeat(MAX_CHARS + 1000)}),
        )
        .await;
    assert_rest_error(&answer, 400, "too_large");
}

#[tokio::test]
async fn notification_ids_are_positive_and_increasing() {
    let server = Server::start();
    let (bob, carol) = (user("bob"), user("carol"));
    let a = id_of(&server.notify(&bob, "1").await);
    let b = id_of(&server.notify(&carol, "2").await);
    let c = id_of(&server.notify(&bob, "3").await);
    assert!(0 < a && a < b && b < c);
}

// --------------------------------------------- notifications from chat --

#[tokio::test]
async fn a_chat_message_notifies_a_participant_with_only_a_notifications_socket_open() {
    let server = Server::start();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let mut bobs = server.ws_notifications(&bob).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    say(&mut ws, "are you there?").await;
    let n = recv_notification(&mut bobs).await;
    assert_eq!(n["is_read"], false);
    let text = n["message"].as_str().unwrap();
    assert!(text.contains(&alice), "the text names the sender: {text:?}");
}

#[tokio::test]
async fn a_chat_message_notifies_a_participant_with_no_socket_at_all() {
    let server = Server::start();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    say(&mut ws, "hello?").await;
    let page = list(&server, &bob, "").await;
    let results = page["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{page}");
    assert!(results[0]["message"].as_str().unwrap().contains(&alice));
    assert_eq!(unread_count(&server, &bob).await, 1);
}

#[tokio::test]
async fn a_chat_message_does_not_notify_a_participant_watching_the_conversation() {
    let server = Server::start();
    let (alice, carol) = (user("alice"), user("carol"));
    let conv = server.create_conversation(&alice, &[&carol]).await;
    let mut carols_notifications = server.ws_notifications(&carol).await;
    let mut carols_chat = server.ws_chat(conv, &carol).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    say(&mut ws, "you can see this").await;
    recv_json(&mut carols_chat).await;
    sentinel(&server, &carol, &mut carols_notifications).await;
    assert_eq!(
        ids(&list(&server, &carol, "").await).len(),
        1,
        "only the sentinel"
    );
}

#[tokio::test]
async fn a_chat_message_does_not_notify_its_sender() {
    let server = Server::start();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let mut alices = server.ws_notifications(&alice).await;
    let mut bobs = server.ws_notifications(&bob).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    say(&mut ws, "me").await;
    recv_notification(&mut bobs).await;
    sentinel(&server, &alice, &mut alices).await;
}

#[tokio::test]
async fn a_message_in_a_conversation_of_three_notifies_exactly_the_one_not_watching() {
    let server = Server::start();
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let conv = server.create_conversation(&alice, &[&bob, &carol]).await;
    // Bob watches (and has a notifications socket too); Carol only has a
    // notifications socket; Alice sends, with both kinds open.
    let mut alices = server.ws_notifications(&alice).await;
    let mut bobs = server.ws_notifications(&bob).await;
    let mut carols = server.ws_notifications(&carol).await;
    let mut bobs_chat = server.ws_chat(conv, &bob).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let echo = say(&mut ws, "three of us").await;
    assert_eq!(
        recv_json(&mut bobs_chat).await,
        echo,
        "Bob watches: he gets the message"
    );
    let n = recv_notification(&mut carols).await;
    assert!(
        n["message"].as_str().unwrap().contains(&alice),
        "Carol's notification names the sender: {n}"
    );
    sentinel(&server, &bob, &mut bobs).await;
    sentinel(&server, &alice, &mut alices).await;
    sentinel(&server, &carol, &mut carols).await;
    assert_eq!(
        ids(&list(&server, &bob, "").await).len(),
        1,
        "Bob: only the sentinel"
    );
    assert_eq!(
        ids(&list(&server, &alice, "").await).len(),
        1,
        "Alice: only the sentinel"
    );
    assert_eq!(
        ids(&list(&server, &carol, "").await).len(),
        2,
        "Carol: the message's and the sentinel"
    );
}

#[tokio::test]
async fn edits_and_deletes_notify_nobody() {
    let server = Server::start();
    let (alice, carol) = (user("alice"), user("carol"));
    let conv = server.create_conversation(&alice, &[&carol]).await;
    let mut carols = server.ws_notifications(&carol).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let id = id_of(&say(&mut ws, "to be edited").await);
    recv_notification(&mut carols).await;
    send_json(
        &mut ws,
        &json!({"type": "edit_message", "message_id": id, "content": "edited"}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["type"], "message.edited");
    send_json(&mut ws, &json!({"type": "delete_message", "message_id": id})).await;
    assert_eq!(recv_json(&mut ws).await["type"], "message.deleted");
    sentinel(&server, &carol, &mut carols).await;
    assert_eq!(
        ids(&list(&server, &carol, "").await).len(),
        2,
        "Carol: the message's notification and the sentinel, nothing for the edit or the delete"
    );
}

#[tokio::test]
async fn watching_is_decided_at_the_moment_of_the_message() {
    let server = Server::start();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let mut bobs = server.ws_notifications(&bob).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let mut bobs_chat = server.ws_chat(conv, &bob).await;
    say(&mut ws, "seen").await;
    recv_json(&mut bobs_chat).await;
    sentinel(&server, &bob, &mut bobs).await;
    bobs_chat.close(None).await.unwrap();
    // Wait until the server has seen the close.
    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut bobs_chat).await {}
    drop(bobs_chat);
    // A chat socket of Bob on another conversation does not count.
    let other = server.create_conversation(&bob, &[]).await;
    let _elsewhere = server.ws_chat(other, &bob).await;
    // The server may take a moment to forget the closed socket.
    let mut notified = false;
    for i in 0..20 {
        say(&mut ws, &format!("unseen {i}")).await;
        if tokio::time::timeout(
            std::time::Duration::from_millis(100),
            recv_notification(&mut bobs),
        )
        .await
        .is_ok()
        {
            notified = true;
            break;
        }
    }
    assert!(notified, "no notification after Bob closed his chat socket");
}

// ------------------------------------------------------------------- list --

#[tokio::test]
async fn the_list_is_newest_first() {
    let server = Server::start();
    let bob = user("bob");
    let made: Vec<u64> = {
        let mut v = vec![];
        for i in 0..5 {
            v.push(id_of(&server.notify(&bob, &format!("n{i}")).await));
        }
        v
    };
    let page = list(&server, &bob, "").await;
    let mut want = made.clone();
    want.reverse();
    assert_eq!(ids(&page), want);
    assert_eq!(page["results"][0]["message"], "n4");
    assert!(page["next"].is_null());
}

#[tokio::test]
async fn the_list_shows_the_callers_notifications_only() {
    let server = Server::start();
    let (bob, carol) = (user("bob"), user("carol"));
    let mine = id_of(&server.notify(&bob, "bob's").await);
    server.notify(&carol, "carol's").await;
    assert_eq!(ids(&list(&server, &bob, "").await), vec![mine]);
}

#[tokio::test]
async fn unread_true_lists_only_unread_and_unread_false_lists_all() {
    let server = Server::start();
    let bob = user("bob");
    let token = server.token(&bob);
    let a = id_of(&server.notify(&bob, "a").await);
    let b = id_of(&server.notify(&bob, "b").await);
    let c = id_of(&server.notify(&bob, "c").await);
    let (status, _) = server
        .post(&format!("/api/notifications/{b}/read/"), &token, json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(ids(&list(&server, &bob, "?unread=true").await), vec![c, a]);
    assert_eq!(ids(&list(&server, &bob, "?unread=false").await), vec![c, b, a]);
}

#[tokio::test]
async fn before_and_limit_page_through_with_next() {
    let server = Server::start();
    let bob = user("bob");
    let mut made = vec![];
    for i in 0..7 {
        made.push(id_of(&server.notify(&bob, &format!("{i}")).await));
    }
    made.reverse();
    let p1 = list(&server, &bob, "?limit=3").await;
    assert_eq!(ids(&p1), made[0..3]);
    assert_eq!(p1["next"], made[2]);
    let p2 = list(&server, &bob, &format!("?limit=3&before={}", made[2])).await;
    assert_eq!(ids(&p2), made[3..6]);
    assert_eq!(p2["next"], made[5]);
    let p3 = list(&server, &bob, &format!("?limit=3&before={}", made[5])).await;
    assert_eq!(ids(&p3), made[6..7]);
    assert!(p3["next"].is_null());
}

#[tokio::test]
async fn next_is_null_as_soon_as_no_older_item_remains_even_when_the_page_is_full() {
    let server = Server::start();
    let bob = user("bob");
    for i in 0..4 {
        server.notify(&bob, &format!("{i}")).await;
    }
    let page = list(&server, &bob, "?limit=4").await;
    assert_eq!(ids(&page).len(), 4);
    assert!(page["next"].is_null(), "{page}");
    // Same with the unread filter: the only older ones are read.
    let all = ids(&page);
    for id in &all[2..] {
        server
            .post(
                &format!("/api/notifications/{id}/read/"),
                &server.token(&bob),
                json!({}),
            )
            .await;
    }
    let page = list(&server, &bob, "?unread=true&limit=2").await;
    assert_eq!(ids(&page), all[0..2]);
    assert!(page["next"].is_null(), "{page}");
}

#[tokio::test]
async fn the_default_limit_is_50() {
    let server = Server::start();
    let bob = user("bob");
    for i in 0..51 {
        server.notify(&bob, &format!("{i}")).await;
    }
    let page = list(&server, &bob, "").await;
    assert_eq!(ids(&page).len(), 50);
    assert!(page["next"].is_u64());
    let last = list(&server, &bob, &format!("?before={}", page["next"])).await;
    assert_eq!(ids(&last).len(), 1);
    assert!(last["next"].is_null());
}

#[tokio::test]
async fn bad_limit_before_or_unread_is_400_invalid_field_nothing_clamped() {
    let server = Server::start();
    let token = server.token(&user("bob"));
    for q in [
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "limit=1000000000000000000000",
        "before=0",
        "before=-1",
        "before=abc",
        "before=1.5",
        "before=",
        "unread=yes",
        "unread=1",
        "unread=TRUE",
        "unread=",
    ] {
        let answer = server.get(&format!("/api/notifications/?{q}"), &token).await;
        assert_rest_error(&answer, 400, "invalid_field");
    }
    for q in ["limit=1", "limit=100", "unread=true", "unread=false", "before=1"] {
        let (status, _) = server.get(&format!("/api/notifications/?{q}"), &token).await;
        assert_eq!(status, 200, "{q}");
    }
}

// ---------------------------------------------------------- unread, read --

#[tokio::test]
async fn unread_count_answers_200_count() {
    let server = Server::start();
    let bob = user("bob");
    assert_eq!(unread_count(&server, &bob).await, 0);
    let a = id_of(&server.notify(&bob, "a").await);
    server.notify(&bob, "b").await;
    assert_eq!(unread_count(&server, &bob).await, 2);
    server
        .post(
            &format!("/api/notifications/{a}/read/"),
            &server.token(&bob),
            json!({}),
        )
        .await;
    assert_eq!(unread_count(&server, &bob).await, 1);
}

#[tokio::test]
async fn marking_read_answers_200_the_notification_with_is_read_true() {
    let server = Server::start();
    let bob = user("bob");
    let created = server.notify(&bob, "read me").await;
    let (status, body) = server
        .post_empty(
            &format!("/api/notifications/{}/read/", created["id"]),
            &server.token(&bob),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_notification_shape(&body);
    let mut want = created.clone();
    want["is_read"] = json!(true);
    assert_eq!(body, want);
    assert_eq!(list(&server, &bob, "").await["results"][0], want);
}

#[tokio::test]
async fn marking_read_is_idempotent() {
    let server = Server::start();
    let bob = user("bob");
    let id = id_of(&server.notify(&bob, "twice").await);
    let path = format!("/api/notifications/{id}/read/");
    let first = server.post(&path, &server.token(&bob), json!({})).await;
    let second = server.post(&path, &server.token(&bob), json!({})).await;
    assert_eq!(first.0, 200);
    assert_eq!(first, second);
    assert_eq!(unread_count(&server, &bob).await, 0);
}

#[tokio::test]
async fn marking_read_someone_elses_notification_is_404_and_changes_nothing() {
    let server = Server::start();
    let (bob, mallory) = (user("bob"), user("mallory"));
    let id = id_of(&server.notify(&bob, "private").await);
    let answer = server
        .post(
            &format!("/api/notifications/{id}/read/"),
            &server.token(&mallory),
            json!({}),
        )
        .await;
    assert_rest_error(&answer, 404, "not_found");
    assert_eq!(unread_count(&server, &bob).await, 1);
    assert_eq!(list(&server, &bob, "").await["results"][0]["is_read"], false);
}

#[tokio::test]
async fn marking_read_an_unknown_notification_is_404() {
    let server = Server::start();
    let token = server.token(&user("bob"));
    for id in ["999999999", "0", "abc"] {
        let answer = server
            .post(&format!("/api/notifications/{id}/read/"), &token, json!({}))
            .await;
        assert_rest_error(&answer, 404, "not_found");
    }
}

#[tokio::test]
async fn read_all_answers_how_many_it_changed_then_0() {
    let server = Server::start();
    let (bob, carol) = (user("bob"), user("carol"));
    let token = server.token(&bob);
    let a = id_of(&server.notify(&bob, "a").await);
    server.notify(&bob, "b").await;
    server.notify(&bob, "c").await;
    server.notify(&carol, "carol's").await;
    server
        .post(&format!("/api/notifications/{a}/read/"), &token, json!({}))
        .await;
    let (status, body) = server.post_empty("/api/notifications/read_all/", &token).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"updated": 2}));
    let (_, body) = server.post_empty("/api/notifications/read_all/", &token).await;
    assert_eq!(body, json!({"updated": 0}));
    assert_eq!(unread_count(&server, &bob).await, 0);
    assert_eq!(unread_count(&server, &carol).await, 1);
}

// ------------------------------------------------------------------ socket --

#[tokio::test]
async fn frames_sent_on_the_notifications_socket_are_answered_with_unknown_type() {
    let server = Server::start();
    let bob = user("bob");
    let mut ws = server.ws_notifications(&bob).await;
    let mut other = server.ws_notifications(&bob).await;
    let frames = [
        json!({"type": "chat_message", "message": "hi"}).to_string(),
        json!({"type": "mark_read", "id": 1}).to_string(),
        "not json".to_string(),
        "[1,2]".to_string(),
        "".to_string(),
    ];
    for f in &frames {
        send_text(&mut ws, f).await;
        assert_error(&recv_json(&mut ws).await, "unknown_type");
    }
    for b in [b"{\"type\":\"x\"}".to_vec(), vec![0xFF, 0x00]] {
        send_binary(&mut ws, &b).await;
        assert_error(&recv_json(&mut ws).await, "unknown_type");
    }
    // Still open, and only that socket was answered.
    let created = server.notify(&bob, "still here").await;
    assert_eq!(recv_notification(&mut ws).await, created);
    assert_eq!(recv_notification(&mut other).await, created);
}

#[tokio::test]
async fn notifications_socket_frame_of_exactly_65536_bytes_is_answered_unknown_type() {
    let server = Server::start();
    let mut ws = server.raw_notifications(&user("bob")).await;
    ws.send_frame(true, OP_TEXT, &vec![b'a'; MAX_FRAME]).await;
    assert_error(&ws.recv_json().await, "unknown_type");
}

#[tokio::test]
async fn notifications_socket_frame_over_the_limit_is_closed_with_1009() {
    let server = Server::start();
    let mut ws = server.raw_notifications(&user("bob")).await;
    ws.send_frame(true, OP_TEXT, &vec![b'a'; MAX_FRAME + 1]).await;
    assert_eq!(ws.expect_close().await, Some(1009));
}

#[tokio::test]
async fn notifications_socket_fragmented_message_over_the_limit_is_closed_with_1009() {
    let server = Server::start();
    let mut ws = server.raw_notifications(&user("bob")).await;
    ws.send_frame(false, OP_BINARY, &vec![b'a'; 40_000]).await;
    ws.send_frame(true, OP_CONT, &vec![b'a'; 40_000]).await;
    assert_eq!(ws.expect_close().await, Some(1009));
}

#[tokio::test]
async fn notifications_socket_invalid_utf8_is_closed_with_1007() {
    let server = Server::start();
    let mut ws = server.raw_notifications(&user("bob")).await;
    ws.send_frame(true, OP_TEXT, &[b'"', 0xC3, 0x28, b'"']).await;
    assert_eq!(ws.expect_close().await, Some(1007));
}
