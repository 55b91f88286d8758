//! The chat and notification sockets: joining the hub (a connection slot,
//! a [`Membership`], a replay when resuming) and the [`Handler`] that turns
//! their messages into sequencer requests. The RFC 6455 side is the engine's.
//!
//! This module never touches the store: writes go to the sequencer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::OwnedPermit;

use super::engine::{self, Ctx, Event, Flow, Handler, Rare, Settings};
use crate::hub::{Membership, Topic};
use crate::ids::MessageId;
use crate::limits::Refusal;
use crate::metrics::Kind;
use crate::outbox::{Outbox, SLOW_CONSUMER};
use crate::protocol::{self, Command, Rejection};
use crate::sequencer::{ChatOp, Request, Resume, WriteError};
use crate::state::Shared;
use crate::wire::{OpCode, GOING_AWAY};

/// What the upgrade checks established.
pub struct Session {
    pub topic: Topic,
    pub user: Arc<str>,
    /// Part D: replay from this point (an event-log position for chat, a
    /// notification id for notifications) before going live.
    pub resume: Option<u64>,
}

/// A socket's place in the hub and its connection slot, taken before its
/// 101 is sent so that a client that has its 101 misses nothing. Dropping
/// it gives back the slot and (through its [`Membership`]) leaves the hub.
pub struct Subscription {
    membership: Membership,
    shared: Arc<Shared>,
}

/// Why a socket could not be subscribed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// `--max-connections`, `--max-sockets-per-user`, or shutdown.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The resume replay could not be read.
    #[error("resume failed: {0}")]
    Store(#[source] WriteError),
}

/// A connection slot and its gauge, given back on drop unless kept.
struct Slot<'a> {
    shared: &'a Shared,
    kind: &'static str,
    user: &'a str,
}

impl<'a> Slot<'a> {
    fn take(shared: &'a Shared, kind: &'static str, user: &'a Arc<str>) -> Result<Slot<'a>, Refusal> {
        shared.gate.take(user)?;
        shared.metrics.sockets.get_or_create(&Kind { kind }).inc();
        Ok(Slot { shared, kind, user })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let kind = Kind { kind: self.kind };
        self.shared.metrics.sockets.get_or_create(&kind).dec();
        self.shared.gate.give_back(self.user);
    }
}

impl Subscription {
    /// Takes a connection slot and joins the hub: directly, or through the
    /// sequencer when resuming, so the replay and the live stream meet with
    /// no gap. Refused once shutdown began; a join that raced with its
    /// start gets its 1001 here (the close-all may have missed it).
    pub async fn join(session: Session, shared: &Arc<Shared>) -> Result<Subscription, JoinError> {
        let user = session.user.clone();
        let slot = Slot::take(shared, session.topic.kind(), &user)?;
        let outbox = Outbox::new(session.user, shared.config.max_outbound_bytes);
        let membership = match (&shared.relay, session.resume) {
            (Some(relay), after) => relay
                .join(session.topic, outbox, after)
                .await
                .map_err(WriteError::Unavailable),
            (None, None) => Ok(shared.hub.subscribe(session.topic, &outbox)),
            (None, Some(after)) => {
                let topic = session.topic;
                shared
                    .sequencer
                    .ask(|reply| {
                        Request::Resume(Resume {
                            topic,
                            after,
                            outbox,
                            reply,
                        })
                    })
                    .await
            }
        };
        // On error the slot is given back as `slot` drops.
        let membership = membership.map_err(JoinError::Store)?;
        std::mem::forget(slot);
        if shared.gate.is_shutting_down() {
            membership.outbox().close(GOING_AWAY);
        }
        Ok(Subscription {
            membership,
            shared: shared.clone(),
        })
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        self.membership.outbox()
    }

    pub fn topic(&self) -> Topic {
        self.membership.topic()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.outbox().detach();
        // The slot taken in `join`; the membership leaves the hub after this.
        drop(Slot {
            shared: &self.shared,
            kind: self.topic().kind(),
            user: &self.outbox().user,
        });
    }
}

/// Runs the upgraded socket as its own small task. The caller's task ends,
/// so the HTTP phase's state is gone before the socket's long idle life.
pub fn open(stream: TcpStream, early: Vec<u8>, sub: Subscription) {
    let o = sub.outbox();
    tracing::debug!(conn = o.id, user = %o.user, kind = sub.topic().kind(), "socket open");
    engine::spawn(stream, Chat { sub }, early);
}

/// The chat / notifications protocol on one socket.
pub struct Chat {
    sub: Subscription,
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

/// What a chat socket needs only sometimes.
#[derive(Default)]
pub struct ChatRare {
    blocked: Option<Blocked>,
    /// `--rate-limit` token bucket: (tokens, last refill).
    bucket: Option<(f64, Instant)>,
}

impl Rare for ChatRare {
    fn is_idle(&self) -> bool {
        self.blocked.is_none() && self.bucket.is_none()
    }
}

impl Handler for Chat {
    type Rare = ChatRare;

    fn outbox(&self) -> &Arc<Outbox> {
        self.sub.outbox()
    }

    fn settings(&self) -> Settings {
        let c = &self.sub.shared.config;
        Settings {
            max_message_bytes: c.max_frame_bytes,
            close_timeout: c.close_timeout,
        }
    }

    fn start(&mut self, ctx: &mut Ctx<'_, ChatRare>) {
        let rate = self.sub.shared.config.rate_limit;
        if rate > 0 {
            ctx.rare().bucket = Some((rate as f64, Instant::now()));
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, ChatRare>, opcode: OpCode, data: &mut [u8]) -> Flow {
        let Topic::Chat(conversation) = self.sub.topic() else {
            self.reject(&protocol::UNKNOWN_TYPE_NOTIFICATIONS);
            return Flow::Continue;
        };
        if opcode == OpCode::Binary {
            self.reject(&protocol::BINARY);
            return Flow::Continue;
        }
        if !self.take_token(ctx) {
            self.reject(&protocol::RATE_LIMITED);
            return Flow::Continue;
        }
        let op = match protocol::parse_command(data, self.sub.shared.config.max_message_chars) {
            Ok(Command::Send { text }) => ChatOp::Send(text.into()),
            Ok(Command::Edit { id, content }) => {
                ChatOp::Edit(MessageId(id.unwrap_or_default()), content.into())
            }
            Ok(Command::Delete { id }) => ChatOp::Delete(MessageId(id.unwrap_or_default())),
            Err(r) => {
                self.reject(&r);
                return Flow::Continue;
            }
        };
        #[cfg(feature = "test-hooks")]
        if let ChatOp::Send(text) = &op {
            crate::test_hooks::panic_if_asked("socket", text);
        }
        let request = Request::Chat {
            conversation,
            op,
            outbox: self.sub.outbox().clone(),
        };
        match self.sub.shared.sequencer.try_submit(request) {
            Ok(()) => Flow::Continue,
            Err(TrySendError::Full(request)) => {
                // The sequencer's queue is full: stop reading this socket
                // until there is room (backpressure reaches the sender's TCP).
                let sender = self.sub.shared.sequencer.sender();
                ctx.rare().blocked = Some(Blocked {
                    permit: Box::pin(sender.reserve_owned()),
                    request: Some(request),
                });
                Flow::Pause
            }
            Err(TrySendError::Closed(_)) => {
                self.sub.outbox().close(GOING_AWAY);
                Flow::Continue
            }
        }
    }

    fn poll_resume(&mut self, ctx: &mut Ctx<'_, ChatRare>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(rare) = ctx.rare_if_any() else {
            return Poll::Ready(());
        };
        let Some(b) = rare.blocked.as_mut() else {
            return Poll::Ready(());
        };
        match b.permit.as_mut().poll(cx) {
            Poll::Ready(Ok(permit)) => {
                if let Some(r) = b.request.take() {
                    permit.send(r);
                }
            }
            Poll::Ready(Err(_)) => self.sub.outbox().close(GOING_AWAY),
            Poll::Pending => return Poll::Pending,
        }
        rare.blocked = None;
        Poll::Ready(())
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Closing(c) if c == SLOW_CONSUMER => {
                self.sub.shared.metrics.slow_consumers.inc();
            }
            Event::Closing(_) => {}
            Event::CloseTimedOut => {
                self.sub.shared.metrics.close_timeouts.inc();
            }
        }
    }
}

impl Chat {
    fn reject(&self, r: &Rejection) {
        self.sub.shared.metrics.error(r.code.as_str());
        let mut json = Vec::with_capacity(96);
        protocol::encode_error(&mut json, r);
        self.sub.outbox().push_text(&json);
    }

    /// `--rate-limit`: a bucket of N frames refilled at N per second.
    fn take_token(&self, ctx: &mut Ctx<'_, ChatRare>) -> bool {
        let Some((tokens, last)) = ctx.rare_if_any().and_then(|r| r.bucket.as_mut()) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle socket's whole task is this future: its size is the density.
    #[test]
    fn a_chat_conn_fits_in_128_bytes() {
        let size = std::mem::size_of::<engine::Conn<Chat>>();
        eprintln!("Conn<Chat>: {size} bytes");
        assert!(size <= 128, "Conn<Chat> is {size} bytes");
    }
}
