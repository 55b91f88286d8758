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
//! Two kinds of receiver: idle ones (their writer took everything before the
//! publish) and busy ones (their writer is still writing and two or more
//! groups already wait in the queue, as for a socket whose kernel buffer is
//! full). The busy case is what spills a queue to the heap; the outbox and
//! its writer swap two lists so it does not allocate per publish either.
//! Every figure is the maximum over several runs: one allocating run is a
//! failure.
//!
//! Only allocations made on the measuring thread, while its flag is on, are
//! counted, so the test harness's other threads do not disturb the counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parley::hub::{Hub, Outbox, Topic};
use parley::ids::ConversationId;
use parley::outbox::Frames;
use parley::protocol::{self, ChatEvent, MessageView, Micros};
use parley::wire::{self as frame, OpCode};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Per thread: the harness runs this file's tests in parallel, and one
    /// test's allocations must not be counted in another's window.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation() {
    // `try_with`: never panic inside the allocator, even during thread exit.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
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
    let before = ALLOCATIONS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    let r = std::hint::black_box(f());
    COUNTING.with(|c| c.set(false));
    (ALLOCATIONS.with(Cell::get) - before, r)
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
        let drained = o.drain(Frames::new());
        frames += drained.frames.len();
        drop(drained);
        assert!(o.release(), "nothing was queued meanwhile");
    }
    frames
}

/// A busy receiver's writer, as `ws::Conn` drives it: it holds what it
/// drained (still being written), hands its emptied list back on the next
/// drain, and releases only when the queue is empty.
struct BusyWriter {
    outbox: Arc<Outbox>,
    sending: Frames,
}

impl BusyWriter {
    /// Takes the queue (the writer is now busy writing it).
    fn take(&mut self) -> usize {
        let drained = self.outbox.drain(std::mem::take(&mut self.sending));
        self.sending = drained.frames;
        self.sending.len()
    }

    /// Writes what it holds (all of it, here), then takes what was queued
    /// meanwhile, staying busy; answers how many frames it took.
    fn finish_and_take(&mut self) -> usize {
        self.sending.clear();
        assert!(
            !self.outbox.release(),
            "frames were queued while the writer was busy"
        );
        self.take()
    }
}

/// A room of `receivers` busy sockets: each writer holds frames and
/// [`QUEUED_GROUPS`] groups wait queued behind them. Warmed over several
/// write cycles of the same backlog (the queued groups plus the measured
/// one), as a socket stays behind by a few groups while its peer reads
/// slowly: a list grows to a busy socket's largest backlog once (one
/// allocation per doubling) and is reused from then on.
fn busy_room(receivers: usize) -> (Arc<Hub>, Vec<BusyWriter>) {
    let hub = Arc::new(Hub::new());
    let mut writers: Vec<BusyWriter> = (0..receivers)
        .map(|i| BusyWriter {
            outbox: Outbox::new(Arc::from(format!("user{i}")), LIMIT),
            sending: Frames::new(),
        })
        .collect();
    for w in &writers {
        // Joined for the whole run: the membership is never dropped.
        std::mem::forget(hub.subscribe(Topic::Chat(CONVERSATION), &w.outbox));
    }
    hub.publish_conversation(CONVERSATION, &fresh_frame(0));
    for w in &mut writers {
        assert_eq!(w.take(), 1);
    }
    for id in 1..8 {
        for _ in 0..QUEUED_GROUPS + 1 {
            hub.publish_conversation(CONVERSATION, &fresh_frame(id));
        }
        for w in &mut writers {
            assert_eq!(w.finish_and_take(), QUEUED_GROUPS + 1);
        }
    }
    // Two groups queued behind what each writer holds.
    for _ in 0..QUEUED_GROUPS {
        hub.publish_conversation(CONVERSATION, &fresh_frame(9));
    }
    (hub, writers)
}

/// Groups queued behind a busy writer: two or more spill the inline slot.
const QUEUED_GROUPS: usize = 2;

/// Allocations of one broadcast to a room of `receivers` busy sockets that
/// already have [`QUEUED_GROUPS`] waiting: (publish, every writer finishing
/// and taking the next batch).
fn busy_broadcast_allocations(receivers: usize, frame: &Bytes) -> (usize, usize) {
    let (hub, mut writers) = busy_room(receivers);
    let (publish, delivered) = allocations_during(|| hub.publish_conversation(CONVERSATION, frame));
    assert_eq!(delivered, receivers);
    let (drain, taken) =
        allocations_during(|| writers.iter_mut().map(BusyWriter::finish_and_take).sum::<usize>());
    assert_eq!(
        taken,
        receivers * (QUEUED_GROUPS + 1),
        "each receiver got every frame once"
    );
    (publish, drain)
}

/// The most allocations of `runs` runs of `f`, per figure: one allocating
/// run is enough to fail.
fn worst_of(runs: usize, f: impl Fn() -> (usize, usize)) -> (usize, usize) {
    (0..runs)
        .map(|_| f())
        .fold((0, 0), |(a, b), (p, d)| (a.max(p), b.max(d)))
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

    // One untimed run first, so a one-off lazy initialisation somewhere in
    // std on this thread does not count; then the worst of several.
    broadcast_allocations(1, &frame);
    let (publish_1, drain_1) = worst_of(5, || broadcast_allocations(1, &frame));
    let (publish_1000, drain_1000) = worst_of(5, || broadcast_allocations(1000, &frame));
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
fn allocations_per_broadcast_to_busy_receivers_do_not_grow_with_receivers() {
    let frame = fresh_frame(42);
    drop(frame.clone());
    busy_broadcast_allocations(1, &frame);
    let (publish_1, drain_1) = worst_of(5, || busy_broadcast_allocations(1, &frame));
    let (publish_1000, drain_1000) = worst_of(5, || busy_broadcast_allocations(1000, &frame));
    println!(
        "allocations per broadcast to busy receivers ({QUEUED_GROUPS} groups queued): publish to 1 \
         receiver = {publish_1}, to 1000 = {publish_1000}; writers taking it: 1 = {drain_1}, \
         1000 = {drain_1000}"
    );
    assert_eq!(
        (publish_1, publish_1000),
        (0, 0),
        "publishing to receivers whose writers are busy, with {QUEUED_GROUPS} groups already \
         queued, allocates nothing per receiver (1 receiver: {publish_1}, 1,000: {publish_1000})"
    );
    assert_eq!(
        (drain_1, drain_1000),
        (0, 0),
        "busy writers taking their next batch allocate nothing (1: {drain_1}, 1,000: {drain_1000})"
    );
}

#[test]
fn allocations_per_broadcast_of_a_freshly_framed_event_do_not_grow_with_receivers() {
    // Straight from `BytesMut::freeze`, as the sequencer publishes each
    // group: the first clone turns the frame into a shared one (one small
    // allocation, once per broadcast), and no receiver adds any.
    broadcast_allocations(1, &fresh_frame(41));
    let (publish_1, drain_1) = worst_of(5, || broadcast_allocations(1, &fresh_frame(42)));
    let (publish_1000, drain_1000) = worst_of(5, || broadcast_allocations(1000, &fresh_frame(42)));
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
