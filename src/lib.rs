//! parley: a real-time chat and notification server speaking the contract in
//! `PROTOCOL.md` (the Django Channels product's WebSocket API, completed).
//!
//! # Layout
//! - [`config`]: flags and environment into one validated `Config`.
//! - [`server`]: accept loop, graceful shutdown.
//! - [`state`]: what every connection shares (HTTP and sockets).
//! - [`http`]: routing, upgrade checks, the REST API.
//! - [`auth`]: where tokens come from and whether they are valid.
//! - [`ws`]: one socket's whole life.
//! - [`wire`]: RFC 6455 framing and close codes, a leaf every layer may use.
//! - [`protocol`]: inbound frames parsed in place, outbound events encoded once.
//! - [`sequencer`]: the one writer: order, ids, group commit, then publish.
//! - [`hub`]: who listens to what; publish = one shared `Bytes` per receiver queue.
//! - [`store`]: the only module that knows sled.
//! - [`metrics`]: what `/metrics` shows.

pub mod auth;
pub mod config;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod sequencer;
pub mod server;
pub mod state;
pub mod store;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod wire;
pub mod ws;
