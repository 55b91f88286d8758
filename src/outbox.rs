//! A socket's outbound queue: the one ordered path to its writer, and the
//! protocol by which a publisher may write to an idle socket directly.
//!
//! Broadcasts, error frames, pongs and the close all go through an
//! [`Outbox`], so they never interleave and nothing follows the close. A
//! publisher that finds the socket's writer idle and nothing queued writes
//! the shared bytes straight to the descriptor (`send_now`), under the
//! outbox lock, and wakes nobody; the socket task clears the descriptor
//! under the same lock (`detach`) before it closes it. This file is the only
//! place that writes to a socket descriptor outside the socket's own task.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;

use crate::wire::{self, Closing, OpCode};

pub const SLOW_CONSUMER: Closing = Closing {
    code: wire::close::TRY_AGAIN_LATER,
    reason: "slow consumer: outbound queue full; reconnect with ?after= to resume",
};

/// The one ordered path to a socket's writer. Broadcasts, error frames,
/// pongs and the close all go through it, so frames never interleave.
pub struct Outbox {
    state: Mutex<Queue>,
    /// The socket task, woken when something is queued.
    waker: AtomicWaker,
    /// The socket's user: whether they are watching a conversation decides
    /// who gets a notification for a chat message.
    pub user: Arc<str>,
    /// `--max-outbound-bytes` (a u32 keeps the struct at 144 bytes with `id`).
    limit: u32,
    /// Names the socket in the logs (`conn`): a field, not a tracing span,
    /// since a span per socket would cost memory. Wraps after 2^32 sockets.
    pub id: u32,
    /// When the peer last sent anything, in [`coarse_now`] tenths; the
    /// reaper pings sockets quiet for too long and closes those that stay so.
    last_heard: AtomicU32,
    /// A ping went out in the current quiet spell.
    pinged: AtomicBool,
}

/// The next socket's log id.
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// Tenths of a second since the process started: a clock cheap enough to
/// read on every inbound burst and small enough to keep per socket (it
/// wraps after 13 years).
pub fn coarse_now() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    (START.get_or_init(Instant::now).elapsed().as_millis() / 100) as u32
}

/// A duration in [`coarse_now`] units.
pub fn tenths(d: std::time::Duration) -> u32 {
    (d.as_millis() / 100).clamp(1, u32::MAX as u128) as u32
}

/// Frames queued for, or being written to, one socket. Usually one shared
/// batch at a time, kept inline; a busy socket's list spills to the heap,
/// and then the queue and its writer swap two lists back and forth (see
/// [`Outbox::drain`]) so a steady stream to a busy socket allocates nothing.
pub type Frames = SmallVec<[Bytes; 1]>;

struct Queue {
    frames: Frames,
    bytes: usize,
    closing: Option<Closing>,
    /// The socket task holds frames it is writing: others must queue.
    busy: bool,
    /// The socket's descriptor is closed or closing.
    gone: bool,
    /// The socket, for writing without waking its task; -1 until attached.
    fd: RawFd,
}

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            frames: SmallVec::new(),
            bytes: 0,
            closing: None,
            busy: false,
            gone: false,
            fd: -1,
        }
    }
}

/// What a socket task takes from its outbox in one go.
pub struct Drained {
    pub frames: Frames,
    pub closing: Option<Closing>,
}

impl Outbox {
    /// An outbox that queues until a socket is [attached](Outbox::attach).
    pub fn new(user: Arc<str>, limit: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(Queue::default()),
            waker: AtomicWaker::new(),
            user,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            last_heard: AtomicU32::new(coarse_now()),
            pinged: AtomicBool::new(false),
        })
    }

    /// The peer sent something: it is alive.
    pub fn heard(&self) {
        self.last_heard.store(coarse_now(), Ordering::Relaxed);
        self.pinged.store(false, Ordering::Relaxed);
    }

    /// Marks this quiet spell as pinged; true the first time only.
    pub fn first_ping(&self) -> bool {
        !self.pinged.swap(true, Ordering::Relaxed)
    }

    /// Tenths of a second since the peer last sent anything.
    pub fn quiet_for(&self) -> u32 {
        coarse_now().saturating_sub(self.last_heard.load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue half-updated
        // in a way that matters (it is a list of whole frames), so poisoning
        // is ignored rather than spreading the panic to every publisher.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues already-framed bytes. Beyond the limit the socket is marked
    /// for closing as a slow consumer and its queue is dropped, so one stuck
    /// reader never holds memory for more than `limit` bytes.
    pub fn push(&self, bytes: Bytes) {
        self.push_inner(bytes, false)
    }

    /// Queues frames that must not count against the limit (a resume
    /// replay, itself bounded by `--max-replay-events`).
    pub fn push_unbounded(&self, bytes: Bytes) {
        self.push_inner(bytes, true)
    }

    fn push_inner(&self, mut bytes: Bytes, unbounded: bool) {
        let mut q = self.lock();
        if q.closing.is_some() || q.gone {
            return;
        }
        if !q.busy && q.frames.is_empty() {
            // The socket's writer is idle and nothing is queued: write now,
            // from this thread, and wake nobody if the kernel takes it all.
            // Holding the lock keeps the socket task from writing meanwhile.
            match send_now(q.fd, &bytes) {
                Some(n) if n == bytes.len() => return,
                Some(n) => bytes.advance(n),
                None => {}
            }
        }
        if !unbounded && q.bytes + bytes.len() > self.limit as usize {
            // What is queued stays (it may finish a frame already half
            // written) and is bounded by the limit; this frame and all later
            // ones are dropped, and the close follows the queue.
            q.closing = Some(SLOW_CONSUMER);
        } else {
            // Unbounded frames (a replay) are not the reader's backlog: a
            // live frame right behind a large replay must not close it.
            if !unbounded {
                q.bytes += bytes.len();
            }
            q.frames.push(bytes);
        }
        drop(q);
        self.waker.wake();
    }

    /// Queues one text frame of this socket's own (an error reply).
    pub fn push_text(&self, payload: &[u8]) {
        let mut b = BytesMut::with_capacity(payload.len() + 4);
        wire::put_frame(&mut b, OpCode::Text, payload);
        self.push(b.freeze());
    }

    /// Asks the socket task to send this close and end.
    pub fn close(&self, closing: Closing) {
        let mut q = self.lock();
        if q.closing.is_none() {
            q.closing = Some(closing);
        }
        drop(q);
        self.waker.wake();
    }

    /// The close asked for, if any.
    pub fn closing(&self) -> Option<Closing> {
        self.lock().closing
    }

    /// Takes everything queued. The caller becomes the socket's writer
    /// until it calls [`Outbox::release`]: no direct writes meanwhile.
    ///
    /// `spent` is the caller's emptied list from its last drain. When frames
    /// are taken, it takes their place, so the heap list a busy socket
    /// spilled to is reused for the next frames instead of freed and
    /// allocated again per publish (two lists swap while the socket stays
    /// busy). When nothing is queued it is dropped: an idle socket keeps
    /// only the inline slot.
    pub fn drain(&self, spent: Frames) -> Drained {
        debug_assert!(spent.is_empty(), "the writer hands back an empty list");
        let mut q = self.lock();
        q.bytes = 0;
        let frames = if q.frames.is_empty() {
            Frames::new()
        } else {
            std::mem::replace(&mut q.frames, spent)
        };
        q.busy |= !frames.is_empty() || q.closing.is_some();
        Drained {
            frames,
            closing: q.closing,
        }
    }

    /// The writer has written everything it took. Returns false if more was
    /// queued meanwhile (the writer must drain again). On true the socket is
    /// idle: the queue gives back a heap list it holds, and the writer
    /// should drop its own spilled one too.
    pub fn release(&self) -> bool {
        let mut q = self.lock();
        if q.frames.is_empty() && q.closing.is_none() {
            q.busy = false;
            if q.frames.spilled() {
                q.frames = Frames::new();
            }
            true
        } else {
            false
        }
    }

    /// The upgraded socket: from now on an idle writer lets publishers
    /// write to it directly.
    pub fn attach(&self, fd: RawFd) {
        self.lock().fd = fd;
    }

    /// The socket is closing its descriptor: never write to it again.
    pub fn detach(&self) {
        let mut q = self.lock();
        q.gone = true;
        q.fd = -1;
    }

    /// Wakes `waker` when something is queued (checked by the next drain).
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

/// One non-blocking `send` on a socket; `None` when it took nothing (full,
/// broken, or no socket yet: the frame is queued and the task deals with it).
fn send_now(fd: RawFd, bytes: &[u8]) -> Option<usize> {
    if fd < 0 {
        return None;
    }
    // SAFETY: the caller holds the outbox lock, and the socket task clears
    // `fd` under that lock (`detach`) before it closes the descriptor.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    (n > 0).then_some(n as usize)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One server frame as a client reads it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Seen {
        pub opcode: u8,
        pub payload: Vec<u8>,
    }

    /// Decodes RFC 6455 server frames (final, unmasked: what
    /// [`wire::put_frame`] writes), panicking on anything else, since a
    /// client would refuse it too.
    pub(crate) fn server_frames(mut b: &[u8]) -> Vec<Seen> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert!(b.len() >= 2, "a truncated frame header");
            assert_eq!(b[0] & 0x80, 0x80, "server frames here are final");
            assert_eq!(b[0] & 0x70, 0, "no reserved bits");
            assert_eq!(b[1] & 0x80, 0, "server frames are unmasked");
            let (len, at) = match b[1] & 0x7F {
                126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            assert!(b.len() >= at + len, "a truncated frame payload");
            out.push(Seen {
                opcode: b[0] & 0x0F,
                payload: b[at..at + len].to_vec(),
            });
            b = &b[at + len..];
        }
        out
    }

    /// What a socket task would write now: every queued frame, decoded, and
    /// the close it was asked to send; then it releases the outbox, as a
    /// writer that wrote everything does.
    pub(crate) fn take(outbox: &Outbox) -> (Vec<Seen>, Option<Closing>) {
        let d = outbox.drain(Frames::new());
        let mut frames = Vec::new();
        for b in &d.frames {
            frames.extend(server_frames(b));
        }
        outbox.release();
        (frames, d.closing)
    }

    fn text(payload: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        wire::put_frame(&mut b, OpCode::Text, payload);
        b.freeze()
    }

    fn payloads(frames: &[Seen]) -> Vec<&[u8]> {
        frames.iter().map(|f| f.payload.as_slice()).collect()
    }

    fn outbox(limit: usize) -> Arc<Outbox> {
        Outbox::new(Arc::from("alice"), limit)
    }

    #[test]
    fn what_is_queued_is_drained_in_order_once() {
        let o = outbox(1 << 20);
        o.push(text(b"one"));
        o.push_text(b"two");
        o.push(text(&[b'x'; 300]));
        let (frames, closing) = take(&o);
        assert_eq!(payloads(&frames), [&b"one"[..], b"two", &[b'x'; 300][..]]);
        assert!(frames.iter().all(|f| f.opcode == 0x1));
        assert_eq!(closing, None);
        let (frames, closing) = take(&o);
        assert!(frames.is_empty(), "a frame is handed over once");
        assert_eq!(closing, None);
    }

    #[test]
    fn a_slow_consumer_is_closed_with_1013_after_what_is_queued() {
        // Two 50-byte frames fit in 120 bytes; the third does not.
        let o = outbox(120);
        let frame = |i: u8| text(&[i; 48]);
        assert_eq!(frame(0).len(), 50);
        o.push(frame(1));
        o.push(frame(2));
        assert_eq!(o.closing(), None);
        o.push(frame(3));
        assert_eq!(o.closing().map(|c| c.code), Some(wire::close::TRY_AGAIN_LATER));
        o.push(frame(4));
        o.push_text(b"an error reply");
        let (frames, closing) = take(&o);
        assert_eq!(
            payloads(&frames),
            [&[1u8; 48][..], &[2u8; 48][..]],
            "what fit, in order; nothing later"
        );
        assert_eq!(closing, Some(SLOW_CONSUMER));
        o.push(frame(5));
        let (frames, closing) = take(&o);
        assert!(frames.is_empty(), "nothing is queued after the close");
        assert_eq!(closing.map(|c| c.code), Some(1013));
    }

    #[test]
    fn the_limit_counts_bytes_since_the_last_drain() {
        let o = outbox(120);
        for round in 0..10u8 {
            o.push(text(&[round; 48]));
            o.push(text(&[round; 48]));
            let (frames, closing) = take(&o);
            assert_eq!(frames.len(), 2);
            assert_eq!(closing, None, "a reader that keeps up is never closed");
        }
    }

    #[test]
    fn an_unbounded_push_does_not_count_against_the_limit() {
        // A resume replay far over the limit, then live frames before the
        // socket task got to write the replay: the socket must stay open.
        let o = outbox(120);
        let replay: Vec<u8> = (0..20u8).flat_map(|i| text(&[i; 48])).collect();
        o.push_unbounded(Bytes::from(replay));
        assert_eq!(o.closing(), None);
        o.push(text(b"live 1"));
        o.push(text(b"live 2"));
        assert_eq!(o.closing(), None, "the replay is not the reader's backlog");
        let (frames, closing) = take(&o);
        assert_eq!(frames.len(), 22);
        assert_eq!(frames[20].payload, b"live 1");
        assert_eq!(frames[21].payload, b"live 2");
        assert_eq!(closing, None);
    }

    #[test]
    fn nothing_is_queued_after_close() {
        let o = outbox(1 << 20);
        o.push(text(b"before"));
        o.close(wire::GOING_AWAY);
        o.close(SLOW_CONSUMER);
        o.push(text(b"after"));
        o.push_unbounded(text(b"after, unbounded"));
        o.push_text(b"after, an error");
        let (frames, closing) = take(&o);
        assert_eq!(payloads(&frames), [&b"before"[..]]);
        assert_eq!(
            closing.map(|c| c.code),
            Some(wire::close::GOING_AWAY),
            "the first close wins"
        );
    }

    #[test]
    fn release_says_when_more_was_queued_meanwhile() {
        let o = outbox(1 << 20);
        o.push(text(b"one"));
        let d = o.drain(Frames::new());
        assert_eq!(d.frames.len(), 1);
        o.push(text(b"two"));
        assert!(!o.release(), "the writer must drain again");
        let d = o.drain(Frames::new());
        assert_eq!(server_frames(&d.frames[0])[0].payload, b"two");
        assert!(o.release(), "nothing was queued meanwhile");
        let d = o.drain(Frames::new());
        assert!(d.frames.is_empty());
        o.close(wire::GOING_AWAY);
        assert!(!o.release(), "a close queued meanwhile is more to write");
    }

    #[test]
    fn a_detached_socket_takes_nothing_more() {
        let o = outbox(1 << 20);
        o.detach();
        o.push(text(b"late"));
        let (frames, _) = take(&o);
        assert!(frames.is_empty());
    }
}

#[cfg(test)]
mod size {
    /// Every open socket has one: its size is part of what an idle socket
    /// costs (README, "Performance").
    #[test]
    fn an_outbox_stays_at_144_bytes() {
        assert_eq!(std::mem::size_of::<super::Outbox>(), 144);
    }
}
