//! `kill -9` at a random moment while several clients write, read and mark
//! notifications read: everything acknowledged survives (messages, edits,
//! deletes, notifications, read marks), nothing half-done appears, the
//! event log replays to exactly the history, ids keep increasing. Each
//! round must have acknowledged writes of every kind before the kill, and
//! any refusal under load fails the test (a refusal is not a crash).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::own_server;

/// What one writer knows about one of its messages.
#[derive(Debug, Clone, Default)]
struct Mine {
    /// The text it was created with.
    created: String,
    /// Acknowledged (its own broadcast came back).
    acked: bool,
    /// Contents of acknowledged edits, in order.
    acked_edits: Vec<String>,
    /// An edit sent but not acknowledged (at most one in flight).
    pending_edit: Option<String>,
    deleted_acked: bool,
    delete_pending: bool,
}

#[derive(Debug, Default)]
struct Ledger {
    /// By message id; plus texts sent whose creation was never acknowledged.
    messages: BTreeMap<u64, Mine>,
    unacked_texts: Vec<String>,
    /// Notification id → text, answered 201.
    notifications: BTreeMap<u64, String>,
    /// Notification texts posted without an answer.
    unanswered_notifications: Vec<String>,
    /// Notifications whose mark-read was answered 200.
    marked_read: Vec<u64>,
    /// Answers other than success while the server was up (it was never
    /// meant to refuse anything under this load).
    refusals: Vec<String>,
    /// History pages read under load.
    reads: usize,
}

type Shared = Arc<Mutex<Ledger>>;
/// Recognises the broadcast that acknowledges a frame.
type Matcher = Box<dyn Fn(&Value) -> bool + Send>;

/// The next text frame as JSON, or None when the socket failed or was quiet for 3 s.
async fn next_event(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(t.as_str()).ok(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

/// One writer on one socket: creates, edits and deletes its own messages,
/// one at a time, recording what was acknowledged.
async fn writer(mut ws: Ws, me: String, ledger: Shared) {
    let mut i = 0u64;
    loop {
        i += 1;
        // Choose: mostly new messages, some edits and deletes of our own.
        let live: Vec<u64> = {
            let l = ledger.lock().unwrap();
            l.messages
                .iter()
                .filter(|(_, m)| m.created.starts_with(&me) && m.acked && !m.deleted_acked)
                .map(|(id, _)| *id)
                .collect()
        };
        let roll: u32 = rand::rng().random_range(0..10);
        let (frame, want): (Value, Matcher) = if roll < 2 && !live.is_empty() {
            let id = live[rand::rng().random_range(0..live.len())];
            let content = format!("{me} edit {i}");
            ledger.lock().unwrap().messages.get_mut(&id).unwrap().pending_edit = Some(content.clone());
            let c = content.clone();
            (
                json!({"type": "edit_message", "message_id": id, "content": content}),
                Box::new(move |e: &Value| {
                    e["type"] == "message.edited" && e["message"]["id"] == id && e["message"]["content"] == c
                }),
            )
        } else if roll < 3 && !live.is_empty() {
            let id = live[rand::rng().random_range(0..live.len())];
            ledger
                .lock()
                .unwrap()
                .messages
                .get_mut(&id)
                .unwrap()
                .delete_pending = true;
            (
                json!({"type": "delete_message", "message_id": id}),
                Box::new(move |e: &Value| e["type"] == "message.deleted" && e["message_id"] == id),
            )
        } else {
            let text = format!("{me} message {i}");
            ledger.lock().unwrap().unacked_texts.push(text.clone());
            let (t, m) = (text.clone(), me.clone());
            (
                json!({"type": "chat_message", "message": text}),
                Box::new(move |e: &Value| e["sender"] == m.as_str() && e["content"] == t.as_str()),
            )
        };
        if ws.send(Message::text(frame.to_string())).await.is_err() {
            return;
        }
        loop {
            let Some(event) = next_event(&mut ws).await else {
                return;
            };
            if event["type"] == "error" {
                ledger.lock().unwrap().refusals.push(format!("{frame}: {event}"));
                return;
            }
            if !want(&event) {
                continue;
            }
            let mut l = ledger.lock().unwrap();
            match event["type"].as_str() {
                Some("message.edited") => {
                    let m = l
                        .messages
                        .get_mut(&event["message"]["id"].as_u64().unwrap())
                        .unwrap();
                    m.acked_edits.push(m.pending_edit.take().unwrap());
                }
                Some("message.deleted") => {
                    let m = l
                        .messages
                        .get_mut(&event["message_id"].as_u64().unwrap())
                        .unwrap();
                    m.deleted_acked = true;
                    m.delete_pending = false;
                }
                _ => {
                    let text = event["content"].as_str().unwrap().to_string();
                    l.unacked_texts.retain(|t| *t != text);
                    l.messages.insert(
                        id_of(&event),
                        Mine {
                            created: text,
                            acked: true,
                            ..Mine::default()
                        },
                    );
                }
            }
            break;
        }
    }
}

/// A service posting notifications for `to`, one at a time.
async fn notifier(server_addr: String, token: String, to: String, ledger: Shared) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for i in 0.. {
        let text = format!("notice {i}");
        ledger.lock().unwrap().unanswered_notifications.push(text.clone());
        let r = http
            .post(format!("http://{server_addr}/api/notifications/"))
            .header("Authorization", format!("Bearer {token}"))
            .json(&json!({"user": to, "message": text}))
            .send()
            .await;
        let Ok(r) = r else { return };
        let status = r.status().as_u16();
        let Ok(body) = r.json::<Value>().await else { return };
        let mut l = ledger.lock().unwrap();
        if status != 201 {
            l.refusals.push(format!("POST notification: {status} {body}"));
            return;
        }
        l.unanswered_notifications.retain(|t| *t != text);
        l.notifications.insert(id_of(&body), text);
    }
}

/// The notified user, under load: marks each acknowledged notification
/// read, and reads a history page, one request at a time.
async fn reader(server_addr: String, token: String, conv: u64, ledger: Shared) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    loop {
        let next = {
            let l = ledger.lock().unwrap();
            l.notifications
                .keys()
                .copied()
                .find(|id| !l.marked_read.contains(id))
        };
        if let Some(id) = next {
            let r = http
                .post(format!("http://{server_addr}/api/notifications/{id}/read/"))
                .header("Authorization", format!("Bearer {token}"))
                .json(&json!({}))
                .send()
                .await;
            let Ok(r) = r else { return };
            let status = r.status().as_u16();
            let refused = {
                let mut l = ledger.lock().unwrap();
                if status == 200 {
                    l.marked_read.push(id);
                } else {
                    l.refusals.push(format!("mark {id} read: {status}"));
                }
                status != 200
            };
            if refused {
                return;
            }
        }
        let r = http
            .get(format!(
                "http://{server_addr}/api/conversations/{conv}/messages/?limit=20"
            ))
            .header("Authorization", format!("Bearer {token}"))
            .send()
            .await;
        let Ok(r) = r else { return };
        let status = r.status().as_u16();
        {
            let mut l = ledger.lock().unwrap();
            if status == 200 {
                l.reads += 1;
            } else {
                l.refusals.push(format!("history page: {status}"));
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The conversation rebuilt from its event log (a resume from `after=0`,
/// replayed up to a sentinel sent after it): id → (content, edited), the
/// deleted ones gone. Must equal the history.
async fn replayed(server: &crate::harness::Server, conv: u64, who: &str) -> BTreeMap<u64, (String, bool)> {
    let mut ws = server
        .ws(&format!("/ws/chat/{conv}/?after=0"), &server.token(who))
        .await;
    let mut sender = server.ws_chat(conv, who).await;
    let sentinel = say(&mut sender, "replay sentinel").await;
    let mut state = BTreeMap::new();
    loop {
        let e = recv_json(&mut ws).await;
        if e == sentinel {
            return state;
        }
        match e["type"].as_str() {
            Some("message.edited") => {
                let m = &e["message"];
                let entry = state
                    .get_mut(&id_of(m))
                    .unwrap_or_else(|| panic!("edit of an unknown message: {e}"));
                *entry = (m["content"].as_str().unwrap().to_string(), true);
            }
            Some("message.deleted") => {
                state.remove(&e["message_id"].as_u64().unwrap());
            }
            Some("resume.truncated") => panic!("the replay was truncated: raise --max-replay-events"),
            _ => {
                state.insert(id_of(&e), (e["content"].as_str().unwrap().to_string(), false));
            }
        }
    }
}

/// Every notification of `who`, walked by pages: id → text.
async fn all_notifications(server: &crate::harness::Server, who: &str) -> BTreeMap<u64, String> {
    let token = server.token(who);
    let mut out = BTreeMap::new();
    let mut path = "/api/notifications/?limit=100".to_string();
    loop {
        let (status, page) = server.get(&path, &token).await;
        assert_eq!(status, 200, "{page}");
        for n in page["results"].as_array().unwrap() {
            out.insert(id_of(n), n["message"].as_str().unwrap().to_string());
        }
        match page["next"].as_u64() {
            Some(next) => path = format!("/api/notifications/?limit=100&before={next}"),
            None => return out,
        }
    }
}

/// Checks one conversation's history against what its writers recorded.
fn check_history(history: &[Value], ledger: &Ledger, round: usize) {
    let by_id: HashMap<u64, &Value> = history.iter().map(|m| (id_of(m), m)).collect();
    for (id, m) in &ledger.messages {
        let stored = by_id.get(id);
        if m.deleted_acked {
            assert!(
                stored.is_none(),
                "round {round}: acknowledged delete of {id} lost: {stored:?}"
            );
            continue;
        }
        if m.delete_pending && stored.is_none() {
            continue; // an unacknowledged delete may have landed
        }
        let stored =
            stored.unwrap_or_else(|| panic!("round {round}: acknowledged message {id} ({m:?}) lost"));
        // Its content: the last acknowledged edit, or a later one in flight.
        let mut allowed: Vec<&String> = vec![m.acked_edits.last().unwrap_or(&m.created)];
        allowed.extend(m.pending_edit.iter());
        let content = stored["content"].as_str().unwrap().to_string();
        assert!(
            allowed.contains(&&content),
            "round {round}: message {id} shows {content:?}, expected one of {allowed:?}"
        );
        let edited = content != m.created;
        assert_eq!(
            stored["edited"], edited,
            "round {round}: edited flag of {id}: {stored}"
        );
    }
    // Nothing that was never sent, nothing torn: any other message is an
    // unacknowledged creation, whole, never edited.
    for (id, stored) in &by_id {
        if ledger.messages.contains_key(id) {
            continue;
        }
        let content = stored["content"].as_str().unwrap().to_string();
        assert!(
            ledger.unacked_texts.contains(&content),
            "round {round}: history has message {id} that nobody sent: {stored}"
        );
        assert_eq!(stored["edited"], false, "round {round}: {stored}");
        assert!(
            content.starts_with(stored["sender"].as_str().unwrap()),
            "{stored}"
        );
    }
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_at_random_moments() {
    let _machine = crate::util::alone().await;
    let mut server = own_server!("--max-replay-events", "1000000");
    let mut max_message_id = 0;
    let mut max_notification_id = 0;
    for round in 1..=3 {
        let (alice, bob, carol, dave, erin) = (
            user("alice"),
            user("bob"),
            user("carol"),
            user("dave"),
            user("erin"),
        );
        let c1 = server.create_conversation(&alice, &[&bob]).await;
        let c2 = server.create_conversation(&carol, &[&dave]).await;
        let ledgers: Vec<Shared> = (0..2).map(|_| Shared::default()).collect();
        let notes = Shared::default();
        let mut tasks = vec![];
        for (conv, users, ledger) in [
            (c1, [&alice, &bob], &ledgers[0]),
            (c2, [&carol, &dave], &ledgers[1]),
        ] {
            for who in users {
                let ws = server.ws_chat(conv, who).await;
                tasks.push(tokio::spawn(writer(ws, who.clone(), ledger.clone())));
            }
        }
        tasks.push(tokio::spawn(notifier(
            server.addr.clone(),
            server.service_token(),
            erin.clone(),
            notes.clone(),
        )));
        // Erin reads her own conversation's history meanwhile.
        let c3 = server.create_conversation(&erin, &[]).await;
        tasks.push(tokio::spawn(reader(
            server.addr.clone(),
            server.token(&erin),
            c3,
            notes.clone(),
        )));
        let delay = rand::rng().random_range(100..=700);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill9();
        // Freeze the ledgers: what is acknowledged now is what must survive.
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        server.start_again();

        let mut acked_total = 0;
        for (conv, owner, ledger) in [(c1, &alice, &ledgers[0]), (c2, &carol, &ledgers[1])] {
            let history = server.history(conv, owner).await;
            let replay = replayed(&server, conv, owner).await;
            let ledger = ledger.lock().unwrap();
            check_history(&history, &ledger, round);
            // The event log replays to exactly the history (the sentinel aside).
            let shown: BTreeMap<u64, (String, bool)> = history
                .iter()
                .filter(|m| m["content"] != "replay sentinel")
                .map(|m| {
                    (
                        id_of(m),
                        (m["content"].as_str().unwrap().to_string(), m["edited"] == true),
                    )
                })
                .collect();
            assert_eq!(
                replay, shown,
                "round {round}: conversation {conv}: ?after=0 replay against history"
            );
            assert!(
                ledger.refusals.is_empty(),
                "round {round}: refused under load: {:?}",
                ledger.refusals
            );
            assert!(
                ledger.messages.len() >= 3,
                "round {round}: only {} acknowledged messages in conversation {conv} before the kill: \
                 nothing was tested",
                ledger.messages.len()
            );
            acked_total += ledger.messages.len();
            max_message_id = max_message_id
                .max(ledger.messages.keys().copied().max().unwrap_or(0))
                .max(history.iter().map(id_of).max().unwrap_or(0));
        }
        let stored = all_notifications(&server, &erin).await;
        let notes = std::mem::take(&mut *notes.lock().unwrap());
        assert!(
            notes.refusals.is_empty(),
            "round {round}: refused under load: {:?}",
            notes.refusals
        );
        assert!(
            !notes.notifications.is_empty() && notes.reads > 0,
            "round {round}: {} acknowledged notifications, {} history reads before the kill: nothing was tested",
            notes.notifications.len(),
            notes.reads
        );
        // Every acknowledged read mark survived.
        let (status, unread) = server
            .get("/api/notifications/?unread=true&limit=100", &server.token(&erin))
            .await;
        assert_eq!(status, 200);
        let unread: Vec<u64> = unread["results"].as_array().unwrap().iter().map(id_of).collect();
        for id in &notes.marked_read {
            assert!(
                !unread.contains(id),
                "round {round}: acknowledged read mark of {id} lost"
            );
        }
        for (id, text) in &notes.notifications {
            assert_eq!(
                stored.get(id),
                Some(text),
                "round {round}: acknowledged notification {id} lost"
            );
        }
        for (id, text) in &stored {
            assert!(
                notes.notifications.get(id) == Some(text) || notes.unanswered_notifications.contains(text),
                "round {round}: notification {id} {text:?} was never posted"
            );
        }
        max_notification_id = max_notification_id.max(stored.keys().copied().max().unwrap_or(0));
        eprintln!(
            "crash_safety: round {round}: killed after {delay} ms; {acked_total} acknowledged messages, \
             {} acknowledged notifications, {} read marks, {} history reads; all there, replay = history",
            notes.notifications.len(),
            notes.marked_read.len(),
            notes.reads
        );

        // New ids after the restart are above everything before it.
        let mut ws = server.ws_chat(c1, &alice).await;
        let id = id_of(&say(&mut ws, "after the restart").await);
        assert!(
            id > max_message_id,
            "round {round}: new message id {id} <= {max_message_id}"
        );
        max_message_id = id;
        let n = server.notify(&erin, "after the restart").await;
        assert!(
            id_of(&n) > max_notification_id,
            "round {round}: notification id {n}"
        );
        max_notification_id = id_of(&n);
    }
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_loses_at_most_the_last_interval_and_ids_still_increase() {
    let _machine = crate::util::alone().await;
    let mut server = own_server!("--durability", "interval:200");
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    // Let the conversation itself reach the disk.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ws = server.ws_chat(conv, &alice).await;
    // Each acknowledged event, with when it was acknowledged.
    let acked: Arc<Mutex<Vec<(Value, std::time::Instant)>>> = Arc::default();
    let acked2 = acked.clone();
    let task = tokio::spawn(async move {
        let mut ws = ws;
        for i in 0.. {
            for j in 0..5 {
                let frame = json!({"type": "chat_message", "message": format!("m {i} {j}")});
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    return;
                }
            }
            for _ in 0..5 {
                let Some(e) = next_event(&mut ws).await else {
                    return;
                };
                acked2.lock().unwrap().push((e, std::time::Instant::now()));
            }
        }
    });
    let delay = rand::rng().random_range(300..=700);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let killed_at = std::time::Instant::now();
    server.kill9();
    task.abort();
    let _ = task.await;
    server.start_again();
    let acked_at = acked.lock().unwrap().clone();
    let acked: Vec<Value> = acked_at.iter().map(|(e, _)| e.clone()).collect();
    assert!(
        acked.len() >= 20,
        "only {} acknowledged messages before the kill: nothing was tested",
        acked.len()
    );
    let history = server.history(conv, &alice).await;
    let stored: HashMap<u64, &Value> = history.iter().map(|m| (id_of(m), m)).collect();
    let lost = acked.iter().filter(|e| !stored.contains_key(&id_of(e))).count();
    let max_acked = acked.iter().map(id_of).max().unwrap_or(0);
    let max_stored = stored.keys().copied().max().unwrap_or(0);
    // Whatever survived is whole and is what was acknowledged.
    for e in &acked {
        if let Some(s) = stored.get(&id_of(e)) {
            assert_eq!(s["content"], e["content"]);
        }
    }
    let mut ws = server.ws_chat(conv, &alice).await;
    let new_id = id_of(&say(&mut ws, "after the restart").await);
    eprintln!(
        "crash_safety: interval:200, killed after {delay} ms: {} acknowledged, {lost} of them lost; \
         highest acknowledged id {max_acked}, highest stored {max_stored}, first id after restart {new_id}{}",
        acked.len(),
        if new_id <= max_acked {
            " (an id clients already saw is issued again)"
        } else {
            ""
        }
    );
    assert!(new_id > max_stored, "new id {new_id} <= stored {max_stored}");
    // README: an id a client saw is never issued again.
    assert!(
        new_id > max_acked,
        "the first id after the restart, {new_id}, was already shown to a client (highest {max_acked})"
    );
    // README: what is lost is the tail, up to about the last interval (plus
    // a flush's duration) of writes: every lost message is newer than every
    // kept one and was acknowledged shortly before the kill.
    let newest_kept = acked
        .iter()
        .map(id_of)
        .filter(|id| stored.contains_key(id))
        .max()
        .unwrap_or(0);
    const LOSS_WINDOW: Duration = Duration::from_millis(200 + 600);
    for (e, at) in &acked_at {
        if stored.contains_key(&id_of(e)) {
            continue;
        }
        assert!(
            id_of(e) > newest_kept,
            "message {} was lost although the later {newest_kept} survived: not a clean tail",
            id_of(e)
        );
        let before_kill = killed_at.duration_since(*at);
        assert!(
            before_kill <= LOSS_WINDOW,
            "message {} was lost although it was acknowledged {before_kill:?} before the kill \
             (interval 200 ms; README: about the last interval plus a flush)",
            id_of(e)
        );
    }
}

/// A data dir left by `kill -9` in the default mode and opened in
/// `interval` mode: the commit log is replayed into sled first, so nothing
/// acknowledged is lost; and opened in the default mode again after that,
/// nothing written in between is lost either (the log is not replayed over
/// it).
#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_left_by_kill_9_opens_in_interval_mode_with_everything() {
    let _machine = crate::util::alone().await;
    let mut server = own_server!();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut ws = server.ws_chat(conv, &alice).await;
    let mut acked = vec![];
    for i in 0..40 {
        let e = say(&mut ws, &format!("before {i}")).await;
        acked.push(id_of(&e));
    }
    // Edit the first one, so that a replay over newer state would show.
    let first = acked[0];
    send_json(
        &mut ws,
        &json!({"type": "edit_message", "message_id": first, "content": "edited"}),
    )
    .await;
    let edited = recv_json(&mut ws).await;
    assert_eq!(edited["type"], "message.edited", "{edited}");
    drop(ws);
    server.kill9();

    server.start_again_with(&["--durability", "interval:200"]);
    let ids = |h: &[Value]| {
        let mut v: Vec<u64> = h.iter().map(id_of).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(
        ids(&server.history(conv, &alice).await),
        acked,
        "interval mode after kill -9 in the default mode"
    );
    let mut ws = server.ws_chat(conv, &alice).await;
    let e = say(&mut ws, "in interval mode").await;
    assert!(id_of(&e) > *acked.last().unwrap(), "ids keep increasing: {e}");
    acked.push(id_of(&e));
    send_json(
        &mut ws,
        &json!({"type": "edit_message", "message_id": first, "content": "edited again"}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["type"], "message.edited");
    drop(ws);
    let status = server.terminate();
    assert!(status.success(), "{status}");

    server.start_again_with(&[]);
    let history = server.history(conv, &alice).await;
    assert_eq!(ids(&history), acked, "the default mode again");
    let m = history
        .iter()
        .find(|m| id_of(m) == first)
        .expect("the edited message");
    assert_eq!(
        m["content"], "edited again",
        "the log was not replayed over newer state"
    );
}
