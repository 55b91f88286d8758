//! parley: a real-time chat and notification server speaking the contract in
//! `PROTOCOL.md` (the Django Channels product's WebSocket API, completed).
//!
//! # Layout
//! Leaves first; each module uses only those above it in this list (checked
//! by `tests/architecture.rs`).
//! - [`wire`]: RFC 6455 framing and close codes, a leaf every layer may use.
//! - [`ids`]: typed ids. `metrics`: what `/metrics` shows.
//! - [`protocol`]: inbound frames parsed in place, outbound events encoded once.
//! - [`config`] / [`auth`]: flags into one `Config`; tokens (the only user of
//!   the token library).
//! - [`store`]: what is kept; the only module that knows sled.
//! - [`outbox`]: one socket's outbound queue and the direct-write protocol.
//! - [`hub`]: who listens to what on this node; the `FanOut` and `Presence`
//!   interfaces the writer publishes through.
//! - `sequencer`: the one writer: order, ids, group commit, then publish.
//! - `cluster`: a node of a cluster: Redis between the nodes, delivery in
//!   PostgreSQL's commit order, gap fill, joins and resumes.
//! - `state`: what every connection shares (HTTP and sockets).
//! - `limits`: socket slots, per-user and per-IP limits, the shutdown latch.
//! - [`ws`]: one socket's whole life: the RFC 6455 engine ([`ws::engine`])
//!   and the chat handler. `http`: routing, upgrade checks, REST.
//! - [`server`]: accept loop, graceful shutdown.
//!
//! # What is public
//! Everything is crate-private unless something outside the library needs
//! it: the binary (`config`, `auth`, `server`), the fuzz targets and benches
//! (`wire`, `protocol`, `hub`, `outbox`, `store`, `ids`), the Autobahn echo
//! example (`ws::engine`) and the integration tests (the same). The load generator speaks only the wire contract and
//! uses none of it.

pub mod auth;
mod cluster;
pub mod config;
mod http;
pub mod hub;
pub mod ids;
mod limits;
mod metrics;
pub mod outbox;
pub mod protocol;
mod sequencer;
pub mod server;
mod state;
pub mod store;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod wire;
pub mod ws;
