//! One WebSocket's whole life, after the 101: join, read and dispatch
//! frames, write what its outbox holds, close.
//!
//! Density is the design constraint here. An open socket is one small task
//! whose future is [`Conn`] itself, polled by hand: it waits on the bare
//! `TcpStream`'s readiness and on its outbox's waker, and holds no timer, no
//! read buffer and no nested `async` state while idle. Whatever is rare (a
//! fragmented message, a blocked submit, the close grace timer, the rate
//! limiter) lives behind a `Box` that exists only while needed.
//!
//! Every byte this socket sends passes through its [`Outbox`], the one
//! ordered path, so broadcasts, error replies, pongs and the close never
//! interleave, and nothing follows the close. This module never touches the
//! store: writes go to the sequencer.

use std::future::Future;
use std::io::{self, IoSlice};
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::OwnedPermit;

use crate::hub::{Closing, Outbox};
use crate::metrics::Kind;
use crate::protocol::{self, Command, Rejection};
use crate::sequencer::{ChatOp, Request, Resume, WriteError};
use crate::state::Shared;
use crate::wire::{self as frame, close, OpCode, Violation, GOING_AWAY};

/// What the socket is subscribed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Chat(NonZeroU64),
    Notifications,
}

impl Topic {
    fn kind(self) -> &'static str {
        match self {
            Topic::Chat(_) => "chat",
            Topic::Notifications => "notifications",
        }
    }
}

/// What the upgrade checks established.
pub struct Session {
    pub topic: Topic,
    pub user: Arc<str>,
    /// Part D: replay from this point (an event-log position for chat, a
    /// notification id for notifications) before going live.
    pub resume: Option<u64>,
}

/// How long a peer has to answer our close frame before we drop it.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Bytes read per wake-up before yielding to other sockets.
const READ_BUDGET: usize = 256 * 1024;

/// A socket's place in the hub, taken before its 101 is sent so that a
/// client that has its 101 misses nothing. Dropping it leaves the hub and
/// gives back the connection slot.
pub struct Subscription {
    topic: Topic,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
}

/// Why a socket could not be subscribed.
#[derive(Debug)]
pub enum JoinError {
    /// `--max-connections` sockets are open.
    Full,
    /// The resume replay could not be read.
    Store(WriteError),
}

impl Subscription {
    /// Takes a connection slot and joins the hub: directly, or through the
    /// sequencer when resuming, so the replay and the live stream meet with
    /// no gap.
    pub async fn join(session: Session, shared: &Arc<Shared>) -> Result<Subscription, JoinError> {
        if shared.sockets.fetch_add(1, Ordering::AcqRel) >= shared.config.max_connections {
            shared.sockets.fetch_sub(1, Ordering::AcqRel);
            return Err(JoinError::Full);
        }
        let kind = Kind {
            kind: session.topic.kind(),
        };
        shared.metrics.sockets.get_or_create(&kind).inc();
        let sub = Subscription {
            topic: session.topic,
            outbox: Outbox::new(session.user, shared.config.max_outbound_bytes),
            shared: shared.clone(),
        };
        let outbox = sub.outbox.clone();
        let resumed = match (session.topic, session.resume) {
            (Topic::Chat(id), None) => {
                shared.hub.join(id.get(), &outbox);
                Ok(())
            }
            (Topic::Notifications, None) => {
                shared.hub.listen(&outbox);
                Ok(())
            }
            (Topic::Chat(conversation), Some(after_seq)) => {
                shared
                    .sequencer
                    .ask(|reply| {
                        Request::Resume(Resume::Chat {
                            conversation: conversation.get(),
                            after_seq,
                            outbox,
                            reply,
                        })
                    })
                    .await
            }
            (Topic::Notifications, Some(after)) => {
                shared
                    .sequencer
                    .ask(|reply| Request::Resume(Resume::Notifications { after, outbox, reply }))
                    .await
            }
        };
        // On error `sub` drops here and undoes whatever was done.
        resumed.map(|()| sub).map_err(JoinError::Store)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.outbox.detach();
        match self.topic {
            Topic::Chat(id) => self.shared.hub.leave(id.get(), &self.outbox),
            Topic::Notifications => self.shared.hub.unlisten(&self.outbox),
        }
        let kind = Kind {
            kind: self.topic.kind(),
        };
        self.shared.metrics.sockets.get_or_create(&kind).dec();
        self.shared.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs the upgraded socket as its own small task. The caller's task ends,
/// so the HTTP phase's state is gone before the socket's long idle life.
pub fn open(stream: TcpStream, early: Vec<u8>, sub: Subscription) {
    use std::os::fd::AsRawFd;
    sub.outbox.attach(stream.as_raw_fd());
    let rate = sub.shared.config.rate_limit;
    let mut conn = Conn {
        stream,
        sub,
        sending: SmallVec::new(),
        extra: None,
        flags: Flags::default(),
    };
    if rate > 0 {
        conn.extra().bucket = Some((rate as f64, Instant::now()));
    }
    if !early.is_empty() {
        conn.extra().rbuf = early;
    }
    tokio::spawn(conn);
}

#[derive(Default)]
struct Flags {
    /// The first poll has handled bytes that came with the handshake.
    started: bool,
    /// A close was asked for: input is ignored but for the peer's close.
    closing: bool,
    /// Our close frame is in `sending` (or written): nothing follows it.
    close_queued: bool,
    /// The input broke the protocol: nothing more of it is decoded.
    poisoned: bool,
    /// The peer sent its close: we end once ours is written.
    peer_closed: bool,
    /// The peer is gone: end now.
    done: bool,
}

/// A fragmented message being reassembled.
struct Fragments {
    opcode: OpCode,
    data: Vec<u8>,
}

type PermitFuture = Pin<
    Box<dyn Future<Output = Result<OwnedPermit<Request>, tokio::sync::mpsc::error::SendError<()>>> + Send>,
>;

/// A chat command waiting for room in the sequencer's queue; nothing more
/// is read from this socket until it goes through.
struct Blocked {
    permit: PermitFuture,
    request: Option<Request>,
}

/// What an idle socket does not need, in one `Box` that exists only while
/// some of it is in use.
#[derive(Default)]
struct Extra {
    /// Bytes of a frame not yet whole, or frames waiting behind `blocked`.
    rbuf: Vec<u8>,
    fragments: Option<Fragments>,
    blocked: Option<Blocked>,
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    /// `--rate-limit` token bucket: (tokens, last refill).
    bucket: Option<(f64, Instant)>,
}

impl Extra {
    fn is_idle(&self) -> bool {
        self.rbuf.is_empty()
            && self.fragments.is_none()
            && self.blocked.is_none()
            && self.grace.is_none()
            && self.bucket.is_none()
    }
}

thread_local! {
    /// Where each worker thread reads sockets' bytes: whole frames are
    /// handled in place and only a partial frame is copied out, so a socket
    /// owns no read buffer between messages.
    static READ_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Read buffers above this are not kept for the next socket.
const READ_BUF_KEEP: usize = 1 << 20;

/// An open socket, and the future of its task. Kept small (one task
/// allocation per socket is the largest cost of an idle socket).
pub struct Conn {
    stream: TcpStream,
    sub: Subscription,
    /// Frames taken from the outbox, being written.
    sending: SmallVec<[Bytes; 1]>,
    extra: Option<Box<Extra>>,
    flags: Flags,
}

impl Future for Conn {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.poll_socket(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!("socket ended: {e}");
                }
                Poll::Ready(())
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Before the fields drop and `stream` closes the descriptor: no
        // publisher may write to it (or to whatever reuses its number) after.
        self.sub.outbox.detach();
    }
}

impl Conn {
    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Frees `extra` once nothing in it is in use.
    fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|x| x.is_idle()) {
            self.extra = None;
        }
    }

    fn is_blocked(&self) -> bool {
        self.extra.as_ref().is_some_and(|x| x.blocked.is_some())
    }

    fn poll_socket(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.flags.started {
            // Frames the client sent right behind its handshake.
            self.flags.started = true;
            self.process(false)?;
        }
        // Bounded so one busy socket yields to the others.
        for _ in 0..32 {
            if let Some(b) = self.extra.as_mut().and_then(|x| x.blocked.as_mut()) {
                match b.permit.as_mut().poll(cx) {
                    Poll::Ready(Ok(permit)) => {
                        if let Some(r) = b.request.take() {
                            permit.send(r);
                        }
                        self.extra().blocked = None;
                        self.process(false)?;
                    }
                    Poll::Ready(Err(_)) => {
                        self.extra().blocked = None;
                        self.sub.outbox.close(GOING_AWAY);
                    }
                    Poll::Pending => {}
                }
            }
            self.sub.outbox.register(cx.waker());
            self.flush()?;
            if self.flags.done {
                return Poll::Ready(Ok(()));
            }
            // A close may be waiting behind frames the peer is not taking
            // (a slow consumer): the grace period starts from the request,
            // not from when our queue finally drains.
            let closing =
                self.flags.close_queued || (!self.sending.is_empty() && self.sub.outbox.closing().is_some());
            if closing {
                if self.flags.peer_closed && self.sending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // From the moment we decide to close, the peer has CLOSE_GRACE
                // to take what is queued and answer; a peer that reads nothing
                // (a slow consumer) is dropped then, queue and all.
                if self.extra.as_ref().is_none_or(|x| x.grace.is_none())
                    && self.sub.outbox.closing() == Some(crate::hub::SLOW_CONSUMER)
                {
                    self.sub.shared.metrics.slow_consumers.inc();
                }
                let grace = self
                    .extra()
                    .grace
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                if grace.as_mut().poll(cx).is_ready() {
                    if !self.sending.is_empty() {
                        // Frames are stuck half-sent: end with a reset, so
                        // the peer cannot take a cut frame for a clean end.
                        self.reset_on_close();
                    }
                    return Poll::Ready(Ok(()));
                }
            }
            if !self.sending.is_empty() {
                match self.stream.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if self.is_blocked() {
                return Poll::Pending;
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => self.process(true)?,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads what the socket has (when `read`), then decodes and handles
    /// every whole frame; what is left (a partial frame, or frames behind a
    /// blocked submit) is kept in `extra`.
    fn process(&mut self, read: bool) -> io::Result<()> {
        let mut buf = READ_BUF.take();
        buf.clear();
        if let Some(x) = self.extra.as_mut() {
            if !x.rbuf.is_empty() {
                buf.append(&mut x.rbuf);
                x.rbuf = Vec::new();
            }
        }
        let result = if read { self.read(&mut buf) } else { Ok(()) };
        if !buf.is_empty() {
            self.dispatch(&mut buf);
        }
        if buf.capacity() <= READ_BUF_KEEP {
            READ_BUF.set(buf);
        }
        self.tidy();
        result
    }

    /// Makes the close that follows a TCP reset (SO_LINGER 0) instead of a FIN.
    fn reset_on_close(&self) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket descriptor and a correctly sized option.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Writes as much of the outbox as the socket takes without blocking.
    fn flush(&mut self) -> io::Result<()> {
        loop {
            if self.sending.is_empty() {
                if self.flags.close_queued {
                    // Nothing may follow our close frame.
                    return Ok(());
                }
                let drained = self.sub.outbox.drain(std::mem::take(&mut self.sending));
                self.sending = drained.frames;
                if let Some(c) = drained.closing {
                    self.flags.close_queued = true;
                    self.flags.closing = true;
                    let mut b = BytesMut::with_capacity(128);
                    frame::put_close(&mut b, c.code, c.reason);
                    self.sending.push(b.freeze());
                }
                if self.sending.is_empty() {
                    return Ok(());
                }
            }
            let n = {
                let slices: SmallVec<[IoSlice<'_>; 16]> =
                    self.sending.iter().take(16).map(|b| IoSlice::new(b)).collect();
                match self.stream.try_write_vectored(&slices) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            };
            self.consume(n);
            if self.sending.is_empty() && !self.flags.close_queued && self.sub.outbox.release() {
                if self.sending.spilled() {
                    // Idle again: the list a burst spilled to goes back.
                    self.sending = SmallVec::new();
                }
                return Ok(());
            }
        }
    }

    fn consume(&mut self, mut n: usize) {
        let mut whole = 0;
        for b in self.sending.iter_mut() {
            if n >= b.len() {
                n -= b.len();
                whole += 1;
            } else {
                b.advance(n);
                break;
            }
        }
        // A spilled list keeps its capacity: the next drain hands it to the
        // outbox for the frames that follow (freed when the socket idles).
        self.sending.drain(..whole);
    }

    /// Reads what the socket has into `buf`; at end of stream the
    /// connection is done.
    fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut got = 0;
        loop {
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            match self.stream.try_read_buf(buf) {
                Ok(0) => {
                    self.flags.done = true;
                    return Ok(());
                }
                Ok(n) => {
                    if got == 0 {
                        self.sub.outbox.heard();
                    }
                    got += n;
                    if got >= READ_BUDGET {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Decodes and handles every whole frame in `buf`, up to a command that
    /// must wait for the sequencer; keeps the rest in `extra`.
    fn dispatch(&mut self, buf: &mut [u8]) {
        let max = self.sub.shared.config.max_frame_bytes;
        let mut pos = 0;
        while !self.flags.done && !self.flags.poisoned && !self.is_blocked() {
            let mut needed = 0;
            match frame::decode(&mut buf[pos..], max, &mut needed) {
                Ok(Some(f)) => {
                    let payload = pos + f.payload.start..pos + f.payload.end;
                    pos += f.len;
                    if let Err(v) = self.on_frame(f.fin, f.opcode, &mut buf[payload]) {
                        self.violate(v);
                    }
                }
                Ok(None) => break,
                Err(v) => self.violate(v),
            }
        }
        if pos < buf.len() && !self.flags.poisoned && !self.flags.done {
            self.extra().rbuf.extend_from_slice(&buf[pos..]);
        }
    }

    fn violate(&mut self, v: Violation) {
        self.sub.outbox.close(Closing {
            code: v.code,
            reason: v.reason,
        });
        // Our close is queued; the flush loop sends it. What follows in the
        // input cannot be trusted to be frames: it is dropped unread.
        self.flags.closing = true;
        self.flags.poisoned = true;
    }

    fn on_frame(&mut self, fin: bool, opcode: OpCode, payload: &mut [u8]) -> Result<(), Violation> {
        if self.flags.closing {
            self.flags.peer_closed |= opcode == OpCode::Close;
            return Ok(());
        }
        const INTERLEAVED: Violation = Violation {
            code: close::PROTOCOL_ERROR,
            reason: "new message inside a fragmented one",
        };
        let fragmenting = self.extra.as_ref().is_some_and(|x| x.fragments.is_some());
        match opcode {
            OpCode::Close => {
                let code = match *payload {
                    [a, b, ..] => u16::from_be_bytes([a, b]),
                    _ => close::NORMAL,
                };
                // Echo the close, then end once it is written.
                let code = if (1000..5000).contains(&code) {
                    code
                } else {
                    close::PROTOCOL_ERROR
                };
                self.sub.outbox.close(Closing { code, reason: "" });
                self.flags.closing = true;
                self.flags.peer_closed = true;
                Ok(())
            }
            OpCode::Ping => {
                let mut b = BytesMut::with_capacity(payload.len() + 2);
                frame::put_frame(&mut b, OpCode::Pong, payload);
                self.sub.outbox.push(b.freeze());
                Ok(())
            }
            OpCode::Pong => Ok(()),
            OpCode::Text | OpCode::Binary if fragmenting => Err(INTERLEAVED),
            OpCode::Text | OpCode::Binary if fin => self.on_message(opcode, payload),
            OpCode::Text | OpCode::Binary => {
                self.extra().fragments = Some(Fragments {
                    opcode,
                    data: payload.to_vec(),
                });
                Ok(())
            }
            OpCode::Continuation => {
                let max = self.sub.shared.config.max_frame_bytes;
                let Some(fr) = self.extra.as_mut().and_then(|x| x.fragments.as_mut()) else {
                    return Err(Violation {
                        code: close::PROTOCOL_ERROR,
                        reason: "continuation without a message",
                    });
                };
                if fr.data.len() + payload.len() > max {
                    return Err(Violation {
                        code: close::TOO_BIG,
                        reason: "message larger than the limit",
                    });
                }
                fr.data.extend_from_slice(payload);
                if fin {
                    if let Some(mut fr) = self.extra().fragments.take() {
                        self.on_message(fr.opcode, &mut fr.data)?;
                    }
                }
                Ok(())
            }
        }
    }
    /// A whole message: text (checked UTF-8) or binary.
    fn on_message(&mut self, opcode: OpCode, data: &mut [u8]) -> Result<(), Violation> {
        if opcode == OpCode::Text && std::str::from_utf8(data).is_err() {
            return Err(Violation {
                code: close::INVALID_PAYLOAD,
                reason: "text frame is not valid UTF-8",
            });
        }
        let Topic::Chat(conversation) = self.sub.topic else {
            self.reject(&protocol::UNKNOWN_TYPE_NOTIFICATIONS);
            return Ok(());
        };
        if opcode == OpCode::Binary {
            self.reject(&protocol::BINARY);
            return Ok(());
        }
        if !self.take_token() {
            self.reject(&protocol::RATE_LIMITED);
            return Ok(());
        }
        let op = match protocol::parse_command(data, self.sub.shared.config.max_message_chars) {
            Ok(Command::Send { text }) => ChatOp::Send(text.into()),
            Ok(Command::Edit { id, content }) => ChatOp::Edit(id.unwrap_or_default(), content.into()),
            Ok(Command::Delete { id }) => ChatOp::Delete(id.unwrap_or_default()),
            Err(r) => {
                self.reject(&r);
                return Ok(());
            }
        };
        #[cfg(feature = "test-hooks")]
        if let ChatOp::Send(text) = &op {
            crate::test_hooks::panic_if_asked("socket", text);
        }
        let request = Request::Chat {
            conversation: conversation.get(),
            user: self.sub.outbox.user.clone(),
            op,
            outbox: self.sub.outbox.clone(),
        };
        match self.sub.shared.sequencer.try_submit(request) {
            Ok(()) => {}
            Err(TrySendError::Full(request)) => {
                let sender = self.sub.shared.sequencer.sender();
                self.extra().blocked = Some(Blocked {
                    permit: Box::pin(sender.reserve_owned()),
                    request: Some(request),
                });
            }
            Err(TrySendError::Closed(_)) => self.sub.outbox.close(GOING_AWAY),
        }
        Ok(())
    }

    fn reject(&self, r: &Rejection) {
        self.sub.shared.metrics.error(r.code.as_str());
        let mut json = Vec::with_capacity(96);
        protocol::encode_error(&mut json, r);
        self.sub.outbox.push_text(&json);
    }

    /// `--rate-limit`: a bucket of N frames refilled at N per second.
    fn take_token(&mut self) -> bool {
        let Some((tokens, last)) = self.extra.as_mut().and_then(|x| x.bucket.as_mut()) else {
            return true;
        };
        let rate = self.sub.shared.config.rate_limit as f64;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
