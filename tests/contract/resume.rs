//! Part D: resuming after a reconnect with `?after=`. Run alone with
//! `cargo test --test contract resume::`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;
use crate::own_server;

fn chat_path(conv: u64, after: impl std::fmt::Display) -> String {
    format!("/ws/chat/{conv}/?after={after}")
}

/// Alice says `n` messages on `ws` without waiting; answers the echoes.
async fn burst(ws: &mut Ws, n: usize, tag: &str) -> Vec<Value> {
    for i in 0..n {
        send_json(
            ws,
            &json!({"type": "chat_message", "message": format!("{tag} {i}")}),
        )
        .await;
    }
    recv_n(ws, n).await
}

#[tokio::test]
async fn resume_replays_missed_messages_edits_and_deletes_in_order_then_live() {
    let mut room = Room::open().await;
    let seen = id_of(&room.alice_says("seen before the drop").await);
    // While Bob's phone is away, his other socket (b) records what went out live.
    let mut missed = vec![];
    let m1 = room.alice_says("first").await;
    missed.push(m1.clone());
    let m2 = room.alice_says("second").await;
    missed.push(m2.clone());
    missed.push(
        room.alice_does(json!({"type": "edit_message", "message_id": m1["id"], "content": "first, edited"}))
            .await,
    );
    missed.push(
        room.alice_does(json!({"type": "delete_message", "message_id": m2["id"]}))
            .await,
    );
    missed.push(room.bob_says("third").await);
    let mut resumed = room
        .server
        .ws(&chat_path(room.conv, seen), &room.server.token(&room.bob))
        .await;
    assert_eq!(recv_n(&mut resumed, missed.len()).await, missed);
    // Then the live stream.
    let live = room.alice_says("live").await;
    assert_eq!(recv_json(&mut resumed).await, live);
}

#[tokio::test]
async fn a_replayed_message_has_the_content_it_had_when_sent() {
    let mut room = Room::open().await;
    let seen = id_of(&room.alice_says("before").await);
    let m = room.alice_says("as sent").await;
    room.alice_does(json!({"type": "edit_message", "message_id": m["id"], "content": "as edited"}))
        .await;
    let mut resumed = room
        .server
        .ws(&chat_path(room.conv, seen), &room.server.token(&room.alice))
        .await;
    let replay = recv_n(&mut resumed, 2).await;
    assert_eq!(replay[0], m);
    assert_eq!(replay[0]["content"], "as sent");
    assert_eq!(replay[1]["message"]["content"], "as edited");
}

#[tokio::test]
async fn after_0_replays_the_conversation_from_its_start() {
    let mut room = Room::open().await;
    let mut all = vec![room.alice_says("one").await, room.bob_says("two").await];
    all.push(
        room.alice_does(json!({"type": "delete_message", "message_id": all[0]["id"]}))
            .await,
    );
    let mut resumed = room
        .server
        .ws(&chat_path(room.conv, 0), &room.server.token(&room.bob))
        .await;
    assert_eq!(recv_n(&mut resumed, 3).await, all);
    let live = room.bob_says("after").await;
    assert_eq!(recv_json(&mut resumed).await, live);
}

#[tokio::test]
async fn after_may_name_a_deleted_message() {
    let mut room = Room::open().await;
    let gone = id_of(&room.alice_says("gone").await);
    let deletion = room
        .alice_does(json!({"type": "delete_message", "message_id": gone}))
        .await;
    let next = room.alice_says("next").await;
    let mut resumed = room
        .server
        .ws(&chat_path(room.conv, gone), &room.server.token(&room.alice))
        .await;
    assert_eq!(recv_n(&mut resumed, 2).await, vec![deletion, next]);
}

#[tokio::test]
async fn after_the_latest_message_replays_nothing_then_live() {
    let mut room = Room::open().await;
    let latest = id_of(&room.alice_says("latest").await);
    let mut resumed = room
        .server
        .ws(&chat_path(room.conv, latest), &room.server.token(&room.bob))
        .await;
    let live = room.bob_says("live").await;
    assert_eq!(recv_json(&mut resumed).await, live);
}

#[tokio::test]
async fn without_after_a_socket_gets_no_replay() {
    let mut room = Room::open().await;
    room.alice_says("old").await;
    let mut fresh = room.server.ws_chat(room.conv, &room.bob).await;
    let live = room.alice_says("new").await;
    assert_eq!(recv_json(&mut fresh).await, live);
}

#[tokio::test]
async fn no_gap_and_no_duplicate_while_another_client_pipelines() {
    let server = Server::start();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let mut observer = server.ws_chat(conv, &alice).await;
    let mut bobs = server.ws_chat(conv, &bob).await;
    let start = id_of(&say(&mut bobs, "start").await);
    recv_json(&mut observer).await;
    let total = 600;
    // Bob sends while the resumes happen, a few at a time.
    let sender = tokio::spawn(async move {
        for i in 0..total {
            send_json(
                &mut bobs,
                &json!({"type": "chat_message", "message": format!("p{i}")}),
            )
            .await;
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        recv_n(&mut bobs, total).await;
        bobs
    });
    let mut seen: Vec<Value> = vec![];
    // (index in `seen` the resume starts after, socket)
    let mut resumed: Vec<(usize, Ws)> = vec![];
    for at in [0, 40, 150, 300] {
        while seen.len() < at {
            seen.push(recv_json(&mut observer).await);
        }
        let after = if at == 0 { start } else { id_of(&seen[at - 1]) };
        let ws = server.ws(&chat_path(conv, after), &server.token(&alice)).await;
        resumed.push((at, ws));
    }
    while seen.len() < total {
        seen.push(recv_json(&mut observer).await);
    }
    let mut bobs = sender.await.unwrap();
    let end = say(&mut bobs, "end").await;
    assert_eq!(recv_json(&mut observer).await, end);
    for (at, ws) in &mut resumed {
        let got = recv_n(ws, total - *at).await;
        for (i, (g, want)) in got.iter().zip(&seen[*at..]).enumerate() {
            assert_eq!(g, want, "resume after index {at}: frame {i} differs");
        }
        assert_eq!(
            recv_json(ws).await,
            end,
            "resume after index {at}: a duplicate or extra frame"
        );
    }
}

// ------------------------------------------------------------ bad `after` --

#[tokio::test]
async fn after_that_is_not_a_message_of_this_conversation_is_400_invalid_field() {
    let mut room = Room::open().await;
    let mine = id_of(&room.alice_says("here").await);
    let other = room.server.create_conversation(&room.alice, &[]).await;
    let mut there = room.server.ws_chat(other, &room.alice).await;
    let elsewhere = id_of(&say(&mut there, "there").await);
    let auth = format!("Bearer {}", room.server.token(&room.alice));
    for after in [
        elsewhere.to_string(),
        (mine + 1_000_000).to_string(),
        "-1".into(),
        "abc".into(),
        "1.5".into(),
        "".into(),
        "99999999999999999999999".into(),
    ] {
        match room
            .server
            .raw_ws(&chat_path(room.conv, &after), &[("Authorization", &auth)])
            .await
        {
            Ok(_) => panic!("after={after:?} was upgraded"),
            Err(answer) => {
                assert_eq!(answer.status, 400, "after={after:?}");
                assert_rest_error(&(answer.status, answer.json()), 400, "invalid_field");
            }
        }
    }
}

#[tokio::test]
async fn a_resuming_upgrade_checks_token_then_conversation_then_participant_then_after() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let bad = "abc";
    assert_eq!(server.upgrade_status(&chat_path(conv, bad), &[]).await, 401);
    assert_eq!(
        server.upgrade_status(&chat_path(999_999_999, bad), &[]).await,
        401
    );
    let alices = server.token(&alice);
    assert_eq!(
        server
            .upgrade_status_with_token(&chat_path(999_999_999, bad), &alices)
            .await,
        404
    );
    let outsider = server.token(&user("mallory"));
    assert_eq!(
        server
            .upgrade_status_with_token(&chat_path(conv, bad), &outsider)
            .await,
        403
    );
    assert_eq!(
        server
            .upgrade_status_with_token(&chat_path(conv, bad), &alices)
            .await,
        400
    );
    assert_eq!(
        server.upgrade_status("/ws/notifications/?after=abc", &[]).await,
        401
    );
}

// -------------------------------------------------------------- truncation --

fn assert_truncated(frame: &Value) -> u64 {
    assert_keys(frame, &["type", "after"]);
    assert_eq!(frame["type"], "resume.truncated", "{frame}");
    frame["after"]
        .as_u64()
        .unwrap_or_else(|| panic!("after: {frame}"))
}

#[tokio::test]
async fn more_than_1000_missed_events_start_with_resume_truncated_then_the_newest_1000() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let start = id_of(&say(&mut ws, "start").await);
    let missed = burst(&mut ws, 1003, "m").await;
    let token = server.token(&alice);
    let mut resumed = server.ws(&chat_path(conv, start), &token).await;
    let after = assert_truncated(&recv_json(&mut resumed).await);
    assert_eq!(after, id_of(&missed[2]));
    let replay = recv_n(&mut resumed, 1000).await;
    assert_eq!(replay, missed[3..]);
    // ?after=<that id> gives exactly the same replay, untruncated.
    let mut again = server.ws(&chat_path(conv, after), &token).await;
    assert_eq!(recv_n(&mut again, 1000).await, replay);
    let live = say(&mut ws, "live").await;
    assert_eq!(recv_json(&mut resumed).await, live);
    assert_eq!(recv_json(&mut again).await, live);
}

#[tokio::test]
async fn exactly_1000_missed_events_are_replayed_without_truncation() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let start = id_of(&say(&mut ws, "start").await);
    let missed = burst(&mut ws, 1000, "m").await;
    let mut resumed = server.ws(&chat_path(conv, start), &server.token(&alice)).await;
    assert_eq!(recv_n(&mut resumed, 1000).await, missed);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn the_max_replay_events_flag_bounds_the_replay_of_mixed_events() {
    let server = own_server!("--max-replay-events", "5");
    let mut room = Room::open_on(server).await;
    let start = id_of(&room.alice_says("start").await);
    let a = room.alice_says("a").await;
    let b = room.alice_says("b").await;
    let c = room.alice_says("c").await;
    let edit_a = room
        .alice_does(json!({"type": "edit_message", "message_id": a["id"], "content": "a2"}))
        .await;
    let d = room.alice_says("d").await;
    let del_b = room
        .alice_does(json!({"type": "delete_message", "message_id": b["id"]}))
        .await;
    // Six events after `start`; the newest five follow `a`.
    let events = [a.clone(), b.clone(), c.clone(), edit_a, d, del_b];
    let token = room.server.token(&room.bob);
    // Exactly the limit: no truncation.
    let mut exact = room
        .server
        .ws(&chat_path(room.conv, a["id"].clone()), &token)
        .await;
    assert_eq!(recv_n(&mut exact, 5).await, events[1..]);
    let mut resumed = room.server.ws(&chat_path(room.conv, start), &token).await;
    let after = assert_truncated(&recv_json(&mut resumed).await);
    assert_eq!(after, id_of(&a));
    assert_eq!(recv_n(&mut resumed, 5).await, events[1..]);
}

// ----------------------------------------------------------- notifications --

fn notifications_path(after: impl std::fmt::Display) -> String {
    format!("/ws/notifications/?after={after}")
}

#[tokio::test]
async fn notifications_after_replays_newer_ones_oldest_first_with_current_is_read_then_live() {
    let server = Server::start();
    let bob = user("bob");
    let n1 = server.notify(&bob, "one").await;
    let n2 = server.notify(&bob, "two").await;
    let n3 = server.notify(&bob, "three").await;
    server.notify(&user("carol"), "not bob's").await;
    let (_, n2_read) = server
        .post(
            &format!("/api/notifications/{}/read/", n2["id"]),
            &server.token(&bob),
            json!({}),
        )
        .await;
    let mut ws = server
        .ws(&notifications_path(&n1["id"]), &server.token(&bob))
        .await;
    assert_eq!(recv_json(&mut ws).await, json!({"message": n2_read}));
    assert_eq!(recv_json(&mut ws).await, json!({"message": n3}));
    let n4 = server.notify(&bob, "four").await;
    assert_eq!(recv_json(&mut ws).await, json!({"message": n4}));
}

#[tokio::test]
async fn notifications_after_0_replays_all_of_the_users() {
    let server = Server::start();
    let bob = user("bob");
    let n1 = server.notify(&bob, "one").await;
    let n2 = server.notify(&bob, "two").await;
    let mut ws = server.ws(&notifications_path(0), &server.token(&bob)).await;
    assert_eq!(
        recv_n(&mut ws, 2).await,
        vec![json!({"message": n1}), json!({"message": n2})]
    );
}

#[tokio::test]
async fn notifications_after_that_is_not_one_of_the_users_is_400_invalid_field() {
    let server = Server::start();
    let (bob, carol) = (user("bob"), user("carol"));
    let bobs = id_of(&server.notify(&bob, "bob's").await);
    let carols = id_of(&server.notify(&carol, "carol's").await);
    let auth = format!("Bearer {}", server.token(&bob));
    for after in [
        carols.to_string(),
        (bobs + 1_000_000).to_string(),
        "x".into(),
        "-1".into(),
    ] {
        match server
            .raw_ws(&notifications_path(&after), &[("Authorization", &auth)])
            .await
        {
            Ok(_) => panic!("after={after} was upgraded"),
            Err(answer) => assert_rest_error(&(answer.status, answer.json()), 400, "invalid_field"),
        }
    }
}

#[tokio::test]
async fn notifications_resume_has_no_gap_and_no_duplicate_while_notifications_arrive() {
    let server = Server::start();
    let bob = user("bob");
    let first = id_of(&server.notify(&bob, "first").await);
    let mut observer = server.ws_notifications(&bob).await;
    let total = 60;
    let poster = {
        let addr = server.addr.clone();
        let token = server.service_token();
        let bob = bob.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            for i in 0..total {
                let resp = client
                    .post(format!("http://{addr}/api/notifications/"))
                    .header("Authorization", format!("Bearer {token}"))
                    .json(&json!({"user": bob, "message": format!("n{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 201);
            }
        })
    };
    let mut seen = vec![];
    let mut resumed = vec![];
    for at in [0, 10, 30] {
        while seen.len() < at {
            seen.push(recv_json(&mut observer).await);
        }
        let after = if at == 0 {
            first
        } else {
            id_of(&seen[at - 1]["message"])
        };
        resumed.push((
            at,
            server.ws(&notifications_path(after), &server.token(&bob)).await,
        ));
    }
    while seen.len() < total {
        seen.push(recv_json(&mut observer).await);
    }
    poster.await.unwrap();
    let last = server.notify(&bob, "last").await;
    for (at, ws) in &mut resumed {
        let got = recv_n(ws, total - *at).await;
        // is_read is current at replay time and all are unread here, so the
        // replayed frames equal the live ones.
        for (i, (g, want)) in got.iter().zip(&seen[*at..]).enumerate() {
            assert_eq!(g, want, "resume after index {at}: frame {i} differs");
        }
        assert_eq!(
            recv_json(ws).await,
            json!({"message": last}),
            "resume after index {at}: extra frame"
        );
    }
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn the_max_replay_events_flag_bounds_the_notifications_replay() {
    let server = own_server!("--max-replay-events", "5");
    let bob = user("bob");
    let mut made = vec![];
    for i in 0..7 {
        made.push(server.notify(&bob, &format!("n{i}")).await);
    }
    let mut ws = server.ws(&notifications_path(0), &server.token(&bob)).await;
    let after = assert_truncated(&recv_json(&mut ws).await);
    assert_eq!(after, id_of(&made[1]));
    let want: Vec<Value> = made[2..].iter().map(|n| json!({"message": n})).collect();
    assert_eq!(recv_n(&mut ws, 5).await, want);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_restart_between_disconnect_and_reconnect_loses_nothing_of_the_replay() {
    let server = own_server!();
    let mut room = Room::open_on(server).await;
    let seen = id_of(&room.alice_says("seen before the drop").await);
    let mut missed = vec![];
    for i in 0..5 {
        missed.push(room.alice_says(&format!("missed {i}")).await);
    }
    let edit = json!({"type": "edit_message", "message_id": missed[0]["id"], "content": "missed 0, edited"});
    missed.push(room.alice_does(edit).await);
    let delete = json!({"type": "delete_message", "message_id": missed[1]["id"]});
    missed.push(room.alice_does(delete).await);
    // The server dies hard while Bob is away, and comes back on the same data.
    room.server.kill9();
    room.server.start_again();
    let mut resumed = room
        .server
        .ws(&chat_path(room.conv, seen), &room.server.token(&room.bob))
        .await;
    assert_eq!(recv_n(&mut resumed, missed.len()).await, missed);
    expect_silence(&mut resumed, 300).await;
}
