//! Failure behaviour of parley: slow consumers, limits (and the edge
//! limits: per user, per IP, close timeout), crashes, a full disk, hostile
//! input, and shutdown with 10,000 open sockets. Every test spawns its own
//! `parley` (through the contract suite's harness) and is skipped against an
//! external server.
//! Failure behaviour of parley: slow consumers, limits, crashes, a full
//! disk, store errors, panics, configuration and hostile input. Every test
//! spawns its own `parley` and is compiled as ignored (with the reason)
//! against an external server; README's failure table names each one.
//!
//! `cargo test --test faults` (add `-- --nocapture` to see the measured
//! numbers: RSS growth, messages lost in `interval` mode; `FAULTS_DEBUG=1`
//! also dumps the slow consumer's frames). `storage_faults` mounts a tmpfs:
//! built as another user than root, its tests are compiled as ignored
//! (`build.rs`); as root a failed mount fails them.

#[path = "../contract/harness.rs"]
mod harness;

mod util;

mod crash_safety;
mod edge_limits;
mod hostile_input;
mod limits;
mod operator;
mod panics;
mod shutdown;
mod slow_consumer;
mod storage_faults;
