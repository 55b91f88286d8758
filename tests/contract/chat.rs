//! Part A and Part B "Chat socket": the three client frames, the three
//! server events, their exact shapes, and who gets them in which order.

use serde_json::{json, Value};

use crate::harness::*;

#[tokio::test]
async fn chat_message_is_broadcast_as_id_sender_content_timestamp_only() {
    let mut room = Room::open().await;
    let event = room.alice_says("your message text").await;
    assert_message_shape(&event);
    assert_eq!(event["content"], "your message text");
}

#[tokio::test]
async fn sender_is_the_username_from_the_token_sub() {
    let mut room = Room::open().await;
    let event = room.alice_says("hi").await;
    assert_eq!(event["sender"], room.alice.as_str());
    let event = room.bob_says("hello").await;
    assert_eq!(event["sender"], room.bob.as_str());
}

#[tokio::test]
async fn timestamp_is_utc_rfc3339_with_z_suffix() {
    let mut room = Room::open().await;
    let event = room.alice_says("what time is it").await;
    assert_timestamp(&event["timestamp"]);
}

#[tokio::test]
async fn message_ids_are_positive_unique_and_increasing() {
    let mut room = Room::open().await;
    let mut last = 0;
    for i in 0..5 {
        let id = id_of(&room.alice_says(&format!("m{i}")).await);
        assert!(id > last, "id {id} after {last}");
        last = id;
        let id = id_of(&room.bob_says(&format!("r{i}")).await);
        assert!(id > last, "id {id} after {last}");
        last = id;
    }
}

#[tokio::test]
async fn message_ids_increase_across_conversations() {
    let server = Server::start();
    let alice = user("alice");
    let c1 = server.create_conversation(&alice, &[]).await;
    let c2 = server.create_conversation(&alice, &[]).await;
    let mut w1 = server.ws_chat(c1, &alice).await;
    let mut w2 = server.ws_chat(c2, &alice).await;
    let a = id_of(&say(&mut w1, "one").await);
    let b = id_of(&say(&mut w2, "two").await);
    let c = id_of(&say(&mut w1, "three").await);
    assert!(a < b && b < c, "{a} {b} {c}");
}

#[tokio::test]
async fn edit_message_is_broadcast_as_message_edited_with_id_and_content_only() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("draft").await);
    let event = room
        .alice_does(json!({"type": "edit_message", "message_id": id, "content": "new text"}))
        .await;
    assert_keys(&event, &["type", "message"]);
    assert_eq!(event["type"], "message.edited");
    assert_keys(&event["message"], &["id", "content"]);
    assert_eq!(event["message"]["id"], id);
    assert_eq!(event["message"]["content"], "new text");
}

#[tokio::test]
async fn delete_message_is_broadcast_as_message_deleted_with_message_id_only() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("oops").await);
    let event = room
        .alice_does(json!({"type": "delete_message", "message_id": id}))
        .await;
    assert_keys(&event, &["type", "message_id"]);
    assert_eq!(event["type"], "message.deleted");
    assert_eq!(event["message_id"], id);
}

#[tokio::test]
async fn every_event_goes_to_every_socket_of_the_conversation_senders_own_included() {
    // Room::alice_does asserts that a1 (the sender), a2 (her other socket)
    // and b (another participant) all get the same event.
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("to everyone").await);
    room.alice_does(json!({"type": "edit_message", "message_id": id, "content": "edited"}))
        .await;
    room.alice_does(json!({"type": "delete_message", "message_id": id}))
        .await;
    room.bob_says("from bob, to everyone").await;
}

#[tokio::test]
async fn events_of_a_conversation_do_not_reach_sockets_of_another() {
    let mut room = Room::open().await;
    let other = room.server.create_conversation(&room.alice, &[&room.bob]).await;
    let mut elsewhere = room.server.ws_chat(other, &room.bob).await;
    let id = id_of(&room.alice_says("only here").await);
    room.alice_does(json!({"type": "edit_message", "message_id": id, "content": "x"}))
        .await;
    room.alice_does(json!({"type": "delete_message", "message_id": id}))
        .await;
    // A message in the other conversation is the first thing that socket sees.
    let mut other_sender = room.server.ws_chat(other, &room.alice).await;
    let sentinel = say(&mut other_sender, "in the other conversation").await;
    assert_eq!(
        recv_json(&mut elsewhere).await,
        sentinel,
        "the other conversation's socket got nothing before"
    );
}

#[tokio::test]
async fn a_pipelined_burst_of_50_arrives_at_three_sockets_in_the_same_order_with_increasing_ids() {
    let mut room = Room::open().await;
    let texts: Vec<String> = (0..50).map(|i| format!("burst {i}")).collect();
    for t in &texts {
        send_json(&mut room.a1, &json!({"type": "chat_message", "message": t})).await;
    }
    let got_a1 = recv_n(&mut room.a1, 50).await;
    let got_a2 = recv_n(&mut room.a2, 50).await;
    let got_b = recv_n(&mut room.b, 50).await;
    let contents: Vec<&str> = got_a1.iter().map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(contents, texts.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(got_a1, got_a2);
    assert_eq!(got_a1, got_b);
    let ids: Vec<u64> = got_a1.iter().map(id_of).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids not increasing: {ids:?}");
}

#[tokio::test]
async fn every_socket_sees_interleaved_senders_in_one_order_the_accepted_order() {
    let mut room = Room::open().await;
    for i in 0..25 {
        send_json(
            &mut room.a1,
            &json!({"type": "chat_message", "message": format!("a{i}")}),
        )
        .await;
        send_json(
            &mut room.b,
            &json!({"type": "chat_message", "message": format!("b{i}")}),
        )
        .await;
    }
    let got_a1 = recv_n(&mut room.a1, 50).await;
    let got_a2 = recv_n(&mut room.a2, 50).await;
    let got_b = recv_n(&mut room.b, 50).await;
    assert_eq!(got_a1, got_a2);
    assert_eq!(got_a1, got_b);
    let ids: Vec<u64> = got_a1.iter().map(id_of).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "accepted order is id order: {ids:?}"
    );
    // Each sender's own messages keep their order.
    for prefix in ["a", "b"] {
        let mine: Vec<&str> = got_a1
            .iter()
            .map(|e| e["content"].as_str().unwrap())
            .filter(|c| c.starts_with(prefix))
            .collect();
        let want: Vec<String> = (0..25).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(mine, want);
    }
}

#[tokio::test]
async fn a_client_may_send_edit_and_delete_without_waiting() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("first").await);
    send_json(
        &mut room.a1,
        &json!({"type": "chat_message", "message": "second"}),
    )
    .await;
    send_json(
        &mut room.a1,
        &json!({"type": "edit_message", "message_id": id, "content": "first!"}),
    )
    .await;
    send_json(&mut room.a1, &json!({"type": "delete_message", "message_id": id})).await;
    for ws in [&mut room.a1, &mut room.a2, &mut room.b] {
        let got = recv_n(ws, 3).await;
        assert_eq!(got[0]["content"], "second");
        assert_eq!(got[1]["type"], "message.edited");
        assert_eq!(got[2]["type"], "message.deleted");
    }
}

/// Texts that must come back byte for byte.
fn exact_texts() -> Vec<String> {
    vec![
        "  leading and trailing spaces  ".into(),
        "tab\tnewline\ncarriage\rreturn".into(),
        "NUL\u{0}inside".into(),
        "\u{1}\u{1f}\u{7f} control characters".into(),
        "سلام دنیا — Persian, right to left".into(),
        "emoji 😀👍🏽 and a family 👨‍👩‍👧".into(),
        "combining e\u{301} and \u{200B}zero width".into(),
        "quotes \" backslash \\ slash / <html>&amp;".into(),
        "\u{FEFF}BOM first".into(),
        "x".into(),
    ]
}

#[tokio::test]
async fn message_text_is_stored_and_echoed_exactly_as_sent() {
    let mut room = Room::open().await;
    let mut sent = vec![];
    for t in exact_texts() {
        let event = room.alice_says(&t).await;
        assert_eq!(event["content"].as_str(), Some(t.as_str()));
        sent.push((id_of(&event), t));
    }
    let history = room.history().await;
    for (id, t) in sent {
        let item = history.iter().find(|m| m["id"] == id).expect("in history");
        assert_eq!(item["content"].as_str(), Some(t.as_str()));
    }
}

#[tokio::test]
async fn edited_content_is_stored_and_echoed_exactly_as_sent() {
    let mut room = Room::open().await;
    for t in exact_texts() {
        let id = id_of(&room.alice_says("before").await);
        let event = room
            .alice_does(json!({"type": "edit_message", "message_id": id, "content": t}))
            .await;
        assert_eq!(event["message"]["content"].as_str(), Some(t.as_str()));
        let history = room.history().await;
        let item = history.iter().find(|m| m["id"] == id).unwrap();
        assert_eq!(item["content"].as_str(), Some(t.as_str()));
    }
}

#[tokio::test]
async fn exactly_4000_code_points_pass_even_as_4000_emoji() {
    let mut room = Room::open().await;
    let emoji = "😀".repeat(MAX_CHARS);
    room.alice_says(&emoji).await;
    let ascii = "a".repeat(MAX_CHARS);
    room.alice_says(&ascii).await;
    let id = id_of(&room.alice_says("short").await);
    let event = room
        .alice_does(json!({"type": "edit_message", "message_id": id, "content": emoji}))
        .await;
    assert_eq!(event["message"]["content"].as_str(), Some(emoji.as_str()));
}

#[tokio::test]
async fn text_with_unicode_that_is_not_white_space_is_not_empty() {
    // U+200B and U+FEFF are not Unicode White_Space.
    let mut room = Room::open().await;
    room.alice_says("\u{200B}").await;
    room.alice_says("\u{FEFF}").await;
    room.alice_says(" \u{200B} ").await;
}

#[tokio::test]
async fn fields_a_frame_does_not_need_are_ignored() {
    let mut room = Room::open().await;
    let event = room
        .alice_does(json!({"type": "chat_message", "message": "hi", "extra": [1, 2], "sender": "mallory"}))
        .await;
    assert_message_shape(&event);
    assert_eq!(event["sender"], room.alice.as_str());
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn the_max_message_chars_flag_sets_the_limit() {
    let server = crate::own_server!("--max-message-chars", "10");
    let mut room = Room::open_on(server).await;
    room.alice_says(&"é".repeat(10)).await;
    room.expect_error(
        json!({"type": "chat_message", "message": "é".repeat(11)}),
        "too_large",
    )
    .await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn rate_limited_frames_are_dropped_and_the_socket_stays_open() {
    // PROTOCOL.md: the limit is per socket and off unless configured. The
    // flag name is parley's; see RATE_LIMIT_ARGS.
    let server = crate::own_server!(RATE_LIMIT_ARGS[0], RATE_LIMIT_ARGS[1]);
    let mut room = Room::open_on(server).await;
    let sent = 40;
    for i in 0..sent {
        send_json(
            &mut room.a1,
            &json!({"type": "chat_message", "message": format!("r{i}")}),
        )
        .await;
    }
    let mut accepted = vec![];
    let mut limited = 0;
    for _ in 0..sent {
        let frame = recv_json(&mut room.a1).await;
        if frame["type"] == "error" {
            assert_error(&frame, "rate_limited");
            limited += 1;
        } else {
            accepted.push(frame);
        }
    }
    assert!(limited > 0, "no frame of {sent} was rate limited");
    // Dropped frames are not stored, and the other sockets see only the accepted.
    let got_b: Vec<Value> = recv_n(&mut room.b, accepted.len()).await;
    assert_eq!(got_b, accepted);
    let history = room.history().await;
    assert_eq!(history.len(), accepted.len());
    // Another socket of the same user saw the accepted ones too, and is not
    // limited by a1's budget.
    let got_a2: Vec<Value> = recv_n(&mut room.a2, accepted.len()).await;
    assert_eq!(got_a2, accepted);
    say(&mut room.a2, "from a2").await;
}

/// Flags that turn on a small per-socket rate limit in parley.
pub const RATE_LIMIT_ARGS: [&str; 2] = ["--rate-limit", "5"];

#[tokio::test]
async fn without_rate_limit_configured_a_burst_is_never_rate_limited() {
    let mut room = Room::open().await;
    for i in 0..200 {
        send_json(
            &mut room.a1,
            &json!({"type": "chat_message", "message": format!("{i}")}),
        )
        .await;
    }
    for frame in recv_n(&mut room.a1, 200).await {
        assert!(frame.get("type").is_none(), "got {frame}");
    }
}
