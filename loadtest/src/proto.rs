//! JSON lines between the coordinator and its worker processes: the job and
//! commands go down a worker's stdin, one event per command comes back on its
//! stdout.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::net::Target;

/// One socket a worker owns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SockSpec {
    /// Global index over all workers; names the sender inside message texts.
    pub gid: u32,
    pub user: String,
    /// e.g. `/ws/chat/12/` or `/ws/notifications/`
    pub path: String,
    /// Index into the job's `targets`: the server (node) this socket goes to.
    #[serde(default)]
    pub target: u32,
}

/// First line a worker reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    pub worker: usize,
    /// The servers (one, or a cluster's nodes), as given by `--url`.
    pub targets: Vec<Target>,
    pub secret: String,
    /// Source address of socket gid: 127.0.0.(src_first + gid / per_source).
    pub src_first: u8,
    pub per_source: u32,
    /// Marks this run's messages: `<tag> <sender gid> <seq> <send ns>`.
    pub tag: String,
    pub sockets: Vec<SockSpec>,
    /// Chat: local socket indices of each conversation's members.
    #[serde(default)]
    pub groups: Vec<Vec<u32>>,
    /// Fan-out: local index of the publishing socket.
    #[serde(default)]
    pub publisher: Option<u32>,
    /// The worker exits by itself after this many seconds.
    pub deadline_s: f64,
    /// Per-socket connect + handshake limit.
    pub connect_timeout_s: f64,
}

impl Job {
    pub fn source_of(&self, gid: u32) -> Ipv4Addr {
        let n = self.src_first as u32 + gid / self.per_source.max(1);
        Ipv4Addr::new(127, 0, 0, n.min(254) as u8)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Open local sockets until `upto` are open (or attempted).
    Connect {
        upto: u32,
        in_flight: u32,
    },
    /// Fan-out: the publisher sends `count` messages, `in_flight` unechoed at most.
    Publish {
        count: u32,
        in_flight: u32,
        timeout_s: f64,
    },
    /// Chat: open-loop sends at `rate` per second over this worker's groups.
    Chat {
        rate: f64,
        duration_s: f64,
    },
    Status,
    Report,
    Exit,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConnectResult {
    pub attempted: u64,
    pub opened: u64,
    pub failed: u64,
    /// Handshakes (TCP connect + upgrade) that took more than 1 s.
    pub slow: u64,
    pub hs_p50_ms: f64,
    pub hs_p99_ms: f64,
    pub hs_max_ms: f64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StatusResult {
    pub open: u64,
    pub received: u64,
    pub unique: u64,
    pub last_recv_ns: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    /// (latency µs, count) pairs of the worker's histogram.
    pub hist: Vec<(u64, u64)>,
    pub received: u64,
    pub unique: u64,
    pub dups: u64,
    pub out_of_order: u64,
    /// Text frames that were not this run's chat messages.
    pub foreign: u64,
    pub server_errors: u64,
    pub parse_errors: u64,
    pub open: u64,
    pub closed: u64,
    pub close_reasons: BTreeMap<String, u64>,
    pub first_recv_ns: u64,
    pub last_recv_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Ev {
    Connected(ConnectResult),
    Published {
        sent: u64,
        echoed: u64,
        first_send_ns: u64,
        elapsed_s: f64,
        write_errors: u64,
    },
    ChatSent {
        sent: u64,
        /// Deliveries expected: each message times its conversation's sockets.
        expected: u64,
        first_send_ns: u64,
        /// How late writes were against the open-loop schedule.
        lag_p99_us: u64,
        max_lag_us: u64,
        write_errors: u64,
    },
    Status(StatusResult),
    Report(Box<Report>),
    Fatal {
        msg: String,
    },
}
