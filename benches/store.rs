//! The store under group commit: `SledStore` on a real directory (a
//! tempdir; set `TMPDIR` to bench another disk).
//!
//! - `group_commit/N`: a store `Group` of N chat changes (ids from the
//!   group, a new message, its event log entry, the counters; one atomic
//!   batch each) then its `commit()`, the one flush that makes the whole
//!   group durable, as the sequencer does per group in `--durability sync`.
//!   Throughput is in messages: the flush is shared, so the per-message cost
//!   falls as the group grows.
//! - `history`: one page of 50 (the REST default) from a conversation of
//!   1,000 messages: the newest page, and one from the middle (`before`).
//!
//! Building each message and its event JSON is timed too (a few hundred
//! nanoseconds, against a flush of a fraction of a millisecond).
//! `cargo bench --bench store`

use std::hint::black_box;
use std::time::Duration;

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::ids::{ConversationId, MessageId, Seq};
use parley::store::{Change, EventKind, Group, Message, SledStore, Store};
use pollster::block_on;

/// A new message of `conversation` with its event JSON, as the sequencer
/// builds them (ids from the backend's group).
fn next_message(g: &mut dyn Group, conversation: ConversationId) -> (Message, Vec<u8>) {
    let id: MessageId = g.next_message().expect("id");
    let seq: Seq = g.next_seq(conversation).expect("seq");
    common::chat_message(id, conversation, seq)
}

fn apply(g: &mut dyn Group, m: &Message, json: &[u8]) {
    let change = Change::Chat {
        message: m,
        kind: EventKind::Created,
        seq: m.seq,
        payload: json,
        notifications: &[],
    };
    g.apply(change).expect("apply");
}

/// A group of `n` new messages: begin, apply each, commit (one flush).
fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), None).expect("open the store");
    let mut g = c.benchmark_group("group_commit");
    for n in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let mut group = store.begin().expect("begin");
                for _ in 0..n {
                    let (m, json) = next_message(&mut *group, ConversationId(1));
                    apply(&mut *group, &m, &json);
                }
                group.commit().expect("commit");
            })
        });
    }
    g.finish();
}

fn history(c: &mut Criterion) {
    const CONVERSATION: ConversationId = ConversationId(7);
    const MESSAGES: u64 = 1000;
    const PAGE: usize = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), None).expect("open the store");
    let mut group = store.begin().expect("begin");
    for _ in 0..MESSAGES {
        let (m, json) = next_message(&mut *group, CONVERSATION);
        apply(&mut *group, &m, &json);
    }
    group.commit().expect("commit");

    let mut g = c.benchmark_group("history");
    g.throughput(Throughput::Elements(PAGE as u64));
    for (name, before) in [("newest", None), ("before=500", Some(MessageId(500)))] {
        let page = block_on(store.history(CONVERSATION, before, PAGE)).expect("history");
        assert_eq!(page.items.len(), PAGE);
        g.bench_with_input(BenchmarkId::new("page50", name), &before, |b, &before| {
            b.iter(|| {
                let page = block_on(store.history(CONVERSATION, black_box(before), PAGE)).expect("history");
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
