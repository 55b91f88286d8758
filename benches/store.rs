//! The store under group commit: `SledStore` on a real directory (a
//! tempdir; set `TMPDIR` to bench another disk).
//!
//! - `group_commit/N`: `commit` of N chat changes (a new message, its event
//!   log entry, the counters; one atomic batch each) then one `sync()`, the
//!   flush that makes the whole group durable, as the sequencer does per
//!   group in `--durability sync`. Throughput is in messages: the flush is
//!   shared, so the per-message cost falls as the group grows.
//! - `history`: one page of 50 (the REST default) from a conversation of
//!   1,000 messages: the newest page, and one from the middle (`before`).
//!
//! Only `commit` + `sync` (or `history`) are timed; building the messages
//! and their event JSON is not. `cargo bench --bench store`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::protocol::{self, ChatEvent, MessageView, Micros};
use parley::store::{Change, Counters, EventKind, Message, SledStore, Store};

const SENDERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const TEXT: &str = "hi everyone, the release notes are in the doc";

/// The next new message of `conversation`, with its event JSON, as the
/// sequencer builds them; `counters` advance as the sequencer's do.
fn next_message(counters: &mut Counters, conversation: u64) -> (Message, Vec<u8>) {
    counters.message += 1;
    counters.event += 1;
    let m = Message {
        id: counters.message,
        conversation,
        sender: SENDERS[(counters.message % 4) as usize].to_string(),
        content: TEXT.to_string(),
        timestamp: Micros(1_767_225_600_000_000 + counters.message),
        edited: false,
        deleted: false,
        seq: counters.event,
    };
    let mut json = Vec::with_capacity(256);
    protocol::encode_chat_event(
        &mut json,
        &ChatEvent::Created(MessageView {
            id: m.id,
            sender: &m.sender,
            content: &m.content,
            timestamp: m.timestamp,
            edited: None,
        }),
    );
    (m, json)
}

fn commit(store: &SledStore, m: &Message, json: &[u8], counters: &Counters) {
    let change = Change::Chat {
        message: m,
        kind: EventKind::Created,
        seq: m.seq,
        payload: json,
        notifications: &[],
    };
    store.commit(change, counters).expect("commit");
}

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), None).expect("open the store");
    let mut counters = Counters::default();
    let mut g = c.benchmark_group("group_commit");
    for n in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let mut group = Vec::with_capacity(n);
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    group.clear();
                    for _ in 0..n {
                        let (m, json) = next_message(&mut counters, 1);
                        group.push((m, json, counters));
                    }
                    let t = Instant::now();
                    for (m, json, counters) in &group {
                        commit(&store, m, json, counters);
                    }
                    store.sync().expect("sync");
                    timed += t.elapsed();
                }
                timed
            })
        });
    }
    g.finish();
}

fn history(c: &mut Criterion) {
    const CONVERSATION: u64 = 7;
    const MESSAGES: u64 = 1000;
    const PAGE: usize = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), None).expect("open the store");
    let mut counters = Counters::default();
    for _ in 0..MESSAGES {
        let (m, json) = next_message(&mut counters, CONVERSATION);
        commit(&store, &m, &json, &counters);
    }
    store.sync().expect("sync");

    let mut g = c.benchmark_group("history");
    g.throughput(Throughput::Elements(PAGE as u64));
    for (name, before) in [("newest", None), ("before=500", Some(500))] {
        let page = store.history(CONVERSATION, before, PAGE).expect("history");
        assert_eq!(page.items.len(), PAGE);
        g.bench_with_input(BenchmarkId::new("page50", name), &before, |b, &before| {
            b.iter(|| {
                let page = store
                    .history(CONVERSATION, black_box(before), PAGE)
                    .expect("history");
                black_box(page.next)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(15);
    targets = group_commit, history
}
criterion_main!(benches);
