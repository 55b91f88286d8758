//! Black-box tests of parley against PROTOCOL.md, one test per rule.
//!
//! `cargo test --test contract` spawns the real binary per test. To run the
//! suite against another server implementing the contract:
//! `PARLEY_TEST_EXTERNAL=127.0.0.1:8302 cargo test --test contract`
//! (tests that need a restart, a kill or a flag are then compiled as
//! ignored, with the reason: `build.rs` sets `cfg(parley_external)`).
//! Part D alone: `cargo test --test contract resume::`.

mod harness;

mod auth;
mod chat;
mod chat_errors;
mod close_codes;
mod durability;
mod frames;
mod history;
mod notifications;
mod rest_conversations;
mod resume;
