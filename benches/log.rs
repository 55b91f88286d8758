//! The commit log on a real directory (a tempdir; set `TMPDIR` to bench
//! another disk), default segment size (64 MiB, preallocated).
//!
//! - `append_sync/N`: a group of N typical chat records (a new message of
//!   45 characters, its ~150-byte event JSON, no notifications) encoded
//!   into the reused group buffer, appended with one `pwrite` and made
//!   durable with one `fdatasync`: the whole commit of one group, as the
//!   log thread will do it. Throughput is in messages. The log is
//!   checkpointed at its tail every iteration, so segments are recycled as
//!   in steady state (roll-overs are included as they come).
//! - `encode/N`: the encoding alone (what the sequencer does per group).
//! - `replay/100000`: opening a log of 100,000 such messages (groups of
//!   16) and decoding every group, as a start after a crash does when the
//!   last 100,000 messages were not checkpointed.
//!
//! `cargo bench --bench log`

use std::hint::black_box;
use std::time::Duration;

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::ids::{ConversationId, MessageId, Seq};
use parley::store::log::{FsDir, GroupBuf, Log, LogConfig, Lsn};
use parley::store::{Change, EventKind, Message};

/// Message `i` and its event JSON, as the sequencer builds them.
fn message(i: u64) -> (Message, Vec<u8>) {
    common::chat_message(MessageId(i), ConversationId(1 + i % 1000), Seq(i))
}

fn encode(buf: &mut GroupBuf, batch: &[(Message, Vec<u8>)]) {
    buf.clear();
    for (m, json) in batch {
        buf.push(&Change::Chat {
            message: m,
            kind: EventKind::Created,
            seq: m.seq,
            payload: json,
            notifications: &[],
        });
    }
}

fn append_sync(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FsDir::open(&dir.path().join("log")).expect("log dir");
    let mut log = Log::open(Box::new(fs), LogConfig::default(), Lsn(0))
        .and_then(|r| r.finish())
        .expect("open the log");
    let mut buf = GroupBuf::with_capacity(1 << 20);
    let mut g = c.benchmark_group("append_sync");
    for n in [1u64, 16, 256] {
        let batch: Vec<_> = (0..n).map(message).collect();
        encode(&mut buf, &batch);
        eprintln!("group of {n}: {} bytes in the log", buf.encoded_len());
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                encode(&mut buf, &batch);
                log.append(&mut buf).expect("append");
                let durable = log.sync().expect("sync");
                log.checkpoint(durable).expect("checkpoint");
            })
        });
    }
    g.finish();
}

fn encode_only(c: &mut Criterion) {
    let mut buf = GroupBuf::with_capacity(1 << 20);
    let mut g = c.benchmark_group("encode");
    for n in [1u64, 16, 256] {
        let batch: Vec<_> = (0..n).map(message).collect();
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                encode(&mut buf, black_box(&batch));
                black_box(buf.encoded_len())
            })
        });
    }
    g.finish();
}

fn replay(c: &mut Criterion) {
    const MESSAGES: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    let mut log = Log::open(
        Box::new(FsDir::open(&path).expect("dir")),
        LogConfig::default(),
        Lsn(0),
    )
    .and_then(|r| r.finish())
    .expect("open the log");
    let mut buf = GroupBuf::with_capacity(1 << 20);
    for first in (0..MESSAGES).step_by(16) {
        let batch: Vec<_> = (first..first + 16).map(message).collect();
        encode(&mut buf, &batch);
        log.append(&mut buf).expect("append");
    }
    log.sync().expect("sync");
    eprintln!("{MESSAGES} messages: {} bytes of log", log.tail());
    drop(log);
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(MESSAGES));
    g.sample_size(10);
    g.bench_function(BenchmarkId::from_parameter(MESSAGES), |b| {
        b.iter(|| {
            let fs = FsDir::open(&path).expect("dir");
            let mut r = Log::open(Box::new(fs), LogConfig::default(), Lsn(0)).expect("open");
            let mut n = 0;
            while let Some(group) = r.next_group().expect("replay") {
                n += group.changes.len();
            }
            assert_eq!(n as u64, MESSAGES);
            r.finish().expect("finish")
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = append_sync, encode_only, replay
}
criterion_main!(benches);
