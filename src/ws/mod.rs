//! WebSockets after the 101: the RFC 6455 engine ([`engine`]: frames, the
//! outbox, the close handshake, a connection's phases) and what parley's
//! sockets mean ([`chat`]: joining the hub, chat commands to the
//! sequencer). The engine has no idea it serves chat: the Autobahn echo
//! server (`examples/echo.rs`) runs the same engine with an echo handler.
//!
//! Every byte a socket sends passes through its [`Outbox`](crate::outbox::Outbox),
//! the one ordered path, so broadcasts, error replies, pongs and the close
//! never interleave, and nothing follows the close.

pub(crate) mod chat;
pub mod engine;

pub use crate::hub::Topic;
pub use chat::{open, JoinError, Session, Subscription};
