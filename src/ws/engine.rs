//! The RFC 6455 engine: one socket's frames, outbox and close handshake,
//! generic over what its messages mean.
//!
//! The engine knows frames, not chat. A [`Handler`] gets each whole message
//! (text already checked as UTF-8) and may pause reading (backpressure);
//! everything else (pings, fragments, the close handshake, timeouts, writing
//! what the outbox holds) is here, the same for every socket kind. The chat
//! and notification sockets (`ws::chat`) and the Autobahn echo server
//! (`examples/echo.rs`) run this same code.
//!
//! Density is the design constraint. An open socket is one small task whose
//! future is [`Conn`] itself, polled by hand: it waits on the bare
//! `TcpStream`'s readiness and on its outbox's waker, and holds no timer, no
//! read buffer and no nested `async` state while idle. Whatever is rare (a
//! partial frame, a fragmented message, the close timer, the handler's own
//! rare state) lives behind one `Box` that exists only while needed.
//!
//! # A connection's life
//!
//! [`Phase`] says where the socket is; each step of [`Conn::poll_socket`]
//! moves it forward only:
//! - `Open`: frames are read and dispatched, the outbox is written.
//! - `Closing(end)`: a close is decided (by the peer, by a protocol error,
//!   or by whoever asked the outbox to close: shutdown, a slow consumer, the
//!   reaper) and our close frame waits behind queued data.
//! - `CloseSent(end)`: our close frame is taken from the outbox; nothing
//!   follows it.
//! - `Done`: the task ends and the descriptor closes.
//!
//! [`End`] says how the close ends: after the peer's own close we close TCP
//! as soon as ours is written, server first (§7.1.1); after a protocol error
//! likewise, without waiting for the peer (§7.1.7); after a close we started
//! we wait for the peer's answer. Every close is bounded by the handler's
//! close timeout, counted from the decision: a peer that has not taken our
//! close and answered by then is reset.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::net::TcpStream;

use crate::outbox::Outbox;
use crate::wire::{self, close, Closing, OpCode, Violation};

/// Bytes read per wake-up before yielding to other sockets.
const READ_BUDGET: usize = 256 * 1024;
/// Read buffers above this are not kept for the next socket.
const READ_BUF_KEEP: usize = 1 << 20;
/// A partial frame longer than this keeps the buffer it was read into
/// (moved, not copied) until it is whole: a 16 MiB frame then costs no
/// copy per wake-up.
const KEEP_PARTIAL: usize = 64 * 1024;

/// What the engine needs to know of its handler's limits.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Largest frame, and largest whole fragmented message (close 1009 beyond).
    pub max_message_bytes: usize,
    /// Time a peer has, from our decision to close, to take our close frame
    /// and answer it; then the connection is reset.
    pub close_timeout: Duration,
}

/// Whether the handler takes more input now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop decoding; what is read stays buffered until
    /// [`Handler::poll_resume`] is ready.
    Pause,
}

/// Something the handler may want to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The connection is closing with this close frame (counted once, when
    /// the close is decided).
    Closing(Closing),
    /// The peer did not answer our close within the close timeout: reset.
    CloseTimedOut,
}

/// What a handler keeps only while it needs it, in the connection's one
/// optional `Box` (shared with the engine's own rare state).
pub trait Rare: Default + Send {
    /// Nothing of it is in use: the `Box` may go.
    fn is_idle(&self) -> bool;
}

impl Rare for () {
    fn is_idle(&self) -> bool {
        true
    }
}

/// What a socket's messages mean. Monomorphised into [`Conn`]: no dynamic
/// dispatch per message.
pub trait Handler: Send + Unpin + Sized + 'static {
    type Rare: Rare;

    /// The socket's one ordered outbound path.
    fn outbox(&self) -> &Arc<Outbox>;

    fn settings(&self) -> Settings;

    /// Called once, before the first poll (e.g. to set up rare state).
    fn start(&mut self, _ctx: &mut Ctx<'_, Self::Rare>) {}

    /// A whole message: `Text` (valid UTF-8) or `Binary`. To answer, push
    /// to the outbox; to end the connection, close the outbox.
    fn on_message(&mut self, ctx: &mut Ctx<'_, Self::Rare>, opcode: OpCode, payload: &mut [u8]) -> Flow;

    /// After [`Flow::Pause`]: ready when input may be decoded again. Called
    /// only while paused.
    fn poll_resume(&mut self, _ctx: &mut Ctx<'_, Self::Rare>, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    fn on_event(&mut self, _event: Event) {}
}

/// The handler's access to its rare state.
pub struct Ctx<'a, R> {
    extra: &'a mut Option<Box<Extra<R>>>,
}

impl<R: Rare> Ctx<'_, R> {
    /// The rare state, created if needed.
    pub fn rare(&mut self) -> &mut R {
        &mut self.extra.get_or_insert_with(Box::default).rare
    }

    /// The rare state if it exists (cheap check on the hot path).
    pub fn rare_if_any(&mut self) -> Option<&mut R> {
        self.extra.as_mut().map(|x| &mut x.rare)
    }
}

/// Where a connection is in its life; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    Closing(End),
    CloseSent(End),
    Done,
}

/// How a close ends once our close frame is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// We started the close: wait for the peer's close frame.
    AwaitPeer,
    /// The peer sent its close: close TCP once ours is written.
    PeerClosed,
    /// The peer broke the protocol: close TCP once ours is written; its
    /// input is no longer decoded.
    Failed,
}

/// A fragmented message being reassembled.
struct Fragments {
    opcode: OpCode,
    data: Vec<u8>,
    /// `data[..checked]` is known to be valid UTF-8 ending on a character
    /// boundary (text only): each fragment is checked as it arrives, so
    /// invalid text fails the connection at once, not at the last fragment.
    checked: usize,
}

/// The UTF-8 check of a text frame's payload while it arrives: invalid
/// text fails the connection before the frame is whole (a peer may send a
/// 16 MiB frame slowly; Autobahn 6.4.3 / 6.4.4).
struct PartialText {
    /// Payload bytes checked so far.
    checked: usize,
    /// A character cut at `checked`, to be completed by the next bytes.
    carry: [u8; 4],
    carry_len: u8,
}

/// What an idle socket does not need, in one `Box` that exists only while
/// some of it is in use.
pub struct Extra<R> {
    phase: Phase,
    /// The handler asked for a pause; see [`Handler::poll_resume`].
    paused: bool,
    /// Bytes of a frame not yet whole, or frames waiting behind a pause.
    rbuf: Vec<u8>,
    fragments: Option<Fragments>,
    /// The close timeout, from the moment the close was decided.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How far the text payload of the partial frame in `rbuf` is checked.
    partial: Option<PartialText>,
    rare: R,
}

impl<R: Rare> Default for Extra<R> {
    fn default() -> Self {
        Extra {
            phase: Phase::Open,
            paused: false,
            rbuf: Vec::new(),
            fragments: None,
            timer: None,
            partial: None,
            rare: R::default(),
        }
    }
}

impl<R: Rare> Extra<R> {
    fn is_idle(&self) -> bool {
        self.phase == Phase::Open
            && !self.paused
            && self.rbuf.is_empty()
            && self.fragments.is_none()
            && self.timer.is_none()
            && self.partial.is_none()
            && self.rare.is_idle()
    }
}

thread_local! {
    /// Where each worker thread reads sockets' bytes: whole frames are
    /// handled in place and only a partial frame is kept, so a socket owns
    /// no read buffer between messages.
    static READ_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An open socket, and the future of its task. Kept small: one task
/// allocation per socket is the largest cost of an idle socket (a test
/// holds the chat socket's `Conn` to 128 bytes).
pub struct Conn<H: Handler> {
    stream: TcpStream,
    handler: H,
    /// Frames taken from the outbox, being written.
    sending: SmallVec<[Bytes; 1]>,
    /// Also holds the phase and the pause flag: an idle open socket has
    /// neither, and 4 more bytes here would cost 8 per socket.
    extra: Option<Box<Extra<H::Rare>>>,
}

/// Runs an upgraded socket as its own small task. `early` holds bytes the
/// client sent right behind its handshake.
pub fn spawn<H: Handler>(stream: TcpStream, handler: H, early: Vec<u8>) {
    use std::os::fd::AsRawFd;
    handler.outbox().attach(stream.as_raw_fd());
    let mut conn = Conn {
        stream,
        handler,
        sending: SmallVec::new(),
        extra: None,
    };
    conn.handler.start(&mut Ctx {
        extra: &mut conn.extra,
    });
    if !early.is_empty() {
        // Frames the client sent right behind its handshake, handled before
        // the task exists (a pause is picked up by the first poll).
        conn.extra().rbuf = early;
        if let Err(e) = conn.take_input(false) {
            tracing::debug!(
                conn = conn.handler.outbox().id,
                "socket ended before its first poll: {e}"
            );
            return;
        }
    }
    tokio::spawn(conn);
}

impl<H: Handler> Future for Conn<H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.poll_socket(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                let conn = this.handler.outbox().id;
                match r {
                    Ok(()) => tracing::debug!(conn, "socket closed"),
                    Err(e) => tracing::debug!(conn, "socket ended: {e}"),
                }
                Poll::Ready(())
            }
        }
    }
}

impl<H: Handler> Drop for Conn<H> {
    fn drop(&mut self) {
        // Before the fields drop and `stream` closes the descriptor: no
        // publisher may write to it (or to whatever reuses its number) after.
        self.handler.outbox().detach();
    }
}

impl<H: Handler> Conn<H> {
    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.extra.as_ref().map_or(Phase::Open, |x| x.phase)
    }

    fn set_phase(&mut self, phase: Phase) {
        if phase != self.phase() {
            self.extra().phase = phase;
        }
    }

    fn paused(&self) -> bool {
        self.extra.as_ref().is_some_and(|x| x.paused)
    }

    fn set_paused(&mut self, paused: bool) {
        if paused != self.paused() {
            self.extra().paused = paused;
        }
    }

    fn extra(&mut self) -> &mut Extra<H::Rare> {
        self.extra.get_or_insert_with(Box::default)
    }

    fn ctx(&mut self) -> (&mut H, Ctx<'_, H::Rare>) {
        (
            &mut self.handler,
            Ctx {
                extra: &mut self.extra,
            },
        )
    }

    /// Frees `extra` once nothing in it is in use.
    fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|x| x.is_idle()) {
            self.extra = None;
        }
    }

    fn outbox(&self) -> &Arc<Outbox> {
        self.handler.outbox()
    }

    /// One wake-up: the steps below, in order, until the socket has nothing
    /// to do (Pending) or is done (Ready).
    fn poll_socket(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bounded so one busy socket yields to the others.
        for _ in 0..32 {
            self.poll_paused(cx)?;
            self.outbox().register(cx.waker());
            self.write_out()?;
            if self.poll_close(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            if !self.sending.is_empty() {
                match self.stream.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if self.paused() || !self.input_wanted() {
                // Woken by the outbox, write readiness or the close timer.
                return Poll::Pending;
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => self.take_input(true)?,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Step 1: a paused handler that is ready again gets the input that
    /// waited for it.
    fn poll_paused(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.paused() {
            return Ok(());
        }
        let (handler, mut ctx) = self.ctx();
        if handler.poll_resume(&mut ctx, cx).is_ready() {
            self.set_paused(false);
            self.take_input(false)?;
        }
        Ok(())
    }

    /// Step 3: follows the close through its phases; Ready when the
    /// connection is over (the caller drops it, closing the descriptor).
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.phase() {
            Phase::Done => return Poll::Ready(()),
            Phase::Open => {
                // A close may wait behind frames the peer is not taking (a
                // slow consumer): the timeout starts from the request, not
                // from when our queue finally drains.
                if self.sending.is_empty() || self.outbox().closing().is_none() {
                    return Poll::Pending;
                }
                self.set_phase(Phase::Closing(End::AwaitPeer));
            }
            Phase::Closing(_) | Phase::CloseSent(_) => {}
        }
        let first = self.extra.as_ref().is_none_or(|x| x.timer.is_none());
        if first {
            if let Some(c) = self.outbox().closing() {
                self.handler.on_event(Event::Closing(c));
            }
        }
        if let Phase::CloseSent(end) = self.phase() {
            if self.sending.is_empty() && end != End::AwaitPeer {
                // Ours is written and nothing more is owed: close TCP now,
                // server first.
                self.finish();
                return Poll::Ready(());
            }
        }
        if first {
            let timeout = self.handler.settings().close_timeout;
            self.extra().timer = Some(Box::pin(tokio::time::sleep(timeout)));
        }
        let timer = self.extra().timer.as_mut().expect("armed above");
        if timer.as_mut().poll(cx).is_ready() {
            // The peer neither took our close nor answered it in time: a
            // reset, so it cannot take a cut frame for a clean end.
            self.handler.on_event(Event::CloseTimedOut);
            self.reset_on_close();
            self.set_phase(Phase::Done);
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Ends a connection whose close handshake is over (or failed): our
    /// close is written, so send FIN, take what the peer already sent (so
    /// the kernel does not answer it with a reset), and close.
    fn finish(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on the descriptor this connection owns.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_WR) };
        let mut scratch = [0u8; 4096];
        for _ in 0..16 {
            match self.stream.try_read(&mut scratch) {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        self.set_phase(Phase::Done);
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

    /// Step 2: writes as much of the outbox as the socket takes without
    /// blocking. Taking the close frame moves the phase to `CloseSent`.
    fn write_out(&mut self) -> io::Result<()> {
        loop {
            if self.sending.is_empty() {
                if matches!(self.phase(), Phase::CloseSent(_) | Phase::Done) {
                    // Nothing may follow our close frame.
                    return Ok(());
                }
                let drained = self.handler.outbox().drain(std::mem::take(&mut self.sending));
                self.sending = drained.frames;
                if let Some(c) = drained.closing {
                    let end = match self.phase() {
                        Phase::Closing(end) => end,
                        _ => End::AwaitPeer,
                    };
                    self.set_phase(Phase::CloseSent(end));
                    let mut b = BytesMut::with_capacity(4 + c.reason.len().min(123));
                    wire::put_close(&mut b, c.code, c.reason);
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
            if self.sending.is_empty() && self.phase() == Phase::Open && self.outbox().release() {
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

    /// Step 4: reads what the socket has (when `read`), then decodes and
    /// handles every whole frame; what is left (a partial frame, or frames
    /// behind a pause) is kept in `extra`.
    fn take_input(&mut self, read: bool) -> io::Result<()> {
        // A partial frame's own buffer when there is one (its bytes are not
        // copied again), else this thread's.
        let (mut buf, own) = match self.extra.as_mut().filter(|x| !x.rbuf.is_empty()) {
            Some(x) => (std::mem::take(&mut x.rbuf), true),
            None => {
                let mut b = READ_BUF.take();
                b.clear();
                (b, false)
            }
        };
        let result = if read { self.read(&mut buf) } else { Ok(false) };
        let pos = if buf.is_empty() {
            0
        } else {
            self.dispatch(&mut buf)
        };
        if let Ok(true) = result {
            // End of stream. A peer that sent its close and then FIN still
            // gets our close; any other is gone.
            if self.input_wanted() {
                self.set_phase(Phase::Done);
            }
        }
        let keep = pos < buf.len() && self.input_wanted();
        if keep && (own || buf.len() - pos > KEEP_PARTIAL) {
            buf.drain(..pos);
            self.extra().rbuf = buf;
        } else {
            if keep {
                self.extra().rbuf.extend_from_slice(&buf[pos..]);
            }
            if buf.capacity() <= READ_BUF_KEEP {
                buf.clear();
                READ_BUF.set(buf);
            }
        }
        self.tidy();
        result.map(drop)
    }

    /// Reads what the socket has into `buf`; answers whether the stream
    /// ended.
    fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        let mut got = 0;
        loop {
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            match self.stream.try_read_buf(buf) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    if got == 0 {
                        self.outbox().heard();
                    }
                    got += n;
                    if got >= READ_BUDGET {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the peer's input still matters: not once it broke the
    /// protocol or sent its close, nor when the connection is done.
    fn input_wanted(&self) -> bool {
        match self.phase() {
            Phase::Open => true,
            Phase::Closing(end) | Phase::CloseSent(end) => end == End::AwaitPeer,
            Phase::Done => false,
        }
    }

    /// Whether frames are decoded now.
    fn decoding(&self) -> bool {
        !self.paused() && self.input_wanted()
    }

    /// Decodes and handles every whole frame in `buf`, up to a pause;
    /// answers how many bytes were used.
    fn dispatch(&mut self, buf: &mut [u8]) -> usize {
        let max = self.handler.settings().max_message_bytes;
        let mut pos = 0;
        while self.decoding() {
            let mut needed = 0;
            match wire::decode(&mut buf[pos..], max, &mut needed) {
                Ok(Some(f)) => {
                    if let Some(x) = self.extra.as_mut() {
                        x.partial = None;
                    }
                    let payload = pos + f.payload.start..pos + f.payload.end;
                    pos += f.len;
                    if let Err(v) = self.on_frame(f.fin, f.opcode, &mut buf[payload]) {
                        self.fail(v);
                    }
                }
                Ok(None) => {
                    if let Err(v) = self.check_partial(&buf[pos..]) {
                        self.fail(v);
                    }
                    break;
                }
                Err(v) => self.fail(v),
            }
        }
        pos
    }

    /// Checks the part of a text frame that has arrived (the frame at the
    /// start of `partial` is not whole), from where the last check stopped.
    fn check_partial(&mut self, partial: &[u8]) -> Result<(), Violation> {
        let Some(h) = wire::peek_header(partial) else {
            return Ok(());
        };
        let fragments = self.extra.as_ref().and_then(|x| x.fragments.as_ref());
        let tail = match (h.opcode, fragments) {
            (OpCode::Text, None) => &[][..],
            (OpCode::Continuation, Some(fr)) if fr.opcode == OpCode::Text => &fr.data[fr.checked..],
            _ => return Ok(()),
        };
        let mut st = PartialText {
            checked: 0,
            carry: [0; 4],
            carry_len: tail.len() as u8,
        };
        st.carry[..tail.len()].copy_from_slice(tail);
        let x = self.extra();
        let st = x.partial.get_or_insert(st);
        let payload = &partial[h.payload_start..];
        let mut tmp = [0u8; 1024 + 4];
        while st.checked < payload.len() {
            let c = st.carry_len as usize;
            let n = (payload.len() - st.checked).min(1024);
            tmp[..c].copy_from_slice(&st.carry[..c]);
            for k in 0..n {
                let i = st.checked + k;
                tmp[c + k] = payload[i] ^ h.mask[i % 4];
            }
            match std::str::from_utf8(&tmp[..c + n]) {
                Ok(_) => st.carry_len = 0,
                Err(e) if e.error_len().is_some() => return Err(INVALID_TEXT),
                Err(e) => {
                    let rest = &tmp[e.valid_up_to()..c + n];
                    st.carry[..rest.len()].copy_from_slice(rest);
                    st.carry_len = rest.len() as u8;
                }
            }
            st.checked += n;
        }
        Ok(())
    }

    /// The peer broke the protocol: our close goes out, and what follows in
    /// the input cannot be trusted to be frames (it is dropped unread).
    fn fail(&mut self, v: Violation) {
        match self.phase() {
            Phase::Open => {
                self.outbox().close(Closing {
                    code: v.code,
                    reason: v.reason,
                });
                self.set_phase(Phase::Closing(End::Failed));
            }
            Phase::Closing(_) => self.set_phase(Phase::Closing(End::Failed)),
            Phase::CloseSent(_) => self.set_phase(Phase::CloseSent(End::Failed)),
            Phase::Done => {}
        }
    }

    /// The peer's close frame arrived: after ours, the connection ends.
    fn peer_closed(&mut self) {
        let next = match self.phase() {
            Phase::Open | Phase::Closing(End::AwaitPeer) => Phase::Closing(End::PeerClosed),
            Phase::CloseSent(End::AwaitPeer) => {
                // Ours was sent and this is the answer: the handshake is
                // over; close TCP as soon as ours is written.
                Phase::CloseSent(End::PeerClosed)
            }
            p => p,
        };
        self.set_phase(next);
    }

    fn on_frame(&mut self, fin: bool, opcode: OpCode, payload: &mut [u8]) -> Result<(), Violation> {
        if self.phase() != Phase::Open {
            // Closing: only the peer's close matters (RFC 6455 §5.5.1).
            if opcode == OpCode::Close {
                self.peer_closed();
            }
            return Ok(());
        }
        let fragmenting = self.extra.as_ref().is_some_and(|x| x.fragments.is_some());
        match opcode {
            OpCode::Close => {
                match close_answer(payload) {
                    Ok(echo) => {
                        self.outbox().close(echo);
                        self.peer_closed();
                    }
                    Err(failure) => {
                        self.outbox().close(failure);
                        self.set_phase(Phase::Closing(End::Failed));
                    }
                }
                Ok(())
            }
            OpCode::Ping => {
                let mut b = BytesMut::with_capacity(payload.len() + 2);
                wire::put_frame(&mut b, OpCode::Pong, payload);
                self.outbox().push(b.freeze());
                Ok(())
            }
            OpCode::Pong => Ok(()),
            OpCode::Text | OpCode::Binary if fragmenting => Err(INTERLEAVED),
            OpCode::Text | OpCode::Binary if fin => self.message(opcode, payload),
            OpCode::Text | OpCode::Binary => {
                let mut fr = Fragments {
                    opcode,
                    data: payload.to_vec(),
                    checked: 0,
                };
                check_utf8_prefix(&mut fr)?;
                self.extra().fragments = Some(fr);
                Ok(())
            }
            OpCode::Continuation => self.continuation(fin, payload),
        }
    }

    fn continuation(&mut self, fin: bool, payload: &[u8]) -> Result<(), Violation> {
        let max = self.handler.settings().max_message_bytes;
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
        check_utf8_prefix(fr)?;
        if fin {
            if let Some(mut fr) = self.extra().fragments.take() {
                self.message(fr.opcode, &mut fr.data)?;
            }
        }
        Ok(())
    }

    /// A whole message: text is checked as UTF-8, then the handler has it.
    fn message(&mut self, opcode: OpCode, data: &mut [u8]) -> Result<(), Violation> {
        if opcode == OpCode::Text && std::str::from_utf8(data).is_err() {
            return Err(INVALID_TEXT);
        }
        let (handler, mut ctx) = self.ctx();
        if handler.on_message(&mut ctx, opcode, data) == Flow::Pause {
            self.set_paused(true);
        }
        Ok(())
    }
}

const INTERLEAVED: Violation = Violation {
    code: close::PROTOCOL_ERROR,
    reason: "new message inside a fragmented one",
};

const INVALID_TEXT: Violation = Violation {
    code: close::INVALID_PAYLOAD,
    reason: "text frame is not valid UTF-8",
};

/// Checks the text received so far: invalid as soon as no continuation
/// could make it valid (a truncated character at the end may still be
/// completed by the next fragment).
fn check_utf8_prefix(fr: &mut Fragments) -> Result<(), Violation> {
    if fr.opcode != OpCode::Text {
        return Ok(());
    }
    match std::str::from_utf8(&fr.data[fr.checked..]) {
        Ok(_) => fr.checked = fr.data.len(),
        Err(e) if e.error_len().is_some() => return Err(INVALID_TEXT),
        Err(e) => fr.checked += e.valid_up_to(),
    }
    Ok(())
}

/// Close codes a peer may send (RFC 6455 §7.4): the assigned ones that may
/// appear on the wire, and the ranges for libraries and applications.
/// 1004 is reserved, 1005 / 1006 / 1015 must never be sent, 1016–2999 are
/// unassigned and 5000+ are not close codes.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// What we answer a peer's close frame with: `Ok` with its code when it is
/// a valid one (§5.5.1 "typically echos the status code it received"), or
/// 1000 for an empty close; `Err` (the peer broke the protocol) with 1002
/// for a malformed one, 1007 for a reason that is not UTF-8.
pub fn close_answer(payload: &[u8]) -> Result<Closing, Closing> {
    const MALFORMED: Closing = Closing {
        code: close::PROTOCOL_ERROR,
        reason: "invalid close frame",
    };
    match payload {
        [] => Ok(Closing {
            code: close::NORMAL,
            reason: "",
        }),
        [_] => Err(MALFORMED),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !is_valid_close_code(code) {
                Err(MALFORMED)
            } else if std::str::from_utf8(reason).is_err() {
                Err(Closing {
                    code: close::INVALID_PAYLOAD,
                    reason: "close reason is not valid UTF-8",
                })
            } else {
                Ok(Closing { code, reason: "" })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Echoes every message; closes after `timeout` when unanswered.
    struct TestEcho {
        outbox: Arc<Outbox>,
        timeout: Duration,
    }

    impl Handler for TestEcho {
        type Rare = ();
        fn outbox(&self) -> &Arc<Outbox> {
            &self.outbox
        }
        fn settings(&self) -> Settings {
            Settings {
                max_message_bytes: 1 << 16,
                close_timeout: self.timeout,
            }
        }
        fn on_message(&mut self, _: &mut Ctx<'_, ()>, opcode: OpCode, payload: &mut [u8]) -> Flow {
            let mut b = BytesMut::new();
            wire::put_frame(&mut b, opcode, payload);
            self.outbox.push(b.freeze());
            Flow::Continue
        }
    }

    /// A client socket connected to an engine running `TestEcho`.
    async fn engine_pair(timeout: Duration) -> (TcpStream, Arc<Outbox>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let outbox = Outbox::new(Arc::from("t"), 1 << 20);
        spawn(
            server,
            TestEcho {
                outbox: outbox.clone(),
                timeout,
            },
            vec![],
        );
        (client, outbox)
    }

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mask = [9, 8, 7, 6];
        let mut v = vec![b0, 0x80 | payload.len() as u8];
        v.extend(mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    /// Reads until the server ends the connection: (frames as (opcode,
    /// payload), how it ended, when).
    async fn until_end(client: &mut TcpStream) -> (Vec<(u8, Vec<u8>)>, io::Result<()>, std::time::Instant) {
        let mut bytes = vec![];
        let mut chunk = [0u8; 4096];
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk)).await {
                Err(_) => panic!("the server did not end the connection within 5 s"),
                Ok(Ok(0)) => break Ok(()),
                Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => break Err(e),
            }
        };
        let at = std::time::Instant::now();
        let mut frames = vec![];
        let mut rest = &bytes[..];
        while rest.len() >= 2 {
            let len = (rest[1] & 0x7F) as usize;
            assert!(len < 126, "short frames only");
            frames.push((rest[0] & 0x0F, rest[2..2 + len].to_vec()));
            rest = &rest[2 + len..];
        }
        (frames, ended, at)
    }

    #[tokio::test]
    async fn a_close_handshake_from_the_peer_ends_with_the_servers_fin() {
        let (mut client, _) = engine_pair(Duration::from_secs(10)).await;
        let mut input = masked(0x81, b"hi");
        input.extend(masked(0x89, b"p"));
        input.extend(masked(0x88, &1000u16.to_be_bytes()));
        input.extend(masked(0x81, b"after the close"));
        client.write_all(&input).await.unwrap();
        let start = std::time::Instant::now();
        let (frames, ended, at) = until_end(&mut client).await;
        assert_eq!(
            frames,
            vec![
                (0x1, b"hi".to_vec()),
                (0xA, b"p".to_vec()),
                (0x8, 1000u16.to_be_bytes().to_vec())
            ]
        );
        assert!(ended.is_ok(), "FIN, not a reset: {ended:?}");
        assert!(
            at - start < Duration::from_secs(1),
            "closed after {:?}",
            at - start
        );
    }

    #[tokio::test]
    async fn a_protocol_error_is_closed_without_waiting_for_the_peer() {
        let (mut client, _) = engine_pair(Duration::from_secs(10)).await;
        client.write_all(&masked(0xC1, b"rsv1")).await.unwrap();
        let start = std::time::Instant::now();
        let (frames, _, at) = until_end(&mut client).await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, 0x8);
        assert_eq!(frames[0].1[..2], 1002u16.to_be_bytes());
        assert!(
            at - start < Duration::from_secs(1),
            "closed after {:?}",
            at - start
        );
    }

    #[tokio::test]
    async fn our_close_unanswered_is_reset_after_the_timeout_and_answered_ends_cleanly() {
        let (mut mute, outbox) = engine_pair(Duration::from_millis(200)).await;
        outbox.close(crate::wire::GOING_AWAY);
        let start = std::time::Instant::now();
        let (frames, ended, at) = until_end(&mut mute).await;
        assert_eq!(frames[0].1[..2], 1001u16.to_be_bytes());
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert!(
            at - start >= Duration::from_millis(150),
            "reset after {:?}",
            at - start
        );

        let (mut polite, outbox) = engine_pair(Duration::from_secs(10)).await;
        outbox.close(crate::wire::GOING_AWAY);
        let mut head = [0u8; 2];
        polite.read_exact(&mut head).await.unwrap();
        let mut rest = vec![0u8; head[1] as usize];
        polite.read_exact(&mut rest).await.unwrap();
        polite
            .write_all(&masked(0x88, &1001u16.to_be_bytes()))
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let (frames, ended, at) = until_end(&mut polite).await;
        assert!(frames.is_empty() && ended.is_ok(), "{frames:?} {ended:?}");
        assert!(at - start < Duration::from_secs(1));
    }

    #[test]
    fn close_answers_follow_rfc_6455() {
        let frame = |code: u16, reason: &[u8]| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason);
            match close_answer(&p) {
                Ok(c) => c.code,
                Err(c) => c.code + 10_000,
            }
        };
        assert_eq!(
            close_answer(&[]),
            Ok(Closing {
                code: 1000,
                reason: ""
            })
        );
        assert_eq!(close_answer(&[0x03]).unwrap_err().code, 1002, "1-byte payload");
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
        ] {
            assert_eq!(frame(code, b"bye"), code, "{code} is echoed");
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert_eq!(frame(code, b""), 11_002, "{code} fails the connection");
        }
        assert_eq!(
            frame(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"),
            11_007
        );
        assert_eq!(frame(1000, "κόσμε".as_bytes()), 1000);
    }

    #[test]
    fn utf8_fails_as_soon_as_a_fragment_makes_it_impossible() {
        let mut fr = Fragments {
            opcode: OpCode::Text,
            data: vec![],
            checked: 0,
        };
        // "κ" split between fragments is fine until the end.
        fr.data.extend_from_slice(&[0xce]);
        assert!(check_utf8_prefix(&mut fr).is_ok());
        fr.data.extend_from_slice(&[0xba, b'a']);
        assert!(check_utf8_prefix(&mut fr).is_ok());
        assert_eq!(fr.checked, 3);
        // A surrogate's encoding can never become valid.
        fr.data.extend_from_slice(&[0xed, 0xa0, 0x80]);
        assert_eq!(check_utf8_prefix(&mut fr), Err(INVALID_TEXT));
        // Binary is never checked.
        let mut bin = Fragments {
            opcode: OpCode::Binary,
            data: vec![0xff],
            checked: 0,
        };
        assert!(check_utf8_prefix(&mut bin).is_ok());
    }
}
