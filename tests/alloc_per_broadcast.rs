//! Heap allocations per broadcast do not grow with the number of receivers.
//!
//! The hub's promise (`src/hub.rs`): publishing clones one shared `Bytes`
//! into each receiver's outbox, with no encoding and no allocation per
//! receiver. This binary installs a counting global allocator and checks it
//! with 1 and with 1,000 receivers in one conversation: the allocations of
//! one `publish_conversation`, and of every receiver draining what it got,
//! are the same for both (and zero once the queues are warm). Encoding an
//! event, done once per broadcast, is a small constant.
//!
//! Only allocations made on the measuring thread, while its flag is on, are
//! counted, so the test harness's other threads do not disturb the counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parley::hub::{Hub, Outbox, Topic};
use parley::ids::ConversationId;
use parley::protocol::{self, ChatEvent, MessageView, Micros};
use parley::wire::{self as frame, OpCode};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note_allocation() {
    // `try_with`: never panic inside the allocator, even during thread exit.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc_zeroed(layout) }
    }

    /// A reallocation is counted: it is a trip to the allocator that a
    /// steady-state broadcast should not need.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations (alloc, alloc_zeroed, realloc) that `f` makes on this thread.
fn allocations_during<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let r = std::hint::black_box(f());
    COUNTING.with(|c| c.set(false));
    (ALLOCATIONS.load(Ordering::Relaxed) - before, r)
}

const CONVERSATION: ConversationId = ConversationId(1);
const LIMIT: usize = 4 << 20;

/// Encodes one `message.created` event as the sequencer does: the JSON into
/// a reused scratch `Vec`, then framed into a `BytesMut`.
fn encode_event(scratch: &mut Vec<u8>, out: &mut BytesMut, id: u64) {
    scratch.clear();
    protocol::encode_chat_event(
        scratch,
        &ChatEvent::Created(MessageView {
            id,
            sender: "alice",
            content: "hi everyone \u{1F600}, \"quoted\" and a\nnewline",
            timestamp: Micros(1_767_225_600_123_456),
            edited: None,
        }),
    );
    frame::put_frame(out, OpCode::Text, scratch);
}

/// A pre-encoded frame, as a fresh `BytesMut::freeze` hands it to the hub.
fn fresh_frame(id: u64) -> Bytes {
    let mut scratch = Vec::with_capacity(256);
    let mut out = BytesMut::new();
    encode_event(&mut scratch, &mut out, id);
    out.freeze()
}

/// One conversation with `receivers` sockets, warmed up: several broadcasts
/// published and drained, so every queue and map is at its steady state.
fn warm_room(receivers: usize) -> (Arc<Hub>, Vec<Arc<Outbox>>) {
    let hub = Arc::new(Hub::new());
    let outboxes: Vec<_> = (0..receivers)
        .map(|i| Outbox::new(Arc::from(format!("user{i}")), LIMIT))
        .collect();
    for o in &outboxes {
        // Joined for the whole run: the membership is never dropped.
        std::mem::forget(hub.subscribe(Topic::Chat(CONVERSATION), o));
    }
    for id in 0..8 {
        assert_eq!(
            hub.publish_conversation(CONVERSATION, &fresh_frame(id)),
            receivers
        );
        drain_all(&outboxes);
    }
    (hub, outboxes)
}

/// Every receiver takes what was queued for it, as its socket task does
/// before writing; returns how many frames they took in all.
fn drain_all(outboxes: &[Arc<Outbox>]) -> usize {
    let mut frames = 0;
    for o in outboxes {
        let drained = o.drain();
        frames += drained.frames.len();
        drop(drained);
        assert!(o.release(), "nothing was queued meanwhile");
    }
    frames
}

/// Allocations of one broadcast to a warm room of `receivers`:
/// (publish, all receivers draining).
fn broadcast_allocations(receivers: usize, frame: &Bytes) -> (usize, usize) {
    let (hub, outboxes) = warm_room(receivers);
    let (publish, delivered) = allocations_during(|| hub.publish_conversation(CONVERSATION, frame));
    assert_eq!(delivered, receivers);
    let (drain, taken) = allocations_during(|| drain_all(&outboxes));
    assert_eq!(taken, receivers, "each receiver got the frame exactly once");
    (publish, drain)
}

#[test]
fn allocations_per_broadcast_do_not_grow_with_receivers() {
    // The frame every receiver shares, encoded once and already shared (as
    // it is from the second receiver on).
    let frame = fresh_frame(42);
    drop(frame.clone());

    // Steady state: the fewest of a few broadcasts, so a one-off lazy
    // initialisation somewhere in std on this thread does not count.
    let steady = |receivers| {
        (0..3)
            .map(|_| broadcast_allocations(receivers, &frame))
            .min()
            .expect("three runs")
    };
    let (publish_1, drain_1) = steady(1);
    let (publish_1000, drain_1000) = steady(1000);
    println!(
        "allocations per broadcast: publish to 1 receiver = {publish_1}, to 1000 = {publish_1000}; \
         draining by 1 receiver = {drain_1}, by 1000 = {drain_1000}"
    );

    assert_eq!(
        publish_1, publish_1000,
        "allocations per broadcast do not grow with receivers: publishing to 1 receiver made \
         {publish_1} allocations, to 1,000 receivers {publish_1000}"
    );
    assert_eq!(
        publish_1000, 0,
        "a broadcast of a pre-encoded frame to a warm room allocates nothing (made {publish_1000})"
    );
    assert_eq!(
        (drain_1, drain_1000),
        (0, 0),
        "receivers taking a broadcast from their outboxes allocate nothing \
         (1 receiver: {drain_1}, 1,000 receivers: {drain_1000})"
    );
}

#[test]
fn allocations_per_broadcast_of_a_freshly_framed_event_do_not_grow_with_receivers() {
    // Straight from `BytesMut::freeze`, as the sequencer publishes each
    // group: the first clone turns the frame into a shared one (one small
    // allocation, once per broadcast), and no receiver adds any.
    let (publish_1, drain_1) = broadcast_allocations(1, &fresh_frame(42));
    let (publish_1000, drain_1000) = broadcast_allocations(1000, &fresh_frame(42));
    println!(
        "allocations per broadcast of a fresh frame: publish to 1 receiver = {publish_1}, to 1000 = \
         {publish_1000}; draining by 1 receiver = {drain_1}, by 1000 = {drain_1000}"
    );

    assert_eq!(
        publish_1, publish_1000,
        "allocations per broadcast do not grow with receivers: publishing a fresh frame to 1 \
         receiver made {publish_1} allocations, to 1,000 receivers {publish_1000}"
    );
    assert!(
        publish_1000 <= 1,
        "a fresh frame costs at most one allocation per broadcast, to share it (made {publish_1000})"
    );
    assert_eq!(
        (drain_1, drain_1000),
        (0, 0),
        "receivers taking a broadcast from their outboxes allocate nothing \
         (1 receiver: {drain_1}, 1,000 receivers: {drain_1000})"
    );
}

#[test]
fn encoding_one_event_costs_a_small_constant_number_of_allocations() {
    let mut scratch = Vec::with_capacity(256);
    // Warm: the scratch `Vec` has grown to its steady-state capacity.
    let mut out = BytesMut::new();
    encode_event(&mut scratch, &mut out, 1);

    let mut counts = Vec::new();
    for id in 2..10 {
        // A new `BytesMut` per broadcast, as the sequencer starts one per
        // conversation per group.
        let (n, out) = allocations_during(|| {
            let mut out = BytesMut::new();
            encode_event(&mut scratch, &mut out, id);
            out
        });
        assert!(out.len() > 2);
        counts.push(n);
    }
    println!("allocations to encode and frame one event: {counts:?}");

    assert!(
        counts.iter().all(|&n| n == counts[0]),
        "encoding an event costs the same allocations every time: {counts:?}"
    );
    assert!(
        counts[0] <= 1,
        "encoding an event into a reused Vec and framing it costs a small constant number of \
         allocations (at most the frame buffer itself), made {}",
        counts[0]
    );
}
