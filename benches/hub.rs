//! Fan-out: `Hub::publish_conversation` of one shared, already-framed
//! `Bytes` to every socket of a conversation. Throughput is in deliveries
//! (receivers reached), so the per-receiver cost reads directly.
//!
//! Two views per room size:
//! - `publish`: only the publish call is timed; the receivers' queues are
//!   drained outside the timed region (the timer's own cost, two
//!   `Instant::now` per iteration, is in the 1-receiver figure).
//! - `publish+drain`: one broadcast and every receiver taking it from its
//!   outbox (`drain` + `release`, what each socket task does before writing).
//!
//! `cargo bench --bench hub`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::hub::{Hub, Outbox, Topic};
use parley::ids::ConversationId;
use parley::protocol::{self, ChatEvent, MessageView, Micros};
use parley::wire::{self as frame, OpCode};

const CONVERSATION: ConversationId = ConversationId(1);
/// The server's default `--max-outbound-bytes`.
const LIMIT: usize = 4 << 20;

/// One `message.created` frame, as the sequencer publishes it.
fn frame() -> Bytes {
    let mut json = Vec::new();
    protocol::encode_chat_event(
        &mut json,
        &ChatEvent::Created(MessageView {
            id: 123_456,
            sender: "alice",
            content: "hi everyone, the release is out",
            timestamp: Micros(1_767_225_600_123_456),
            edited: None,
        }),
    );
    let mut b = BytesMut::new();
    frame::put_frame(&mut b, OpCode::Text, &json);
    b.freeze()
}

fn room(n: usize) -> (Arc<Hub>, Vec<Arc<Outbox>>) {
    let hub = Arc::new(Hub::new());
    let outboxes: Vec<_> = (0..n)
        .map(|i| Outbox::new(Arc::from(format!("user{i}")), LIMIT))
        .collect();
    for o in &outboxes {
        // Joined for the whole run: the membership is never dropped.
        std::mem::forget(hub.subscribe(Topic::Chat(CONVERSATION), o));
    }
    (hub, outboxes)
}

fn drain_all(outboxes: &[Arc<Outbox>]) {
    for o in outboxes {
        let d = o.drain(Default::default());
        black_box(&d.frames);
        o.release();
    }
}

fn publish(c: &mut Criterion) {
    let bytes = frame();
    let mut g = c.benchmark_group("publish_conversation");
    for n in [1usize, 100, 10_000] {
        let (hub, outboxes) = room(n);
        assert_eq!(hub.publish_conversation(CONVERSATION, &bytes), n);
        drain_all(&outboxes);
        g.throughput(Throughput::Elements(n as u64));

        g.bench_with_input(BenchmarkId::new("publish", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    black_box(hub.publish_conversation(CONVERSATION, black_box(&bytes)));
                    timed += t.elapsed();
                    drain_all(&outboxes);
                }
                timed
            })
        });

        g.bench_with_input(BenchmarkId::new("publish+drain", n), &n, |b, _| {
            b.iter(|| {
                black_box(hub.publish_conversation(CONVERSATION, black_box(&bytes)));
                drain_all(&outboxes);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    targets = publish
}
criterion_main!(benches);
