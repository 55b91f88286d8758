//! Part B "Bad input" and Part C "Frames": every error code, the order of
//! the checks, the frame limit and the close codes.
//!
//! Every error test goes through `Room::expect_errors`, which also checks the
//! rest of the rule: the socket stays open, no other socket gets anything,
//! and the stored history does not change.

use serde_json::json;

use crate::harness::*;

// ------------------------------------------------------------ invalid_json --

#[tokio::test]
async fn valid_json_that_is_not_an_object_is_invalid_json() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (text("[1,2]"), "invalid_json"),
        (text(r#""x""#), "invalid_json"),
        (text("42"), "invalid_json"),
        (text("null"), "invalid_json"),
        (text("true"), "invalid_json"),
        (
            text(r#"[{"type":"chat_message","message":"hi"}]"#),
            "invalid_json",
        ),
    ])
    .await;
}

#[tokio::test]
async fn text_that_is_not_rfc_8259_json_is_invalid_json() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (text("NaN"), "invalid_json"),
        (
            text(r#"{"type":"edit_message","message_id":NaN,"content":"x"}"#),
            "invalid_json",
        ),
        (
            text(r#"{"type":"chat_message","message":"hi"} x"#),
            "invalid_json",
        ),
        (
            text(r#"{"type":"chat_message","message":"hi"}{}"#),
            "invalid_json",
        ),
        (text(r#"{"type":"chat_message","message":"hi",}"#), "invalid_json"),
        (text(r#"{'type':'chat_message','message':'hi'}"#), "invalid_json"),
        (
            text(r#"{"type":"edit_message","message_id":Infinity,"content":"x"}"#),
            "invalid_json",
        ),
        (text(r#"{"type":"chat_message""#), "invalid_json"),
        (text(""), "invalid_json"),
        (text("hello"), "invalid_json"),
    ])
    .await;
}

#[tokio::test]
async fn a_binary_frame_is_invalid_json_even_when_it_holds_valid_json() {
    let mut room = Room::open().await;
    let valid = json!({"type": "chat_message", "message": "hi"}).to_string();
    room.expect_errors(&[
        (Frame::Binary(valid.into_bytes()), "invalid_json"),
        (Frame::Binary(vec![0, 159, 146, 150]), "invalid_json"),
        (Frame::Binary(vec![]), "invalid_json"),
    ])
    .await;
}

// ----------------------------------------------------- type, unknown_type --

#[tokio::test]
async fn type_missing_is_invalid_field() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (json_frame(json!({})), "invalid_field"),
        (json_frame(json!({"message": "hi"})), "invalid_field"),
    ])
    .await;
}

#[tokio::test]
async fn type_not_a_string_is_invalid_field() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (json_frame(json!({"type": 1, "message": "hi"})), "invalid_field"),
        (
            json_frame(json!({"type": null, "message": "hi"})),
            "invalid_field",
        ),
        (json_frame(json!({"type": true})), "invalid_field"),
        (
            json_frame(json!({"type": ["chat_message"], "message": "hi"})),
            "invalid_field",
        ),
        (json_frame(json!({"type": {"chat_message": 1}})), "invalid_field"),
    ])
    .await;
}

#[tokio::test]
async fn an_unknown_type_is_unknown_type() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (json_frame(json!({"type": "ping"})), "unknown_type"),
        (json_frame(json!({"type": ""})), "unknown_type"),
        (
            json_frame(json!({"type": "message.edited", "message": {"id": 1, "content": "x"}})),
            "unknown_type",
        ),
        (
            json_frame(json!({"type": "error", "code": "x", "detail": "y"})),
            "unknown_type",
        ),
        (json_frame(json!({"type": "__proto__"})), "unknown_type"),
        (json_frame(json!({"type": "toString"})), "unknown_type"),
    ])
    .await;
}

#[tokio::test]
async fn types_are_case_sensitive_chat_message_in_capitals_is_unknown_type() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (
            json_frame(json!({"type": "CHAT_MESSAGE", "message": "hi"})),
            "unknown_type",
        ),
        (
            json_frame(json!({"type": "Chat_Message", "message": "hi"})),
            "unknown_type",
        ),
        (
            json_frame(json!({"type": "Edit_message", "message_id": 1, "content": "x"})),
            "unknown_type",
        ),
        (
            json_frame(json!({"type": "DELETE_MESSAGE", "message_id": 1})),
            "unknown_type",
        ),
        (
            json_frame(json!({"type": " chat_message", "message": "hi"})),
            "unknown_type",
        ),
    ])
    .await;
}

// ----------------------------------------------------------- invalid_field --

#[tokio::test]
async fn chat_message_without_message_is_invalid_field() {
    let mut room = Room::open().await;
    room.expect_error(json!({"type": "chat_message"}), "invalid_field")
        .await;
    room.expect_error(json!({"type": "chat_message", "content": "hi"}), "invalid_field")
        .await;
}

#[tokio::test]
async fn chat_message_with_message_not_a_string_is_invalid_field() {
    let mut room = Room::open().await;
    for bad in [
        json!(1),
        json!(null),
        json!(true),
        json!(["hi"]),
        json!({"text": "hi"}),
    ] {
        room.expect_error(json!({"type": "chat_message", "message": bad}), "invalid_field")
            .await;
    }
}

#[tokio::test]
async fn edit_message_without_message_id_or_content_is_invalid_field() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("mine").await);
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "content": "x"})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": id})),
            "invalid_field",
        ),
        (json_frame(json!({"type": "edit_message"})), "invalid_field"),
    ])
    .await;
}

#[tokio::test]
async fn message_id_not_a_number_is_invalid_field() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("mine").await);
    for bad in [
        json!(id.to_string()),
        json!(null),
        json!(true),
        json!([id]),
        json!({"id": id}),
    ] {
        room.expect_errors(&[
            (
                json_frame(json!({"type": "edit_message", "message_id": bad, "content": "x"})),
                "invalid_field",
            ),
            (
                json_frame(json!({"type": "delete_message", "message_id": bad})),
                "invalid_field",
            ),
        ])
        .await;
    }
}

#[tokio::test]
async fn edit_content_not_a_string_is_invalid_field() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("mine").await);
    for bad in [json!(1), json!(null), json!(false), json!(["x"]), json!({})] {
        room.expect_error(
            json!({"type": "edit_message", "message_id": id, "content": bad}),
            "invalid_field",
        )
        .await;
    }
}

#[tokio::test]
async fn delete_message_without_message_id_is_invalid_field() {
    let mut room = Room::open().await;
    room.expect_error(json!({"type": "delete_message"}), "invalid_field")
        .await;
    room.expect_error(json!({"type": "delete_message", "id": 1}), "invalid_field")
        .await;
}

#[tokio::test]
async fn empty_text_is_invalid_field() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("mine").await);
    room.expect_errors(&[
        (
            json_frame(json!({"type": "chat_message", "message": ""})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": id, "content": ""})),
            "invalid_field",
        ),
    ])
    .await;
}

/// Every Unicode White_Space code point.
const WHITE_SPACE: &str = "\u{9}\u{A}\u{B}\u{C}\u{D}\u{20}\u{85}\u{A0}\u{1680}\u{2000}\u{2001}\u{2002}\u{2003}\u{2004}\u{2005}\u{2006}\u{2007}\u{2008}\u{2009}\u{200A}\u{2028}\u{2029}\u{202F}\u{205F}\u{3000}";

#[tokio::test]
async fn whitespace_only_text_is_invalid_field_for_all_unicode_white_space() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("mine").await);
    let mut cases = vec![
        (
            json_frame(json!({"type": "chat_message", "message": " "})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "chat_message", "message": " \t\r\n "})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "chat_message", "message": WHITE_SPACE})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": id, "content": WHITE_SPACE})),
            "invalid_field",
        ),
    ];
    for c in WHITE_SPACE.chars() {
        cases.push((
            json_frame(json!({"type": "chat_message", "message": c.to_string()})),
            "invalid_field",
        ));
    }
    room.expect_errors(&cases).await;
}

// --------------------------------------------------------------- too_large --

#[tokio::test]
async fn text_over_4000_code_points_is_too_large() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("mine").await);
    let over = "a".repeat(MAX_CHARS + 1);
    let emoji_over = "😀".repeat(MAX_CHARS + 1);
    room.expect_errors(&[
        (
            json_frame(json!({"type": "chat_message", "message": over})),
            "too_large",
        ),
        (
            json_frame(json!({"type": "chat_message", "message": emoji_over})),
            "too_large",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": id, "content": over})),
            "too_large",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": id, "content": emoji_over})),
            "too_large",
        ),
    ])
    .await;
}

// --------------------------------------------------------------- not_found --

#[tokio::test]
async fn message_id_zero_negative_or_beyond_64_bits_is_not_found() {
    let mut room = Room::open().await;
    let mut cases = vec![];
    for bad in [
        "0",
        "-1",
        "-9223372036854775808",
        "18446744073709551616",
        "340282366920938463463374607431768211456",
        "99999999999999999999999999999",
    ] {
        cases.push((
            text(&format!(
                r#"{{"type":"edit_message","message_id":{bad},"content":"x"}}"#
            )),
            "not_found",
        ));
        cases.push((
            text(&format!(r#"{{"type":"delete_message","message_id":{bad}}}"#)),
            "not_found",
        ));
    }
    room.expect_errors(&cases).await;
}

#[tokio::test]
async fn message_id_that_does_not_exist_is_not_found() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("latest").await);
    let huge = 9_223_372_036_854_775_807u64;
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": id + 1_000_000, "content": "x"})),
            "not_found",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": id + 1_000_000})),
            "not_found",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": huge})),
            "not_found",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": u64::MAX})),
            "not_found",
        ),
    ])
    .await;
}

#[tokio::test]
async fn message_of_another_conversation_is_not_found_even_ones_own() {
    let mut room = Room::open().await;
    let other = room.server.create_conversation(&room.alice, &[]).await;
    let mut there = room.server.ws_chat(other, &room.alice).await;
    let theirs = say(&mut there, "elsewhere").await;
    let id = id_of(&theirs);
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": id, "content": "x"})),
            "not_found",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": id})),
            "not_found",
        ),
    ])
    .await;
    expect_silence(&mut there, SILENCE_MS).await;
    let history = room.server.history(other, &room.alice).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["content"], "elsewhere");
    assert_eq!(history[0]["edited"], false);
}

#[tokio::test]
async fn a_deleted_message_cannot_be_edited_not_found() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("soon gone").await);
    room.alice_does(json!({"type": "delete_message", "message_id": id}))
        .await;
    room.expect_error(
        json!({"type": "edit_message", "message_id": id, "content": "back"}),
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_deleted_message_cannot_be_deleted_again_not_found() {
    let mut room = Room::open().await;
    let id = id_of(&room.alice_says("soon gone").await);
    room.alice_does(json!({"type": "delete_message", "message_id": id}))
        .await;
    room.expect_error(json!({"type": "delete_message", "message_id": id}), "not_found")
        .await;
}

// --------------------------------------------------------------- forbidden --

#[tokio::test]
async fn edit_by_non_sender_is_forbidden_and_changes_nothing() {
    let mut room = Room::open().await;
    let id = id_of(&room.bob_says("bob's words").await);
    room.expect_error(
        json!({"type": "edit_message", "message_id": id, "content": "alice's words"}),
        "forbidden",
    )
    .await;
    let history = room.history().await;
    let item = history.iter().find(|m| m["id"] == id).unwrap();
    assert_eq!(item["content"], "bob's words");
    assert_eq!(item["edited"], false);
}

#[tokio::test]
async fn delete_by_non_sender_is_forbidden_and_changes_nothing() {
    let mut room = Room::open().await;
    let id = id_of(&room.bob_says("bob's words").await);
    room.expect_error(json!({"type": "delete_message", "message_id": id}), "forbidden")
        .await;
    assert!(room.history().await.iter().any(|m| m["id"] == id));
    // Bob still may.
    send_json(&mut room.b, &json!({"type": "delete_message", "message_id": id})).await;
    assert_eq!(recv_json(&mut room.b).await["type"], "message.deleted");
}

#[tokio::test]
async fn someone_elses_deleted_message_is_not_found_not_forbidden() {
    let mut room = Room::open().await;
    let id = id_of(&room.bob_says("bob's").await);
    send_json(&mut room.b, &json!({"type": "delete_message", "message_id": id})).await;
    for ws in [&mut room.a1, &mut room.a2, &mut room.b] {
        assert_eq!(recv_json(ws).await["type"], "message.deleted");
    }
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": id, "content": "x"})),
            "not_found",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": id})),
            "not_found",
        ),
    ])
    .await;
}

// ------------------------------------------------------------- check order --

#[tokio::test]
async fn check_order_invalid_json_comes_before_everything_else() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (
            text(r#"{"type":"CHAT_MESSAGE","message":""} trailing"#),
            "invalid_json",
        ),
        (text(r#"[{"type":5}]"#), "invalid_json"),
        (Frame::Binary(b"{\"type\":\"nope\"}".to_vec()), "invalid_json"),
    ])
    .await;
}

#[tokio::test]
async fn check_order_type_not_a_string_comes_before_unknown_type() {
    let mut room = Room::open().await;
    room.expect_error(json!({"type": 42, "message": 5}), "invalid_field")
        .await;
}

#[tokio::test]
async fn check_order_unknown_type_comes_before_field_checks() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (
            json_frame(json!({"type": "CHAT_MESSAGE", "message": 5})),
            "unknown_type",
        ),
        (
            json_frame(json!({"type": "shout", "message": ""})),
            "unknown_type",
        ),
        (
            json_frame(json!({"type": "Edit_Message", "message_id": "x", "content": "a".repeat(5000)})),
            "unknown_type",
        ),
    ])
    .await;
}

#[tokio::test]
async fn check_order_field_checks_come_before_too_large() {
    let mut room = Room::open().await;
    let long = "a".repeat(MAX_CHARS + 1);
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": "7", "content": long})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "content": long})),
            "invalid_field",
        ),
    ])
    .await;
}

#[tokio::test]
async fn check_order_field_checks_come_before_not_found() {
    let mut room = Room::open().await;
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": 0, "content": ""})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": 0, "content": "  "})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": 0, "content": 3})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": 0})),
            "invalid_field",
        ),
    ])
    .await;
}

#[tokio::test]
async fn check_order_too_large_comes_before_not_found_and_forbidden() {
    let mut room = Room::open().await;
    let bobs = id_of(&room.bob_says("bob's").await);
    let long = "a".repeat(MAX_CHARS + 1);
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": 0, "content": long})),
            "too_large",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": bobs, "content": long})),
            "too_large",
        ),
    ])
    .await;
}

#[tokio::test]
async fn check_order_not_found_comes_before_forbidden() {
    // Covered for deleted messages above; a message of another conversation
    // sent by someone else is not_found too.
    let mut room = Room::open().await;
    let carol = user("carol");
    let other = room.server.create_conversation(&carol, &[]).await;
    let mut there = room.server.ws_chat(other, &carol).await;
    let id = id_of(&say(&mut there, "carol's").await);
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": id, "content": "x"})),
            "not_found",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": id})),
            "not_found",
        ),
    ])
    .await;
}

// ------------------------------------------------------------ bad input rule --

#[tokio::test]
async fn error_frames_have_type_code_and_detail_only() {
    let mut room = Room::open().await;
    send_text(&mut room.a1, "nope").await;
    let frame = recv_json(&mut room.a1).await;
    assert_error(&frame, "invalid_json");
}

#[tokio::test]
async fn bad_input_never_closes_the_socket() {
    let mut room = Room::open().await;
    let long = "a".repeat(MAX_CHARS + 1);
    for _ in 0..3 {
        room.expect_errors(&[
            (text("{"), "invalid_json"),
            (Frame::Binary(vec![1, 2, 3]), "invalid_json"),
            (json_frame(json!({"type": 1})), "invalid_field"),
            (json_frame(json!({"type": "x"})), "unknown_type"),
            (
                json_frame(json!({"type": "chat_message", "message": long})),
                "too_large",
            ),
            (
                json_frame(json!({"type": "delete_message", "message_id": 0})),
                "not_found",
            ),
        ])
        .await;
    }
}

#[tokio::test]
async fn bad_input_is_answered_on_that_socket_only() {
    let mut room = Room::open().await;
    send_text(&mut room.a1, "not json").await;
    assert_error(&recv_json(&mut room.a1).await, "invalid_json");
    expect_silence(&mut room.a2, SILENCE_MS).await;
    expect_silence(&mut room.b, 10).await;
}

#[tokio::test]
async fn bad_input_never_changes_stored_data() {
    let mut room = Room::open().await;
    let mine = id_of(&room.alice_says("mine").await);
    let bobs = id_of(&room.bob_says("bob's").await);
    let long = "a".repeat(MAX_CHARS + 1);
    // expect_errors compares the history before and after.
    room.expect_errors(&[
        (
            json_frame(json!({"type": "edit_message", "message_id": bobs, "content": "x"})),
            "forbidden",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": bobs})),
            "forbidden",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": mine, "content": long})),
            "too_large",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": mine, "content": " "})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "edit_message", "message_id": mine.to_string(), "content": "y"})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "delete_message", "message_id": mine.to_string()})),
            "invalid_field",
        ),
        (
            json_frame(json!({"type": "chat_message", "message": ""})),
            "invalid_field",
        ),
    ])
    .await;
}

// ------------------------------------------------------------------ frames --

/// A chat_message frame of exactly `len` payload bytes.
fn chat_frame_of_len(len: usize) -> Vec<u8> {
    let empty = json!({"type": "chat_message", "message": ""}).to_string();
    let fill = len - empty.len();
    json!({"type": "chat_message", "message": "a".repeat(fill)})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn a_frame_of_exactly_65536_payload_bytes_passes() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.raw_chat(conv, &alice).await;
    let frame = chat_frame_of_len(MAX_FRAME);
    assert_eq!(frame.len(), 65536);
    ws.send_frame(true, OP_TEXT, &frame).await;
    // It is read and answered: the text itself is over 4,000 characters.
    assert_error(&ws.recv_json().await, "too_large");
    ws.send_json(&json!({"type": "chat_message", "message": "still open"}))
        .await;
    assert_eq!(ws.recv_json().await["content"], "still open");
}

#[tokio::test]
async fn a_frame_of_65537_payload_bytes_is_closed_with_1009() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.raw_chat(conv, &alice).await;
    ws.send_frame(true, OP_TEXT, &chat_frame_of_len(MAX_FRAME + 1))
        .await;
    assert_eq!(ws.expect_close().await, Some(1009));
}

#[tokio::test]
async fn a_binary_frame_over_the_limit_is_closed_with_1009() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.raw_chat(conv, &alice).await;
    ws.send_frame(true, OP_BINARY, &vec![b'x'; MAX_FRAME + 1]).await;
    assert_eq!(ws.expect_close().await, Some(1009));
}

#[tokio::test]
async fn a_fragmented_message_over_the_limit_is_closed_with_1009() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.raw_chat(conv, &alice).await;
    let whole = chat_frame_of_len(MAX_FRAME + 1);
    let (first, rest) = whole.split_at(40_000);
    ws.send_frame(false, OP_TEXT, first).await;
    ws.send_frame(true, OP_CONT, rest).await;
    assert_eq!(ws.expect_close().await, Some(1009));
}

#[tokio::test]
async fn a_fragmented_message_within_the_limit_is_one_message() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.raw_chat(conv, &alice).await;
    let whole = json!({"type": "chat_message", "message": "in three parts"}).to_string();
    let b = whole.as_bytes();
    ws.send_frame(false, OP_TEXT, &b[..10]).await;
    ws.send_frame(false, OP_CONT, &b[10..20]).await;
    ws.send_frame(true, OP_CONT, &b[20..]).await;
    assert_eq!(ws.recv_json().await["content"], "in three parts");
    // Exactly the limit, in two fragments, passes as well.
    let whole = chat_frame_of_len(MAX_FRAME);
    ws.send_frame(false, OP_TEXT, &whole[..30_000]).await;
    ws.send_frame(true, OP_CONT, &whole[30_000..]).await;
    assert_error(&ws.recv_json().await, "too_large");
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_is_closed_with_1007() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.raw_chat(conv, &alice).await;
    let mut payload = br#"{"type":"chat_message","message":""#.to_vec();
    payload.extend_from_slice(&[0xC3, 0x28, 0xFF]);
    payload.extend_from_slice(br#""}"#);
    ws.send_frame(true, OP_TEXT, &payload).await;
    assert_eq!(ws.expect_close().await, Some(1007));
    assert!(server.history(conv, &alice).await.is_empty());
}

#[tokio::test]
async fn closing_one_socket_for_its_frame_leaves_the_others_open() {
    let mut room = Room::open().await;
    let mut bad = room.server.raw_chat(room.conv, &room.alice).await;
    bad.send_frame(true, OP_TEXT, &chat_frame_of_len(MAX_FRAME + 1))
        .await;
    assert_eq!(bad.expect_close().await, Some(1009));
    room.alice_says("still here").await;
}
