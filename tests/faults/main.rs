//! Failure behaviour of parley: slow consumers, limits, crashes, a full
//! disk and hostile input. Every test spawns its own `parley` (through the
//! contract suite's harness) and is skipped against an external server.
//!
//! `cargo test --test faults` (add `-- --nocapture` to see the measured
//! numbers: RSS growth, messages lost in `interval` mode; `FAULTS_DEBUG=1`
//! also dumps the slow consumer's frames). `storage_faults` mounts a tmpfs
//! and is skipped unless run as root.

#[path = "../contract/harness.rs"]
mod harness;

mod util;

mod crash_safety;
mod hostile_input;
mod limits;
mod operator;
mod panics;
mod slow_consumer;
mod storage_faults;
