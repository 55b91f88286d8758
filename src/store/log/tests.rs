use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::ids::{ConversationId, MessageId, NotificationId, Seq};
use crate::protocol::Micros;
use crate::store::{Change, Conversation, EventKind, Message, Notification};

fn note(id: u64, user: &str, read: bool) -> Notification {
    Notification {
        id: NotificationId(id),
        user: user.into(),
        message: format!("alice: hi {id}"),
        is_read: read,
        timestamp: Micros(1_767_225_600_000_000 + id),
    }
}

/// A chat change whose content names `tag`: how the tests recognise it.
fn chat(tag: &str, id: u64, notes: Vec<Notification>) -> OwnedChange {
    OwnedChange::Chat {
        message: Message {
            id: MessageId(id),
            conversation: ConversationId(7),
            sender: "alice".into(),
            content: tag.into(),
            timestamp: Micros(1_767_225_600_000_000 + id),
            edited: false,
            deleted: false,
            seq: Seq(id),
        },
        kind: EventKind::Created,
        seq: Seq(id),
        payload: format!("{{\"type\":\"chat_message\",\"message\":{{\"id\":{id},\"content\":\"{tag}\"}}}}")
            .into_bytes(),
        notifications: notes,
    }
}

fn tag_of(c: &OwnedChange) -> &str {
    match c {
        OwnedChange::Chat { message, .. } => &message.content,
        _ => panic!("not a chat change"),
    }
}

fn group(changes: &[OwnedChange]) -> GroupBuf {
    let mut g = GroupBuf::new();
    for c in changes {
        g.push(&c.as_change());
    }
    g
}

fn small() -> LogConfig {
    LogConfig {
        segment_size: 4096,
        spare_segments: 2,
    }
}

/// Opens the log on `disk` from `from`: every replayed group, then the
/// writer.
fn reopen(disk: &SimulatedDisk, config: LogConfig, from: Lsn) -> Result<(Vec<ReplayedGroup>, Log)> {
    let mut r = Log::open(disk.dir(), config, from)?;
    let mut groups = Vec::new();
    while let Some(g) = r.next_group()? {
        groups.push(g);
    }
    Ok((groups, r.finish()?))
}

fn tags(groups: &[ReplayedGroup]) -> Vec<String> {
    groups
        .iter()
        .flat_map(|g| g.changes.iter().map(|c| tag_of(c).to_string()))
        .collect()
}

/// Appends and syncs `n` one-change groups tagged `prefix0..`; their ends.
fn append_synced(log: &mut Log, prefix: &str, n: u64) -> Vec<Lsn> {
    (0..n)
        .map(|i| {
            let end = log
                .append(&mut group(&[chat(&format!("{prefix}{i}"), i + 1, vec![])]))
                .unwrap();
            log.sync().unwrap();
            end
        })
        .collect()
}

fn expected(prefix: &str, n: u64) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn every_change_kind_round_trips() {
    let conv = Conversation {
        id: ConversationId(3),
        title: Some("Ünïcode ☕ title".into()),
        participants: vec!["alice".into(), "bob".into(), "çarol".into()],
        created_at: Micros(42),
    };
    let untitled = Conversation {
        id: ConversationId(u64::MAX),
        title: None,
        participants: vec![],
        created_at: Micros(0),
    };
    let mut changes = vec![
        OwnedChange::Conversation(conv),
        OwnedChange::Conversation(untitled),
        chat("plain", 1, vec![]),
        chat(
            "with notes",
            2,
            vec![note(1, "bob", false), note(2, "çarol", true)],
        ),
        OwnedChange::Notifications(vec![]),
        OwnedChange::Notifications((1..50).map(|i| note(i, "bob", i % 2 == 0)).collect()),
    ];
    for (kind, edited, deleted) in [
        (EventKind::Edited, true, false),
        (EventKind::Deleted, true, true),
        (EventKind::Deleted, false, true),
    ] {
        let mut c = chat("", 9, vec![]);
        if let OwnedChange::Chat {
            message,
            kind: k,
            seq,
            ..
        } = &mut c
        {
            message.edited = edited;
            message.deleted = deleted;
            *k = kind;
            *seq = Seq(99);
        }
        changes.push(c);
    }
    let mut buf = Vec::new();
    for c in &changes {
        buf.clear();
        encode_change(&c.as_change(), &mut buf);
        assert_eq!(&OwnedChange::decode(&buf).expect("decodes"), c, "round trip");
        for cut in 0..buf.len() {
            assert!(
                OwnedChange::decode(&buf[..cut]).is_err(),
                "a truncated change is refused"
            );
        }
    }
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z]{1,12}", "\\PC{0,40}"]
}

fn arb_note() -> impl Strategy<Value = Notification> {
    (
        any::<u64>(),
        arb_string(),
        arb_string(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(id, user, message, is_read, t)| Notification {
            id: NotificationId(id),
            user,
            message,
            is_read,
            timestamp: Micros(t),
        })
}

fn arb_change() -> impl Strategy<Value = OwnedChange> {
    let conv = (
        any::<u64>(),
        proptest::option::of(arb_string()),
        proptest::collection::vec(arb_string(), 0..5),
        any::<u64>(),
    )
        .prop_map(|(id, title, participants, t)| {
            OwnedChange::Conversation(Conversation {
                id: ConversationId(id),
                title,
                participants,
                created_at: Micros(t),
            })
        });
    let msg = (
        (
            any::<u64>(),
            any::<u64>(),
            arb_string(),
            arb_string(),
            any::<u64>(),
        ),
        (any::<bool>(), any::<bool>(), any::<u64>(), any::<u64>(), 0..3u8),
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec(arb_note(), 0..4),
    )
        .prop_map(
            |((id, conv, sender, content, t), (edited, deleted, mseq, seq, k), payload, notifications)| {
                OwnedChange::Chat {
                    message: Message {
                        id: MessageId(id),
                        conversation: ConversationId(conv),
                        sender,
                        content,
                        timestamp: Micros(t),
                        edited,
                        deleted,
                        seq: Seq(mseq),
                    },
                    kind: [EventKind::Created, EventKind::Edited, EventKind::Deleted][k as usize],
                    seq: Seq(seq),
                    payload,
                    notifications,
                }
            },
        );
    let notes = proptest::collection::vec(arb_note(), 0..6).prop_map(OwnedChange::Notifications);
    prop_oneof![conv, msg, notes]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_changes_round_trip(c in arb_change()) {
        let mut buf = Vec::new();
        encode_change(&c.as_change(), &mut buf);
        prop_assert_eq!(OwnedChange::decode(&buf).unwrap(), c);
    }

    #[test]
    fn garbage_never_panics_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = OwnedChange::decode(&bytes);
    }

    /// Groups of arbitrary changes come back whole and in order, across
    /// segment roll-overs.
    #[test]
    fn arbitrary_groups_replay_in_order(groups in proptest::collection::vec(
        proptest::collection::vec(arb_change(), 1..4), 1..12)
    ) {
        let disk = SimulatedDisk::new(1);
        let (none, mut log) = reopen(&disk, small(), Lsn(0)).unwrap();
        prop_assert!(none.is_empty());
        for g in &groups {
            log.append(&mut group(g)).unwrap();
            log.sync().unwrap();
        }
        drop(log);
        let (back, _) = reopen(&disk, small(), Lsn(0)).unwrap();
        let back: Vec<Vec<OwnedChange>> = back.into_iter().map(|g| g.changes).collect();
        prop_assert_eq!(back, groups);
    }
}

#[test]
fn the_high_water_mark_covers_every_id_used() {
    let mut h = IdHighWater::default();
    let conv = Conversation {
        id: ConversationId(4),
        title: None,
        participants: vec![],
        created_at: Micros(0),
    };
    h.observe(&Change::Conversation(&conv));
    h.observe(&chat("x", 12, vec![note(30, "bob", false)]).as_change());
    h.observe(&OwnedChange::Notifications(vec![note(31, "bob", true)]).as_change());
    assert_eq!(
        h,
        IdHighWater {
            conversation: 7,
            message: 12,
            notification: 31,
            seq: 12
        }
    );
}

#[test]
fn groups_replay_whole_and_in_order_and_appends_continue_after_them() {
    let disk = SimulatedDisk::new(2);
    let (_, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    let changes: Vec<OwnedChange> = (0..5).map(|i| chat(&format!("g{i}"), i + 1, vec![])).collect();
    let end = log.append(&mut group(&changes)).unwrap();
    assert_eq!(log.sync().unwrap(), end, "the sync covers the append");
    let ends = append_synced(&mut log, "a", 200);
    drop(log);

    let (groups, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert_eq!(groups.len(), 201);
    assert_eq!(groups[0].changes, changes, "a group comes back whole");
    assert_eq!(groups[0].end, end);
    assert_eq!(groups.last().unwrap().end, *ends.last().unwrap());
    assert_eq!(log.tail(), *ends.last().unwrap(), "appends continue at the end");
    append_synced(&mut log, "b", 3);
    drop(log);

    // From a group's end: only what follows it.
    let (groups, _) = reopen(&disk, LogConfig::default(), ends[99]).unwrap();
    let mut want = expected("a", 200)[100..].to_vec();
    want.extend(expected("b", 3));
    assert_eq!(tags(&groups), want);
}

#[test]
fn the_real_directory_preallocates_segments_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let config = LogConfig {
        segment_size: 1 << 20,
        spare_segments: 2,
    };
    let open = || {
        let mut r = Log::open(Box::new(FsDir::open(&path).unwrap()), config.clone(), Lsn(0)).unwrap();
        let mut groups = Vec::new();
        while let Some(g) = r.next_group().unwrap() {
            groups.push(g);
        }
        (groups, r.finish().unwrap())
    };
    let (groups, mut log) = open();
    assert!(groups.is_empty());
    append_synced(&mut log, "r", 50);
    drop(log);
    let seg = path.join(segment_name(0));
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        1 << 20,
        "the segment is preallocated"
    );
    let (groups, _) = open();
    assert_eq!(tags(&groups), expected("r", 50));
}

/// A power cut at a random moment while four threads append and sync
/// groups of 1-4 changes, repeated over power cycles with checkpoints in
/// between and small segments (so cuts land in roll-overs and recycled
/// segments too): every group whose sync returned comes back, every group
/// that comes back is whole, none twice, each thread's in order.
/// Long: it is one scenario, run for both ways a cut can tear.
#[test]
fn a_power_cut_keeps_every_synced_group_and_no_partial_one() {
    for tear in [Tear::LastPrefix, Tear::Sectors] {
        for seed in 0..12u64 {
            let disk = SimulatedDisk::new(seed);
            disk.set_tear(tear);
            let config = LogConfig {
                segment_size: 8192,
                spare_segments: 1,
            };
            // Every group acknowledged or replayed so far: tag -> (its end, changes).
            let mut known: BTreeMap<String, (Lsn, usize)> = BTreeMap::new();
            let mut from = Lsn(0);
            let mut next_id = [0u64; 4];
            let (mut acked_total, mut unsynced_survivors) = (0, 0);
            for cycle in 0..4 {
                let (groups, mut log) = reopen(&disk, config.clone(), from)
                    .unwrap_or_else(|e| panic!("{tear:?} seed {seed} cycle {cycle}: reopen: {e}"));
                let mut seen = BTreeSet::new();
                let mut last_per_thread = [None::<u64>; 4];
                for w in groups.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "replayed groups follow each other");
                }
                for g in &groups {
                    assert!(g.end > from, "only groups after the applied position");
                    let first = tag_of(&g.changes[0]).to_string();
                    let (t, n, k) = parse_tag(&first);
                    assert_eq!(g.changes.len(), k, "{first}: the group is whole");
                    for (i, c) in g.changes.iter().enumerate() {
                        assert_eq!(tag_of(c), format!("t{t}-{n}-{k}-{i}"), "one group's changes");
                    }
                    assert!(seen.insert(first.clone()), "{first} replayed once");
                    assert!(last_per_thread[t].is_none_or(|l| l < n), "thread order");
                    last_per_thread[t] = Some(n);
                    if known.insert(first, (g.end, k)).is_none() {
                        unsynced_survivors += 1;
                    }
                }
                for (tag, (end, _)) in &known {
                    if *end > from {
                        assert!(
                            seen.contains(tag),
                            "{tear:?} seed {seed} cycle {cycle}: acknowledged {tag} lost"
                        );
                    }
                }
                // Checkpoint at the middle group, as the applied state would.
                if let Some(g) = groups.get(groups.len() / 2) {
                    log.checkpoint(g.end).unwrap();
                    from = g.end;
                }
                let log = Arc::new(Mutex::new(log));
                let acked = Arc::new(Mutex::new(Vec::new()));
                let threads: Vec<_> = (0..4)
                    .map(|t| {
                        let (log, acked) = (log.clone(), acked.clone());
                        let start = next_id[t];
                        std::thread::spawn(move || {
                            let mut buf = GroupBuf::new();
                            let mut n = start;
                            loop {
                                // Every third round appends two groups
                                // before one sync, as a pipelined writer
                                // does: more unsynced bytes at the cut.
                                let rounds = if n % 3 == 0 { 2 } else { 1 };
                                let mut log = log.lock().unwrap();
                                let mut appended = Vec::new();
                                for _ in 0..rounds {
                                    n += 1;
                                    let k = (n % 4 + 1) as usize;
                                    buf.clear();
                                    for i in 0..k {
                                        buf.push(&chat(&format!("t{t}-{n}-{k}-{i}"), n, vec![]).as_change());
                                    }
                                    let Ok(end) = log.append(&mut buf) else { return n };
                                    appended.push((format!("t{t}-{n}-{k}-0"), end, k));
                                }
                                if log.sync().is_err() {
                                    return n;
                                }
                                acked.lock().unwrap().extend(appended);
                            }
                        })
                    })
                    .collect();
                std::thread::sleep(Duration::from_micros(200 + seed * 137 % 3000));
                disk.cut();
                for (t, h) in threads.into_iter().enumerate() {
                    next_id[t] = h.join().unwrap();
                }
                for (tag, end, k) in acked.lock().unwrap().drain(..) {
                    known.insert(tag, (end, k));
                    acked_total += 1;
                }
            }
            assert!(
                acked_total > 0,
                "{tear:?} seed {seed}: the cuts came after some syncs"
            );
            eprintln!("{tear:?} seed {seed}: {acked_total} groups acknowledged over 4 cuts, {unsynced_survivors} unacknowledged groups survived whole");
        }
    }
}

/// `t{thread}-{n}-{k}-0` -> (thread, n, k).
fn parse_tag(tag: &str) -> (usize, u64, usize) {
    let parts: Vec<&str> = tag.trim_start_matches('t').split('-').collect();
    (
        parts[0].parse().unwrap(),
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
    )
}

/// The segment holding `lsn` and the offset in it.
fn locate(log: &Log, lsn: Lsn) -> (String, u64) {
    let start = *log.segments().iter().rev().find(|&&s| s <= lsn.0).unwrap();
    (segment_name(start), lsn.0 - start)
}

#[test]
fn a_flipped_byte_before_the_tail_is_an_error_naming_segment_and_offset() {
    for (what, delta) in [("payload", 40), ("header", 5)] {
        let disk = SimulatedDisk::new(3);
        let (_, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
        let ends = append_synced(&mut log, "m", 10);
        let (seg, off) = locate(&log, ends[2]);
        drop(log);
        disk.corrupt(&seg, off + delta, |b| *b ^= 0x10);
        let err = reopen(&disk, LogConfig::default(), Lsn(0))
            .err()
            .expect("an error");
        match &err {
            LogError::Corrupt { segment, offset, .. } => {
                assert_eq!(segment, &seg, "{what}");
                assert_eq!(*offset, off, "{what}: the bad record's offset");
            }
            e => panic!("{what}: expected corruption, got {e}"),
        }
        assert!(
            err.to_string().contains(&seg),
            "the message names the segment: {err}"
        );
    }
}

#[test]
fn a_flipped_byte_in_the_last_group_is_a_torn_tail() {
    let disk = SimulatedDisk::new(4);
    let (_, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    let ends = append_synced(&mut log, "m", 10);
    let (seg, off) = locate(&log, ends[8]);
    drop(log);
    disk.corrupt(&seg, off + 40, |b| *b ^= 1);
    let (groups, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert_eq!(
        tags(&groups),
        expected("m", 9),
        "the replay ends before the bad group"
    );
    assert_eq!(log.tail(), ends[8], "the next append overwrites it");
    append_synced(&mut log, "n", 2);
    drop(log);
    let (groups, _) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    let mut want = expected("m", 9);
    want.extend(expected("n", 2));
    assert_eq!(tags(&groups), want);
}

/// A torn group whose later records survived (sectors written out of
/// order): the replay ends before it, and its remains are zeroed so that
/// no later, shorter group can ever be followed by them.
#[test]
fn the_remains_of_a_torn_group_are_zeroed_before_appending() {
    let disk = SimulatedDisk::new(5);
    let (_, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    let ends = append_synced(&mut log, "a", 3);
    let torn: Vec<OwnedChange> = (0..3)
        .map(|i| chat(&format!("torn{i}"), 10 + i, vec![]))
        .collect();
    let torn_end = log.append(&mut group(&torn)).unwrap();
    log.sync().unwrap();
    let (seg, off) = locate(&log, ends[2]);
    drop(log);
    // Its first record is damaged; the other two and the commit are valid.
    disk.corrupt(&seg, off + 30, |b| *b ^= 0xff);
    let (groups, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert_eq!(tags(&groups), expected("a", 3));
    let bytes = disk.contents(&seg).unwrap();
    assert!(
        bytes[off as usize..(torn_end.0 - ends[2].0 + off) as usize]
            .iter()
            .all(|&b| b == 0),
        "the torn group's remains are zeroed"
    );
    append_synced(&mut log, "b", 1);
    drop(log);
    let (groups, _) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert_eq!(tags(&groups), ["a0", "a1", "a2", "b0"]);
}

#[test]
fn segments_roll_over_and_checkpoints_recycle_them() {
    let disk = SimulatedDisk::new(6);
    let (_, mut log) = reopen(&disk, small(), Lsn(0)).unwrap();
    let ends = append_synced(&mut log, "s", 100);
    let segments = log.segments().len();
    assert!(segments > 3, "small segments roll over ({segments})");
    log.checkpoint(ends[59]).unwrap();
    let names = disk.names();
    let spares = names.iter().filter(|n| n.starts_with("spare-")).count();
    assert_eq!(spares, 2, "checkpointed segments kept for reuse: {names:?}");
    assert!(
        log.segments().len() < segments,
        "segments below the checkpoint left"
    );
    assert!(
        log.segments()[0] <= ends[59].0,
        "the segment holding the checkpoint stays"
    );
    drop(log);

    let (groups, mut log) = reopen(&disk, small(), ends[59]).unwrap();
    assert_eq!(tags(&groups), expected("s", 100)[60..].to_vec());
    // New segments reuse the spares (whose stale records must not show).
    let more = append_synced(&mut log, "t", 60);
    let names = disk.names();
    assert!(
        !names.iter().any(|n| n.starts_with("spare-")),
        "spares reused: {names:?}"
    );
    drop(log);
    let (groups, _) = reopen(&disk, small(), ends[59]).unwrap();
    let mut want = expected("s", 100)[60..].to_vec();
    want.extend(expected("t", 60));
    assert_eq!(tags(&groups), want);
    assert_eq!(groups.last().unwrap().end, *more.last().unwrap());
}

#[test]
fn corruption_in_a_segment_with_a_successor_is_an_error() {
    let disk = SimulatedDisk::new(7);
    let (_, mut log) = reopen(&disk, small(), Lsn(0)).unwrap();
    let ends = append_synced(&mut log, "s", 60);
    let (seg, off) = locate(&log, ends[0]);
    assert!(log.segments().len() > 2);
    drop(log);
    disk.corrupt(&seg, off + 40, |b| *b ^= 4);
    match reopen(&disk, small(), Lsn(0)).err() {
        Some(LogError::Corrupt { segment, offset, .. }) => assert_eq!((segment, offset), (seg, off)),
        other => panic!("expected corruption, got {:?}", other.map(|e| e.to_string())),
    }
}

#[test]
fn a_missing_segment_is_an_error() {
    let disk = SimulatedDisk::new(8);
    let (_, mut log) = reopen(&disk, small(), Lsn(0)).unwrap();
    append_synced(&mut log, "s", 60);
    let first = segment_name(log.segments()[0]);
    drop(log);
    let dir = disk.dir();
    dir.remove(&first).unwrap();
    let err = reopen(&disk, small(), Lsn(0)).err().expect("an error");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn a_group_larger_than_a_segment_gets_a_segment_of_its_own() {
    let disk = SimulatedDisk::new(9);
    let (_, mut log) = reopen(&disk, small(), Lsn(0)).unwrap();
    append_synced(&mut log, "a", 3);
    let big: Vec<OwnedChange> = (0..3)
        .map(|i| {
            let mut c = chat(&format!("big{i}"), 50 + i, vec![]);
            if let OwnedChange::Chat { payload, .. } = &mut c {
                payload.resize(5000, b'x');
            }
            c
        })
        .collect();
    log.append(&mut group(&big)).unwrap();
    log.sync().unwrap();
    append_synced(&mut log, "b", 3);
    drop(log);
    let (groups, _) = reopen(&disk, small(), Lsn(0)).unwrap();
    assert_eq!(
        tags(&groups),
        ["a0", "a1", "a2", "big0", "big1", "big2", "b0", "b1", "b2"]
    );
}

#[test]
fn a_failed_sync_refuses_appends_until_reopened() {
    let disk = SimulatedDisk::new(10);
    let (_, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    append_synced(&mut log, "a", 2);
    let health = log.health();
    disk.fail_syncs(1);
    log.append(&mut group(&[chat("lost?", 9, vec![])])).unwrap();
    assert!(matches!(log.sync(), Err(LogError::Io { op: "fdatasync", .. })));
    // Never retried as if it had worked: the next sync would succeed on
    // this disk, and must not be attempted.
    assert!(matches!(log.sync(), Err(LogError::Failed { .. })));
    assert!(matches!(
        log.append(&mut group(&[chat("x", 10, vec![])])),
        Err(LogError::Failed { .. })
    ));
    let err = health.check().expect_err("health shows the failure");
    assert!(
        crate::store::StoreError::from(err).chain().contains("fdatasync"),
        "the cause is kept"
    );
    drop(log);
    let (groups, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert!(log.health().check().is_ok(), "a reopened log is healthy");
    assert_eq!(tags(&groups)[..2], ["a0", "a1"]);
    append_synced(&mut log, "b", 1);
}

#[test]
fn a_failed_write_refuses_appends_until_reopened() {
    let disk = SimulatedDisk::new(11);
    let (_, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    append_synced(&mut log, "a", 2);
    disk.fail_writes(1);
    assert!(matches!(
        log.append(&mut group(&[chat("x", 9, vec![])])),
        Err(LogError::Io { op: "write", .. })
    ));
    assert!(log.health().check().is_err());
    assert!(matches!(log.sync(), Err(LogError::Failed { .. })));
    drop(log);
    let (groups, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert_eq!(tags(&groups), ["a0", "a1"], "the partial write is a torn tail");
    append_synced(&mut log, "b", 1);
}

#[test]
fn a_full_disk_refuses_only_the_append_that_needs_a_new_segment() {
    let disk = SimulatedDisk::new(12);
    let (_, mut log) = reopen(&disk, small(), Lsn(0)).unwrap();
    let mut appended = 0;
    disk.set_full(true);
    let refused = loop {
        match log.append(&mut group(&[chat(&format!("a{appended}"), appended + 1, vec![])])) {
            Ok(_) => {
                log.sync().unwrap();
                appended += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, LogError::NoSegment { .. }), "{refused}");
    assert!(
        appended > 0,
        "the preallocated segment takes appends on a full disk"
    );
    assert!(
        log.health().check().is_ok(),
        "a refused roll-over does not fail the log"
    );
    disk.set_full(false);
    append_synced(&mut log, "b", 2);
    drop(log);
    let (groups, _) = reopen(&disk, small(), Lsn(0)).unwrap();
    let mut want = expected("a", appended);
    want.extend(expected("b", 2));
    assert_eq!(tags(&groups), want);
}

#[test]
fn a_cut_right_after_roll_over_keeps_everything_synced() {
    let disk = SimulatedDisk::new(13);
    let (_, mut log) = reopen(&disk, small(), Lsn(0)).unwrap();
    let mut n = 0;
    while log.segments().len() < 3 {
        append_synced(&mut log, &format!("x{n}-"), 1);
        n += 1;
    }
    // The last append opened a segment; leave one unsynced group there.
    log.append(&mut group(&[chat("unsynced", 99, vec![])])).unwrap();
    disk.cut();
    let (groups, _) = reopen(&disk, small(), Lsn(0)).unwrap();
    let got = tags(&groups);
    let want: Vec<String> = (0..n).map(|i| format!("x{i}-0")).collect();
    assert_eq!(&got[..n], &want[..]);
    assert!(got.len() <= n + 1);
}

/// Two groups appended before one sync, the disk keeping the second but
/// not the first (sectors written out of order): no completed sync covered
/// the bad spot, so it is a torn tail, not corruption, and the surviving
/// second group is dropped and zeroed with it.
#[test]
fn a_later_group_of_the_same_sync_does_not_make_a_tear_corruption() {
    let disk = SimulatedDisk::new(14);
    let (_, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    let ends = append_synced(&mut log, "a", 2);
    log.append(&mut group(&[chat("b0", 10, vec![]), chat("b1", 11, vec![])]))
        .unwrap();
    let c_end = log.append(&mut group(&[chat("c0", 12, vec![])])).unwrap();
    log.sync().unwrap();
    let (seg, off) = locate(&log, ends[1]);
    drop(log);
    disk.corrupt(&seg, off + 20, |b| *b = !*b);
    let (groups, mut log) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert_eq!(tags(&groups), ["a0", "a1"]);
    let bytes = disk.contents(&seg).unwrap();
    let (from, to) = (off as usize, (c_end.0 - ends[1].0 + off) as usize);
    assert!(
        bytes[from..to].iter().all(|&b| b == 0),
        "both groups' remains zeroed"
    );
    append_synced(&mut log, "d", 1);
    drop(log);
    let (groups, _) = reopen(&disk, LogConfig::default(), Lsn(0)).unwrap();
    assert_eq!(tags(&groups), ["a0", "a1", "d0"]);
}
