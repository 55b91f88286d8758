//! One order across nodes: every socket of a conversation, on any node,
//! sees its events in the one order PostgreSQL committed them; resume on
//! another node; notifications across nodes.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;
use crate::util::*;

/// What a socket saw, one line per event.
fn seen(events: &[Value]) -> Vec<String> {
    events.iter().map(describe).collect()
}

/// An event in a line: `new:<content>`, `edited:<content>` or `deleted:<id>`.
fn describe(e: &Value) -> String {
    match e["type"].as_str() {
        Some("message.edited") => format!("edited:{}", e["message"]["content"].as_str().unwrap_or("?")),
        Some("message.deleted") => format!("deleted:{}", e["message_id"]),
        _ => format!("new:{}", e["content"].as_str().unwrap_or("?")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_reads_the_same_on_every_node_while_two_nodes_write_to_it() {
    let c = Cluster::start(3);
    let (a, b, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    let conv = a.create_conversation(&alice, &[&bob, &carol]).await;
    let mut wa = a.ws_chat(conv, &alice).await;
    let mut wb = b.ws_chat(conv, &bob).await;
    let mut wc = n3.ws_chat(conv, &carol).await;
    const EACH: usize = 40;
    // Alice on node A and Bob on node B send at once, without waiting.
    for i in 0..EACH {
        send_json(
            &mut wa,
            &json!({"type": "chat_message", "message": format!("a{i}")}),
        )
        .await;
        send_json(
            &mut wb,
            &json!({"type": "chat_message", "message": format!("b{i}")}),
        )
        .await;
    }
    let on_a = recv_n(&mut wa, 2 * EACH).await;
    let on_b = recv_n(&mut wb, 2 * EACH).await;
    let on_c = recv_n(&mut wc, 2 * EACH).await;
    assert_eq!(
        seen(&on_a),
        seen(&on_b),
        "node A and node B disagree on the order"
    );
    assert_eq!(
        seen(&on_a),
        seen(&on_c),
        "node A and node C disagree on the order"
    );
    let ids: Vec<u64> = on_a.iter().map(id_of).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids increase in the order seen: {ids:?}"
    );
    // Each sender's own messages in the order sent.
    let texts: Vec<&str> = on_a.iter().map(|e| e["content"].as_str().unwrap()).collect();
    for who in ["a", "b"] {
        let mine: Vec<&str> = texts.iter().copied().filter(|t| t.starts_with(who)).collect();
        let sent: Vec<String> = (0..EACH).map(|i| format!("{who}{i}")).collect();
        assert_eq!(mine, sent);
    }
    // And the history, read on the third node, is that order too.
    let history = n3.history(conv, &carol).await;
    let newest_first: Vec<u64> = history.iter().map(id_of).collect();
    let mut oldest_first = newest_first.clone();
    oldest_first.reverse();
    assert_eq!(oldest_first, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_resumes_on_another_node_with_no_gap_and_no_duplicate() {
    let c = Cluster::start(3);
    let n3 = &c.nodes[2];
    let Two {
        conv,
        bob,
        mut wa,
        mut wb,
        ..
    } = two(&c, 0, 1).await;
    let first = say(&mut wa, "before").await;
    let seen_by_bob = recv_json(&mut wb).await;
    assert_eq!(seen_by_bob["id"], first["id"]);
    drop(wb);
    // Missed while away: new messages, an edit and a delete.
    let m1 = say(&mut wa, "missed 1").await;
    say(&mut wa, "missed 2").await;
    send_json(
        &mut wa,
        &json!({"type": "edit_message", "message_id": id_of(&m1), "content": "edited"}),
    )
    .await;
    recv_json(&mut wa).await;
    // Bob comes back on the third node while Alice keeps writing on A.
    let writer = tokio::spawn({
        let mut wa = wa;
        async move {
            for i in 0..20 {
                send_json(
                    &mut wa,
                    &json!({"type": "chat_message", "message": format!("live {i}")}),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            recv_n(&mut wa, 20).await
        }
    });
    let path = format!("/ws/chat/{conv}/?after={}", id_of(&first));
    let mut wb = n3.ws(&path, &n3.token(&bob)).await;
    let mut got = Vec::new();
    loop {
        let e = recv_json(&mut wb).await;
        let done = e["content"] == "live 19";
        got.push(e);
        if done {
            break;
        }
    }
    let on_a = writer.await.unwrap();
    let texts = seen(&got);
    // The replay, exactly as it went out live, then every live message once.
    assert_eq!(
        texts[..3],
        ["new:missed 1", "new:missed 2", "edited:edited"],
        "{texts:?}"
    );
    let live: Vec<&String> = texts[3..].iter().collect();
    let expected: Vec<String> = (0..20).map(|i| format!("new:live {i}")).collect();
    assert_eq!(live.len(), 20, "no gap, no duplicate: {texts:?}");
    for (l, e) in live.iter().zip(&expected) {
        assert_eq!(*l, e);
    }
    assert_eq!(on_a.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_sent_through_every_node_reach_a_socket_on_one_node_in_id_order() {
    let c = Cluster::start(3);
    let bob = user("bob");
    let mut wb = c.nodes[1].ws_notifications(&bob).await;
    // A service sends through all three nodes at once.
    let mut sends = Vec::new();
    for i in 0..30 {
        let node = c.nodes[i % 3].addr.clone();
        let token = c.nodes[0].service_token();
        let bob = bob.clone();
        sends.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("http://{node}/api/notifications/"))
                .bearer_auth(token)
                .json(&json!({"user": bob, "message": format!("n{i}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    let got = recv_n(&mut wb, 30).await;
    let ids: Vec<u64> = got.iter().map(|n| n["message"]["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order: {ids:?}");
    expect_silence(&mut wb, 200).await;
    // A resume on another node after the tenth replays the other twenty.
    let mut again = c.nodes[2]
        .ws(
            &format!("/ws/notifications/?after={}", ids[9]),
            &c.nodes[2].token(&bob),
        )
        .await;
    let replay = recv_n(&mut again, 20).await;
    let replayed: Vec<u64> = replay
        .iter()
        .map(|n| n["message"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(replayed, ids[10..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_subscription_says_so_then_fills_the_gap() {
    let c = Cluster::start(2);
    let b = &c.nodes[1];
    let Two {
        bob, mut wa, mut wb, ..
    } = two(&c, 0, 1).await;
    say(&mut wa, "before").await;
    assert_eq!(recv_json(&mut wb).await["content"], "before");
    // Node B's link to Redis is cut; it says so, and node A writes
    // meanwhile (what B misses it must read by itself once it is back,
    // with nothing sent after to show it a gap).
    let cut = cut_from_redis(b.pid(), c.redis.port());
    assert!(cut >= 1, "found none of node B's Redis connections");
    wait_health(b, 503, Duration::from_secs(5)).await;
    let refused = b
        .post(
            "/api/notifications/",
            &b.service_token(),
            json!({"user": bob, "message": "x"}),
        )
        .await;
    assert_eq!(
        refused.0, 503,
        "writes on a node that cannot hear the others are refused: {refused:?}"
    );
    for i in 0..10 {
        say(&mut wa, &format!("during {i}")).await;
    }
    wait_health(b, 200, Duration::from_secs(10)).await;
    let texts: Vec<String> = recv_n(&mut wb, 10)
        .await
        .iter()
        .map(|e| e["content"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("during {i}")).collect();
    assert_eq!(texts, expected, "node B delivered everything once, in order");
    // And the stream goes on live.
    say(&mut wa, "after").await;
    assert_eq!(recv_json(&mut wb).await["content"], "after");
    expect_silence(&mut wb, 100).await;
}

/// Part D's bounded replay, served by another node than the one written
/// to: more missed than `--max-replay-events` gives `resume.truncated`
/// naming the message (notification) the replay follows, then the newest
/// ones, then live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_resume_on_another_node_names_what_it_follows() {
    let c = Cluster::start(1);
    let a = &c.nodes[0];
    let limited = c.node(&["--max-replay-events", "3"]);
    let Two {
        conv, bob, mut wa, ..
    } = two(&c, 0, 0).await;
    let mut sent = Vec::new();
    for i in 0..6 {
        sent.push(id_of(&say(&mut wa, &format!("m{i}")).await));
    }
    let mut wb = limited
        .ws(&format!("/ws/chat/{conv}/?after=0"), &limited.token(&bob))
        .await;
    let truncated = recv_json(&mut wb).await;
    assert_eq!(truncated, json!({"type": "resume.truncated", "after": sent[2]}));
    let replay: Vec<u64> = recv_n(&mut wb, 3).await.iter().map(id_of).collect();
    assert_eq!(replay, sent[3..].to_vec());
    let live = say(&mut wa, "live").await;
    assert_eq!(id_of(&recv_json(&mut wb).await), id_of(&live));

    let mut notes = Vec::new();
    for i in 0..5 {
        notes.push(a.notify(&bob, &format!("n{i}")).await["id"].as_u64().unwrap());
    }
    let mut wn = limited
        .ws("/ws/notifications/?after=0", &limited.token(&bob))
        .await;
    let truncated = recv_json(&mut wn).await;
    assert_eq!(truncated, json!({"type": "resume.truncated", "after": notes[1]}));
    let replay: Vec<u64> = recv_n(&mut wn, 3)
        .await
        .iter()
        .map(|n| n["message"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(replay, notes[2..].to_vec());
}
