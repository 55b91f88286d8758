//! What `/metrics` shows, in Prometheus text format (prometheus-client).
//!
//! Counters are plain atomics: bumping one on a hot path costs an atomic add
//! and never allocates (label sets are `&'static str`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    /// Open sockets, `kind` = chat | notifications.
    pub sockets: Family<Kind, Gauge>,
    /// Writes accepted, `kind` = message | edit | delete | notification | conversation.
    pub writes: Family<Kind, Counter>,
    /// Frames handed to sockets' queues (one per event per receiver).
    pub deliveries: Counter,
    /// Error frames sent, by code.
    pub errors: Family<Code, Counter>,
    /// Upgrades refused before a socket existed, by HTTP status.
    pub refused: Family<Status, Counter>,
    /// Sockets closed for not reading their queue.
    pub slow_consumers: Counter,
    /// Upgrades refused by an edge limit, `limit` = sockets_per_user |
    /// upgrades_per_ip.
    pub limited: Family<Limit, Counter>,
    /// Connections reset because the peer did not answer our close within
    /// `--close-timeout`.
    pub close_timeouts: Counter,
    /// Seconds per store flush.
    pub flush_seconds: Histogram,
    /// Writes sharing one flush.
    pub group_size: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("parley");
        let sockets = Family::<Kind, Gauge>::default();
        let writes = Family::<Kind, Counter>::default();
        let deliveries = Counter::default();
        let errors = Family::<Code, Counter>::default();
        let refused = Family::<Status, Counter>::default();
        let slow_consumers = Counter::default();
        let limited = Family::<Limit, Counter>::default();
        let close_timeouts = Counter::default();
        let flush_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let group_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register("open_sockets", "Open WebSocket connections", sockets.clone());
        registry.register("writes", "Writes accepted and stored", writes.clone());
        registry.register("deliveries", "Event frames queued to sockets", deliveries.clone());
        registry.register("error_frames", "Error frames sent, by code", errors.clone());
        registry.register(
            "refused_upgrades",
            "Upgrades refused, by HTTP status",
            refused.clone(),
        );
        registry.register(
            "slow_consumers",
            "Sockets closed for not reading",
            slow_consumers.clone(),
        );
        registry.register(
            "limited_upgrades",
            "Upgrades refused by an edge limit, by limit",
            limited.clone(),
        );
        registry.register(
            "close_timeouts",
            "Connections reset for not answering a close in time",
            close_timeouts.clone(),
        );
        registry.register(
            "store_flush_seconds",
            "Time per store flush",
            flush_seconds.clone(),
        );
        registry.register("store_group_size", "Writes per store flush", group_size.clone());
        Metrics {
            registry,
            sockets,
            writes,
            deliveries,
            errors,
            refused,
            slow_consumers,
            limited,
            close_timeouts,
            flush_seconds,
            group_size,
        }
    }

    pub fn write(&self, kind: &'static str) {
        self.writes.get_or_create(&Kind { kind }).inc();
    }

    pub fn error(&self, code: &'static str) {
        self.errors.get_or_create(&Code { code }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
