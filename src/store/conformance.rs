//! What every backend must do, as one suite run against each of them
//! (sled, memory; later the commit log and PostgreSQL): each backend's
//! module has a test that calls [`run`] with a way to open it.

use super::*;
use pollster::block_on;

/// How the suite opens a backend. `open` is called again after every
/// handle was dropped, to check what survives a restart; it must see the
/// same data.
pub trait Backend {
    fn open(&self) -> Box<dyn Store>;
}

pub fn run(backend: &dyn Backend) {
    ids_increase_across_reopen(backend);
    a_chat_change_is_whole(backend);
    reads_in_a_group_see_its_own_changes(backend);
    text_is_kept_exactly_even_a_nul(backend);
    history_pages_newest_first_and_skip_deleted(backend);
    event_log_ranges_and_truncation(backend);
    notifications_pages_unread_index_and_replay(backend);
}

fn conversation(g: &mut dyn Group, participants: &[&str]) -> Conversation {
    let c = Conversation {
        id: g.next_conversation().unwrap(),
        title: Some("t".into()),
        participants: participants.iter().map(|p| p.to_string()).collect(),
        created_at: Micros(1),
    };
    g.apply(Change::Conversation(&c)).unwrap();
    c
}

/// Sends (or, given `existing`, edits / deletes) a message with its event.
fn chat(g: &mut dyn Group, conv: ConversationId, kind: EventKind, existing: Option<Message>) -> Message {
    let seq = g.next_seq(conv).unwrap();
    let m = match existing {
        None => {
            let id = g.next_message().unwrap();
            Message {
                id,
                conversation: conv,
                sender: "alice".into(),
                content: format!("m{}", id.0),
                timestamp: Micros(id.0),
                edited: false,
                deleted: false,
                seq,
            }
        }
        Some(mut m) => {
            m.edited |= kind == EventKind::Edited;
            m.deleted |= kind == EventKind::Deleted;
            m
        }
    };
    let payload = format!("{{\"id\":{},\"seq\":{}}}", m.id.0, seq.0);
    g.apply(Change::Chat {
        message: &m,
        kind,
        seq,
        payload: payload.as_bytes(),
        notifications: &[],
    })
    .unwrap();
    m
}

fn notification(g: &mut dyn Group, user: &str) -> Notification {
    let n = Notification {
        id: g.next_notification().unwrap(),
        user: user.into(),
        message: "hello".into(),
        is_read: false,
        timestamp: Micros(5),
    };
    g.apply(Change::Notifications(std::slice::from_ref(&n))).unwrap();
    n
}

fn ids_increase_across_reopen(b: &dyn Backend) {
    let (c1, m1, n1) = {
        let s = b.open();
        let mut g = s.begin().unwrap();
        let c = conversation(&mut *g, &["alice", "bob"]);
        let m = chat(&mut *g, c.id, EventKind::Created, None);
        let n = notification(&mut *g, "bob");
        g.commit().unwrap();
        (c.id, m.id, n.id)
    };
    let s = b.open();
    let mut g = s.begin().unwrap();
    assert!(
        g.next_conversation().unwrap() > c1,
        "conversation ids increase across a reopen"
    );
    assert!(
        g.next_message().unwrap() > m1,
        "message ids increase across a reopen"
    );
    assert!(
        g.next_notification().unwrap() > n1,
        "notification ids increase across a reopen"
    );
    g.commit().unwrap();
    assert!(
        block_on(s.conversation_exists(c1)).unwrap(),
        "a committed conversation survives"
    );
    assert!(
        block_on(s.message(c1, m1)).unwrap().is_some(),
        "a committed message survives"
    );
    assert!(
        block_on(s.notification(n1)).unwrap().is_some(),
        "a committed notification survives"
    );
}

/// A message, its event and the notifications it caused: all there, read
/// back after a reopen (long: it builds one change with every part).
fn a_chat_change_is_whole(b: &dyn Backend) {
    let s = b.open();
    let mut g = s.begin().unwrap();
    let c = conversation(&mut *g, &["alice", "bea", "cyd"]);
    let seq = g.next_seq(c.id).unwrap();
    let m = Message {
        id: g.next_message().unwrap(),
        conversation: c.id,
        sender: "alice".into(),
        content: "hi".into(),
        timestamp: Micros(9),
        edited: false,
        deleted: false,
        seq,
    };
    let ns = [
        Notification {
            id: g.next_notification().unwrap(),
            user: "bea".into(),
            message: "New message from alice".into(),
            is_read: false,
            timestamp: Micros(9),
        },
        Notification {
            id: g.next_notification().unwrap(),
            user: "cyd".into(),
            message: "New message from alice".into(),
            is_read: false,
            timestamp: Micros(9),
        },
    ];
    g.apply(Change::Chat {
        message: &m,
        kind: EventKind::Created,
        seq,
        payload: b"{\"x\":1}",
        notifications: &ns,
    })
    .unwrap();
    g.commit().unwrap();
    drop(s);
    let s = b.open();
    assert_eq!(block_on(s.message(c.id, m.id)).unwrap(), Some(m.clone()));
    let log = block_on(s.events_after(c.id, Seq(0), 10)).unwrap();
    assert_eq!(log.items.len(), 1);
    assert_eq!(log.items[0].seq, seq);
    assert_eq!(log.items[0].message, m.id);
    assert_eq!(
        &log.items[0].payload[..],
        b"{\"x\":1}",
        "the payload is kept byte for byte"
    );
    for n in &ns {
        assert_eq!(block_on(s.notification(n.id)).unwrap().as_ref(), Some(n));
        assert_eq!(block_on(s.unread_count(&n.user)).unwrap(), 1);
    }
    assert!(block_on(s.is_participant(c.id, "cyd")).unwrap());
    assert!(!block_on(s.is_participant(c.id, "mallory")).unwrap());
    let of_carol = block_on(s.conversations_of("cyd")).unwrap();
    assert!(of_carol.iter().any(|x| x.id == c.id));
    assert!(block_on(s.conversations_of("mallory")).unwrap().is_empty());
}

/// The API allows any Unicode text, U+0000 included (PostgreSQL's `text`
/// does not: a backend must not lose or refuse it).
fn text_is_kept_exactly_even_a_nul(b: &dyn Backend) {
    let s = b.open();
    let mut g = s.begin().unwrap();
    let c = Conversation {
        id: g.next_conversation().unwrap(),
        title: Some("t\0itle ☃".into()),
        participants: vec!["alice".into(), "bea".into()],
        created_at: Micros(1),
    };
    g.apply(Change::Conversation(&c)).unwrap();
    let seq = g.next_seq(c.id).unwrap();
    let m = Message {
        id: g.next_message().unwrap(),
        conversation: c.id,
        sender: "alice".into(),
        content: "NUL\0inside 🦀".into(),
        timestamp: Micros(2),
        edited: false,
        deleted: false,
        seq,
    };
    let n = Notification {
        id: g.next_notification().unwrap(),
        user: "bea".into(),
        message: "a\0b".into(),
        is_read: false,
        timestamp: Micros(2),
    };
    g.apply(Change::Chat {
        message: &m,
        kind: EventKind::Created,
        seq,
        payload: b"{}",
        notifications: std::slice::from_ref(&n),
    })
    .unwrap();
    g.commit().unwrap();
    drop(s);
    let s = b.open();
    assert_eq!(block_on(s.conversation(c.id)).unwrap(), Some(c.clone()));
    assert_eq!(block_on(s.message(c.id, m.id)).unwrap(), Some(m));
    assert_eq!(block_on(s.notification(n.id)).unwrap(), Some(n));
}

fn reads_in_a_group_see_its_own_changes(b: &dyn Backend) {
    let s = b.open();
    let mut g = s.begin().unwrap();
    let c = conversation(&mut *g, &["alice"]);
    assert_eq!(g.conversation(c.id).unwrap(), Some(c.clone()));
    let m = chat(&mut *g, c.id, EventKind::Created, None);
    assert_eq!(g.message(c.id, m.id).unwrap(), Some(m.clone()));
    let n = notification(&mut *g, "alice");
    assert_eq!(g.notification(n.id).unwrap(), Some(n.clone()));
    assert!(g.unread("alice").unwrap().contains(&n.id));
    let mut read = n.clone();
    read.is_read = true;
    g.apply(Change::Notifications(std::slice::from_ref(&read)))
        .unwrap();
    assert!(
        !g.unread("alice").unwrap().contains(&n.id),
        "marking read leaves the unread index"
    );
    g.commit().unwrap();
}

fn history_pages_newest_first_and_skip_deleted(b: &dyn Backend) {
    let s = b.open();
    let mut g = s.begin().unwrap();
    let c = conversation(&mut *g, &["alice"]);
    let other = conversation(&mut *g, &["alice"]);
    let ms: Vec<Message> = (0..7)
        .map(|_| chat(&mut *g, c.id, EventKind::Created, None))
        .collect();
    chat(&mut *g, other.id, EventKind::Created, None);
    chat(&mut *g, c.id, EventKind::Deleted, Some(ms[2].clone()));
    g.commit().unwrap();
    let ids = |p: &Page<Message>| p.items.iter().map(|m| m.id).collect::<Vec<_>>();
    let p1 = block_on(s.history(c.id, None, 3)).unwrap();
    assert_eq!(ids(&p1), [ms[6].id, ms[5].id, ms[4].id]);
    assert_eq!(p1.next, Some(ms[4].id.0));
    let p2 = block_on(s.history(c.id, Some(ms[4].id), 3)).unwrap();
    assert_eq!(
        ids(&p2),
        [ms[3].id, ms[1].id, ms[0].id],
        "deleted messages are skipped"
    );
    assert_eq!(p2.next, None, "no next page once nothing older remains");
    let exact = block_on(s.history(c.id, Some(ms[1].id), 1)).unwrap();
    assert_eq!(ids(&exact), [ms[0].id]);
    assert_eq!(exact.next, None);
}

fn event_log_ranges_and_truncation(b: &dyn Backend) {
    let s = b.open();
    let mut g = s.begin().unwrap();
    let c = conversation(&mut *g, &["alice"]);
    let m1 = chat(&mut *g, c.id, EventKind::Created, None);
    let m2 = chat(&mut *g, c.id, EventKind::Created, None);
    let edit_seq = g.next_seq(c.id).unwrap();
    let mut edited = m1.clone();
    edited.edited = true;
    g.apply(Change::Chat {
        message: &edited,
        kind: EventKind::Edited,
        seq: edit_seq,
        payload: b"e",
        notifications: &[],
    })
    .unwrap();
    let m3 = chat(&mut *g, c.id, EventKind::Created, None);
    g.commit().unwrap();
    let seqs = |r: &Replay<LoggedEvent>| r.items.iter().map(|e| e.seq).collect::<Vec<_>>();
    let all = block_on(s.events_after(c.id, Seq(0), 100)).unwrap();
    assert_eq!(
        seqs(&all),
        [m1.seq, m2.seq, edit_seq, m3.seq],
        "the log is in order"
    );
    assert_eq!(all.truncated_after, None);
    let after_m1 = block_on(s.events_after(c.id, m1.seq, 100)).unwrap();
    assert_eq!(seqs(&after_m1), [m2.seq, edit_seq, m3.seq]);
    let cut = block_on(s.events_after(c.id, Seq(0), 2)).unwrap();
    assert_eq!(
        seqs(&cut),
        [edit_seq, m3.seq],
        "a bounded replay keeps the newest"
    );
    assert_eq!(
        cut.truncated_after,
        Some(m2.id.0),
        "named: the newest message before the window"
    );
    let cut_at_start = block_on(s.events_after(c.id, m1.seq, 1)).unwrap();
    assert_eq!(seqs(&cut_at_start), [m3.seq]);
    assert_eq!(cut_at_start.truncated_after, Some(m2.id.0));
    let none = block_on(s.events_after(c.id, m3.seq, 10)).unwrap();
    assert!(none.items.is_empty());
}

fn notifications_pages_unread_index_and_replay(b: &dyn Backend) {
    let s = b.open();
    let user = "nora";
    let mut g = s.begin().unwrap();
    let ns: Vec<Notification> = (0..5).map(|_| notification(&mut *g, user)).collect();
    notification(&mut *g, "someone-else");
    let mut read = ns[1].clone();
    read.is_read = true;
    g.apply(Change::Notifications(std::slice::from_ref(&read)))
        .unwrap();
    g.commit().unwrap();
    let ids = |p: &Page<Notification>| p.items.iter().map(|n| n.id).collect::<Vec<_>>();
    let all = block_on(s.notifications(user, false, None, 10)).unwrap();
    assert_eq!(ids(&all), [ns[4].id, ns[3].id, ns[2].id, ns[1].id, ns[0].id]);
    assert_eq!(all.next, None);
    let page = block_on(s.notifications(user, false, None, 2)).unwrap();
    assert_eq!(ids(&page), [ns[4].id, ns[3].id]);
    assert_eq!(page.next, Some(ns[3].id.0));
    let unread = block_on(s.notifications(user, true, None, 10)).unwrap();
    assert_eq!(ids(&unread), [ns[4].id, ns[3].id, ns[2].id, ns[0].id]);
    assert!(unread.items.iter().all(|n| !n.is_read));
    assert_eq!(block_on(s.unread_count(user)).unwrap(), 4);
    let replay = block_on(s.notifications_after(user, ns[1].id, 10)).unwrap();
    let replayed: Vec<_> = replay.items.iter().map(|n| n.id).collect();
    assert_eq!(
        replayed,
        [ns[2].id, ns[3].id, ns[4].id],
        "oldest first, only the user's"
    );
    assert_eq!(replay.truncated_after, None);
    let cut = block_on(s.notifications_after(user, NotificationId(0), 2)).unwrap();
    let kept: Vec<_> = cut.items.iter().map(|n| n.id).collect();
    assert_eq!(kept, [ns[3].id, ns[4].id]);
    assert_eq!(cut.truncated_after, Some(ns[2].id.0));
}
