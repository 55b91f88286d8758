//! What a cluster does when a node, Redis or PostgreSQL goes away under
//! load, when a node is deployed (drained), and presence across nodes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;
use crate::util::*;

/// Sends `text` and answers whether it was accepted (its echo) or refused
/// (`unavailable`), skipping nothing else.
async fn try_say(ws: &mut Ws, text: &str) -> bool {
    send_json(ws, &json!({"type": "chat_message", "message": text})).await;
    let answer = recv_json(ws).await;
    if answer["content"] == text {
        return true;
    }
    assert_eq!(
        answer["code"], "unavailable",
        "neither the echo nor unavailable: {answer}"
    );
    false
}

/// The contents of new messages a socket receives until `last` arrives.
async fn contents_until(ws: &mut Ws, last: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let e: Value = recv_json(ws).await;
        let t = e["content"]
            .as_str()
            .unwrap_or_else(|| panic!("not a message: {e}"))
            .to_string();
        let done = t == last;
        out.push(t);
        if done {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_only_its_sockets_which_resume_on_another_node() {
    let mut c = Cluster::start(3);
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    let conv = c.nodes[0].create_conversation(&alice, &[&bob, &carol]).await;
    let mut wa = c.nodes[0].ws_chat(conv, &alice).await;
    let mut wb = c.nodes[1].ws_chat(conv, &bob).await;
    let mut wc = c.nodes[2].ws_chat(conv, &carol).await;
    let writer = tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0..60 {
            let t = format!("m{i}");
            assert!(try_say(&mut wa, &t).await, "node A refused a write");
            sent.push(t);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        sent
    });
    // Bob saw some of it on node B; then node B dies.
    let mut bob_saw = Vec::new();
    for _ in 0..10 {
        let e = recv_json(&mut wb).await;
        bob_saw.push((id_of(&e), e["content"].as_str().unwrap().to_string()));
    }
    c.nodes[1].kill9();
    drop(wb);
    // Bob reconnects to another node, after the last message he saw.
    let (last_id, _) = bob_saw.last().cloned().unwrap();
    let path = format!("/ws/chat/{conv}/?after={last_id}");
    let mut wb = c.nodes[2].ws(&path, &c.nodes[2].token(&bob)).await;
    let sent = writer.await.unwrap();
    let rest = contents_until(&mut wb, "m59").await;
    let mut bob_all: Vec<String> = bob_saw.into_iter().map(|(_, t)| t).collect();
    bob_all.extend(rest);
    assert_eq!(bob_all, sent, "Bob missed nothing and saw nothing twice");
    // Carol, on a node that lived, never noticed.
    assert_eq!(contents_until(&mut wc, "m59").await, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_loses_and_reorders_nothing() {
    let mut c = Cluster::start(2);
    let Two { mut wa, mut wb, .. } = two(&c, 0, 1).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        let t = format!("m{i}");
        if try_say(&mut wa, &t).await {
            accepted.push(t);
        }
    }
    c.redis.stop();
    // Writes are refused while the nodes cannot hear each other...
    wait_health(&c.nodes[0], 503, Duration::from_secs(10)).await;
    for i in 20..30 {
        let t = format!("m{i}");
        if try_say(&mut wa, &t).await {
            accepted.push(t);
        } else {
            refused += 1;
        }
    }
    assert!(refused > 0, "no write was refused while Redis was down");
    c.redis.start_again();
    // ...and taken again, by themselves, once they can.
    wait_health(&c.nodes[0], 200, Duration::from_secs(15)).await;
    wait_health(&c.nodes[1], 200, Duration::from_secs(15)).await;
    for i in 30..50 {
        let t = format!("m{i}");
        assert!(try_say(&mut wa, &t).await, "refused after Redis came back");
        accepted.push(t);
    }
    assert_eq!(
        contents_until(&mut wb, "m49").await,
        accepted,
        "every accepted message once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_refuses_writes_meanwhile_and_loses_nothing_acknowledged() {
    let mut c = Cluster::start(2);
    let Two {
        conv,
        bob,
        mut wa,
        mut wb,
        ..
    } = two(&c, 0, 1).await;
    let mut accepted = Vec::new();
    for i in 0..10 {
        let t = format!("m{i}");
        assert!(try_say(&mut wa, &t).await);
        accepted.push(t);
    }
    c.pg.stop();
    wait_health(&c.nodes[0], 503, Duration::from_secs(10)).await;
    let t = "while down".to_string();
    assert!(
        !try_say(&mut wa, &t).await,
        "a write was accepted with PostgreSQL down"
    );
    // Open sockets go on.
    c.pg.start_again();
    wait_health(&c.nodes[0], 200, Duration::from_secs(15)).await;
    for i in 10..20 {
        let t = format!("m{i}");
        assert!(try_say(&mut wa, &t).await, "refused after PostgreSQL came back");
        accepted.push(t);
    }
    assert_eq!(contents_until(&mut wb, "m19").await, accepted);
    let history: Vec<String> = c.nodes[1]
        .history(conv, &bob)
        .await
        .iter()
        .rev()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        history, accepted,
        "everything acknowledged is stored, nothing refused is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_with_1012_spread_over_the_drain_period() {
    let c = Cluster::start(1);
    let mut node = c.node(&["--drain-period", "1s"]);
    let alice = user("alice");
    let conv = node.create_conversation(&alice, &[]).await;
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(node.ws_chat(conv, &alice).await);
    }
    let started = Instant::now();
    let terminated = tokio::task::spawn_blocking(move || {
        let status = node.terminate();
        (node, status)
    });
    let mut closed_at = Vec::new();
    for ws in &mut sockets {
        assert_eq!(expect_close(ws).await, Some(1012));
        closed_at.push(started.elapsed());
    }
    let (_node, status) = terminated.await.unwrap();
    assert!(status.success(), "exit {status}");
    let spread = closed_at
        .iter()
        .max()
        .unwrap()
        .saturating_sub(*closed_at.iter().min().unwrap());
    assert!(
        spread >= Duration::from_millis(500),
        "the closes came within {spread:?}, not spread over the drain period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_watching_on_another_node_gets_no_notification() {
    let c = Cluster::start(3);
    let (a, b, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    let alice = user("alice");
    let bob = user("bob");
    let conv = a.create_conversation(&alice, &[&bob]).await;
    let mut wa = a.ws_chat(conv, &alice).await;
    let watching = b.ws_chat(conv, &bob).await;
    let mut bob_notes = n3.ws_notifications(&bob).await;
    // Presence reaches Redis within a renewal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(&mut wa, "seen live").await;
    let sentinel = n3.notify(&bob, "sentinel").await;
    let next = recv_json(&mut bob_notes).await;
    assert_eq!(
        next["message"]["id"], sentinel["id"],
        "Bob, watching on node B, was notified of a message sent on node A"
    );
    // Once he stops watching, he is notified.
    drop(watching);
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(&mut wa, "missed").await;
    let next = recv_json(&mut bob_notes).await;
    assert_eq!(next["message"]["message"], format!("New message from {alice}"));
}
