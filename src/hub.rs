//! Who is listening to what, and handing them bytes.
//!
//! A [`Hub`] maps each conversation to its open chat sockets and each user to
//! their notification sockets. Publishing clones one `Bytes` (already framed,
//! the same for every receiver) into each receiver's bounded [`Outbox`] and
//! wakes its socket task: no encoding and no allocation per receiver. A map
//! guard is never held across an `.await` (nothing here is async), and the
//! hub never touches the store.
//!
//! This is the local half of fan-out. Across several nodes, the sequencer
//! would publish to Redis and each node's subscriber would call the same
//! `publish_*` methods; sockets would not change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use atomic_waker::AtomicWaker;
use std::os::fd::RawFd;

use bytes::{Buf, Bytes, BytesMut};
use dashmap::DashMap;
use smallvec::SmallVec;

pub use crate::wire::Closing;
use crate::wire::{self as frame, OpCode};

pub const SLOW_CONSUMER: Closing = Closing {
    code: frame::close::TRY_AGAIN_LATER,
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
    limit: usize,
    /// When the peer last sent anything, in [`coarse_now`] tenths; the
    /// reaper pings sockets quiet for too long and closes those that stay so.
    last_heard: AtomicU32,
    /// A ping went out in the current quiet spell.
    pinged: AtomicBool,
}

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
            limit,
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
        if !unbounded && q.bytes + bytes.len() > self.limit {
            // What is queued stays (it may finish a frame already half
            // written) and is bounded by the limit; this frame and all later
            // ones are dropped, and the close follows the queue.
            q.closing = Some(SLOW_CONSUMER);
        } else {
            q.bytes += bytes.len();
            q.frames.push(bytes);
        }
        drop(q);
        self.waker.wake();
    }

    /// Queues one text frame of this socket's own (an error reply).
    pub fn push_text(&self, payload: &[u8]) {
        let mut b = BytesMut::with_capacity(payload.len() + 4);
        frame::put_frame(&mut b, OpCode::Text, payload);
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

/// The sockets open on one conversation, and which users they belong to.
#[derive(Default)]
struct Room {
    peers: Vec<Arc<Outbox>>,
    /// Open chat sockets per user: a user with at least one gets no
    /// notification for the conversation's messages.
    watching: HashMap<Arc<str>, u32>,
}

#[derive(Default)]
pub struct Hub {
    rooms: DashMap<u64, Room>,
    inboxes: DashMap<Arc<str>, SmallVec<[Arc<Outbox>; 2]>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    pub fn join(&self, conversation: u64, outbox: &Arc<Outbox>) {
        let mut room = self.rooms.entry(conversation).or_default();
        room.peers.push(outbox.clone());
        *room.watching.entry(outbox.user.clone()).or_insert(0) += 1;
    }

    pub fn leave(&self, conversation: u64, outbox: &Arc<Outbox>) {
        let empty = match self.rooms.get_mut(&conversation) {
            Some(mut room) => {
                if let Some(i) = room.peers.iter().position(|p| Arc::ptr_eq(p, outbox)) {
                    room.peers.swap_remove(i);
                    if let Some(n) = room.watching.get_mut(&outbox.user) {
                        *n -= 1;
                        if *n == 0 {
                            room.watching.remove(&outbox.user);
                        }
                    }
                }
                room.peers.is_empty()
            }
            None => false,
        };
        if empty {
            self.rooms.remove_if(&conversation, |_, r| r.peers.is_empty());
        }
    }

    pub fn listen(&self, outbox: &Arc<Outbox>) {
        self.inboxes
            .entry(outbox.user.clone())
            .or_default()
            .push(outbox.clone());
    }

    pub fn unlisten(&self, outbox: &Arc<Outbox>) {
        let empty = match self.inboxes.get_mut(&outbox.user) {
            Some(mut list) => {
                if let Some(i) = list.iter().position(|p| Arc::ptr_eq(p, outbox)) {
                    list.swap_remove(i);
                }
                list.is_empty()
            }
            None => false,
        };
        if empty {
            self.inboxes.remove_if(&outbox.user, |_, l| l.is_empty());
        }
    }

    /// The participants other than `sender` with no chat socket open on the
    /// conversation: who gets a notification for a new message.
    pub fn absent(
        &self,
        conversation: u64,
        participants: &[Arc<str>],
        sender: &str,
    ) -> SmallVec<[Arc<str>; 4]> {
        let room = self.rooms.get(&conversation);
        participants
            .iter()
            .filter(|p| &***p != sender)
            .filter(|p| !room.as_ref().is_some_and(|r| r.watching.contains_key(&***p)))
            .cloned()
            .collect()
    }

    /// Hands `frames` to every socket of the conversation; returns how many.
    pub fn publish_conversation(&self, conversation: u64, frames: &Bytes) -> usize {
        match self.rooms.get(&conversation) {
            Some(room) => {
                for p in &room.peers {
                    p.push(frames.clone());
                }
                room.peers.len()
            }
            None => 0,
        }
    }

    /// Hands `frames` to every notification socket of `user`; returns how many.
    pub fn publish_user(&self, user: &str, frames: &Bytes) -> usize {
        match self.inboxes.get(user) {
            Some(list) => {
                for p in list.iter() {
                    p.push(frames.clone());
                }
                list.len()
            }
            None => 0,
        }
    }

    /// Calls `f` on every open socket (shutdown, the idle reaper).
    pub fn each(&self, mut f: impl FnMut(&Arc<Outbox>)) {
        for room in self.rooms.iter() {
            room.peers.iter().for_each(&mut f);
        }
        for list in self.inboxes.iter() {
            list.iter().for_each(&mut f);
        }
    }

    pub fn close_all(&self, closing: Closing) {
        self.each(|p| p.close(closing));
    }
}
