//! One WebSocket's whole life, after the 101: join, read and dispatch
//! frames, write what its outbox holds, close.
//!
//! An idle socket costs little: its task waits on readiness of the bare
//! `TcpStream` and on its outbox; the read buffer exists only while a frame
//! is arriving, and outgoing bytes are shared with every other receiver.
//! Every byte this socket sends passes through its [`Outbox`], the one
//! ordered path, so broadcasts, error replies, pongs and the close never
//! interleave. This module never touches the store: writes go to the
//! sequencer.

pub mod frame;

use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::net::TcpStream;

use crate::hub::{Closing, Outbox};
use crate::metrics::Kind;
use crate::protocol::{self, Command, Rejection};
use crate::sequencer::{ChatOp, Request, Resume};
use crate::server::Shared;
use frame::{close, OpCode, Violation};

/// What the socket is subscribed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Chat(u64),
    Notifications,
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

/// A fragmented message being reassembled.
struct Fragments {
    opcode: OpCode,
    data: Vec<u8>,
}

struct Conn {
    stream: TcpStream,
    outbox: Arc<Outbox>,
    session: Session,
    shared: Arc<Shared>,
    /// Bytes received but not yet decoded; empty (unallocated) when idle.
    rbuf: Vec<u8>,
    fragments: Option<Box<Fragments>>,
    /// Frames taken from the outbox, being written.
    sending: SmallVec<[Bytes; 2]>,
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
    /// Token bucket for `--rate-limit`: (tokens, last refill).
    bucket: Option<(f64, Instant)>,
}

/// Runs the socket until it closes.
pub async fn serve(stream: TcpStream, early: Vec<u8>, session: Session, shared: Arc<Shared>) {
    let kind = match session.topic {
        Topic::Chat(_) => "chat",
        Topic::Notifications => "notifications",
    };
    let gauge = shared.metrics.sockets.get_or_create(&Kind { kind }).clone();
    gauge.inc();
    let outbox = Outbox::new(session.user.clone(), shared.config.max_outbound_bytes);
    let joined = join(&session, &outbox, &shared).await;
    let bucket = (shared.config.rate_limit > 0).then(|| (shared.config.rate_limit as f64, Instant::now()));
    let mut conn = Conn {
        stream,
        outbox,
        session,
        shared: shared.clone(),
        rbuf: early,
        fragments: None,
        sending: SmallVec::new(),
        closing: false,
        close_queued: false,
        poisoned: false,
        peer_closed: false,
        done: false,
        bucket,
    };
    if joined {
        if let Err(e) = conn.run().await {
            tracing::debug!("socket ended: {e}");
        }
    }
    match conn.session.topic {
        Topic::Chat(id) => shared.hub.leave(id, &conn.outbox),
        Topic::Notifications => shared.hub.unlisten(&conn.outbox),
    }
    gauge.dec();
    shared.sockets.fetch_sub(1, Ordering::AcqRel);
}

/// Subscribes the socket: directly, or through the sequencer when it
/// resumes, so the replay and the live stream meet with no gap.
async fn join(session: &Session, outbox: &Arc<Outbox>, shared: &Shared) -> bool {
    let outbox = outbox.clone();
    let r = match (session.topic, session.resume) {
        (Topic::Chat(id), None) => {
            shared.hub.join(id, &outbox);
            return true;
        }
        (Topic::Notifications, None) => {
            shared.hub.listen(&outbox);
            return true;
        }
        (Topic::Chat(conversation), Some(after_seq)) => {
            shared
                .sequencer
                .ask(|reply| {
                    Request::Resume(Resume::Chat {
                        conversation,
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
    if let Err(e) = &r {
        tracing::error!("resume failed: {e}");
    }
    r.is_ok()
}

impl Conn {
    async fn run(&mut self) -> std::io::Result<()> {
        // Frames the client sent right behind its handshake.
        if !self.rbuf.is_empty() {
            self.dispatch().await;
        }
        // Boxed and made only once closing: an idle socket carries no timer.
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            self.flush()?;
            if self.done {
                return Ok(());
            }
            if self.close_queued && self.sending.is_empty() {
                if self.peer_closed {
                    return Ok(());
                }
                grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_GRACE)));
            }
            let want_write = !self.sending.is_empty();
            tokio::select! {
                biased;
                _ = self.outbox.notified() => {}
                r = self.stream.readable() => {
                    r?;
                    if self.read()? {
                        self.dispatch().await;
                    }
                }
                r = self.stream.writable(), if want_write => r?,
                _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => return Ok(()),
            }
        }
    }

    /// Writes as much of the outbox as the socket takes without blocking.
    fn flush(&mut self) -> std::io::Result<()> {
        loop {
            if self.sending.is_empty() {
                if self.close_queued {
                    // Nothing may follow our close frame.
                    return Ok(());
                }
                let drained = self.outbox.drain();
                self.sending = drained.frames;
                if let Some(c) = drained.closing {
                    if !self.close_queued {
                        self.close_queued = true;
                        self.closing = true;
                        if c == crate::hub::SLOW_CONSUMER {
                            self.shared.metrics.slow_consumers.inc();
                        }
                        let mut b = BytesMut::with_capacity(128);
                        frame::put_close(&mut b, c.code, c.reason);
                        self.sending.push(b.freeze());
                    }
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
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            };
            self.consume(n);
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
        self.sending.drain(..whole);
    }

    /// Reads what the socket has. Returns whether there is anything to
    /// decode; on end of stream the connection is done.
    fn read(&mut self) -> std::io::Result<bool> {
        let mut got = 0;
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < 1024 {
                self.rbuf.reserve(4096);
            }
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => {
                    self.done = true;
                    return Ok(false);
                }
                Ok(n) => {
                    if got == 0 {
                        self.outbox.heard();
                    }
                    got += n;
                    if got >= READ_BUDGET {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(got > 0 || !self.rbuf.is_empty())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Decodes and handles every whole frame in the read buffer.
    async fn dispatch(&mut self) {
        let max = self.shared.config.max_frame_bytes;
        let mut pos = 0;
        while !self.done && !self.poisoned {
            let mut needed = 0;
            match frame::decode(&mut self.rbuf[pos..], max, &mut needed) {
                Ok(Some(f)) => {
                    let start = pos;
                    pos += f.len;
                    let payload = start + f.payload.start..start + f.payload.end;
                    if let Err(v) = self.on_frame(f.fin, f.opcode, payload).await {
                        self.violate(v);
                    }
                }
                Ok(None) => {
                    // Size the buffer once for the rest of this frame.
                    if needed > self.rbuf.len() - pos {
                        self.rbuf.reserve(needed - (self.rbuf.len() - pos));
                    }
                    break;
                }
                Err(v) => self.violate(v),
            }
        }
        if self.poisoned {
            pos = self.rbuf.len();
        }
        self.rbuf.drain(..pos);
        if self.rbuf.is_empty() {
            // Idle sockets hold no read buffer.
            self.rbuf = Vec::new();
        }
    }

    fn violate(&mut self, v: Violation) {
        self.outbox.close(Closing {
            code: v.code,
            reason: v.reason,
        });
        // Our close is queued; the flush loop sends it. What follows in the
        // buffer cannot be trusted to be frames: it is dropped unread.
        self.closing = true;
        self.poisoned = true;
    }

    async fn on_frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: std::ops::Range<usize>,
    ) -> Result<(), Violation> {
        if self.closing {
            self.peer_closed |= opcode == OpCode::Close;
            return Ok(());
        }
        match opcode {
            OpCode::Close => {
                let p = &self.rbuf[payload];
                let code = match p {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => close::NORMAL,
                };
                // Echo the close, then end once it is written.
                let code = if (1000..5000).contains(&code) {
                    code
                } else {
                    close::PROTOCOL_ERROR
                };
                self.outbox.close(Closing { code, reason: "" });
                self.closing = true;
                self.peer_closed = true;
                Ok(())
            }
            OpCode::Ping => {
                let mut b = BytesMut::with_capacity(payload.len() + 2);
                frame::put_frame(&mut b, OpCode::Pong, &self.rbuf[payload]);
                self.outbox.push(b.freeze());
                Ok(())
            }
            OpCode::Pong => Ok(()),
            OpCode::Text | OpCode::Binary if fin => {
                if self.fragments.is_some() {
                    return Err(Violation {
                        code: close::PROTOCOL_ERROR,
                        reason: "new message inside a fragmented one",
                    });
                }
                let mut data = std::mem::take(&mut self.rbuf);
                let r = self.on_message(opcode, &mut data[payload]).await;
                self.rbuf = data;
                r
            }
            OpCode::Text | OpCode::Binary => {
                if self.fragments.is_some() {
                    return Err(Violation {
                        code: close::PROTOCOL_ERROR,
                        reason: "new message inside a fragmented one",
                    });
                }
                self.fragments = Some(Box::new(Fragments {
                    opcode,
                    data: self.rbuf[payload].to_vec(),
                }));
                Ok(())
            }
            OpCode::Continuation => {
                let Some(fr) = self.fragments.as_mut() else {
                    return Err(Violation {
                        code: close::PROTOCOL_ERROR,
                        reason: "continuation without a message",
                    });
                };
                if fr.data.len() + payload.len() > self.shared.config.max_frame_bytes {
                    return Err(Violation {
                        code: close::TOO_BIG,
                        reason: "message larger than the limit",
                    });
                }
                fr.data.extend_from_slice(&self.rbuf[payload]);
                if fin {
                    let mut fr = self.fragments.take().expect("checked above");
                    self.on_message(fr.opcode, &mut fr.data).await?;
                }
                Ok(())
            }
        }
    }

    /// A whole message: text (checked UTF-8) or binary.
    async fn on_message(&mut self, opcode: OpCode, data: &mut [u8]) -> Result<(), Violation> {
        if opcode == OpCode::Text && std::str::from_utf8(data).is_err() {
            return Err(Violation {
                code: close::INVALID_PAYLOAD,
                reason: "text frame is not valid UTF-8",
            });
        }
        let Topic::Chat(conversation) = self.session.topic else {
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
        let op = match protocol::parse_command(data, self.shared.config.max_message_chars) {
            Ok(Command::Send { text }) => ChatOp::Send(text.into()),
            Ok(Command::Edit { id, content }) => ChatOp::Edit(id.unwrap_or_default(), content.into()),
            Ok(Command::Delete { id }) => ChatOp::Delete(id.unwrap_or_default()),
            Err(r) => {
                self.reject(&r);
                return Ok(());
            }
        };
        let request = Request::Chat {
            conversation,
            user: self.session.user.clone(),
            op,
            outbox: self.outbox.clone(),
        };
        if self.shared.sequencer.submit(request).await.is_err() {
            self.outbox.close(crate::server::GOING_AWAY);
        }
        Ok(())
    }

    fn reject(&self, r: &Rejection) {
        self.shared.metrics.error(r.code.as_str());
        let mut json = Vec::with_capacity(96);
        protocol::encode_error(&mut json, r);
        self.outbox.push_text(&json);
    }

    /// `--rate-limit`: a bucket of N frames refilled at N per second.
    fn take_token(&mut self) -> bool {
        let Some((tokens, last)) = self.bucket.as_mut() else {
            return true;
        };
        let rate = self.shared.config.rate_limit as f64;
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
