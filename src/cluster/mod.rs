//! A node of a cluster: PostgreSQL holds the record, Redis pub/sub carries
//! each group's events to the other nodes, and every node hands its
//! sockets the events in the one order PostgreSQL committed them.
//!
//! | file | concern |
//! | --- | --- |
//! | `relay.rs` | per stream (a conversation, a user's notifications): deliver in commit order, fill gaps from PostgreSQL, join and resume sockets |
//! | `bus.rs` | Redis: publish this node's groups, subscribe to the others', health by heartbeat |
//! | `presence.rs` | who watches a conversation on any node (Redis hashes, node keys that expire) |
//!
//! The sequencer does not know it is in a cluster: its output goes to
//! [`ClusterFanOut`] instead of the hub, and its store is PostgreSQL.

mod bus;
mod presence;
mod relay;

use std::sync::Arc;

pub use bus::Bus;
pub use presence::ClusterPresence;
pub use relay::Relay;

use crate::hub::{Batch, FanOut, Hub, Notes};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// What a node adds to its hub and store to be part of a cluster.
pub struct Node {
    pub relay: Arc<Relay>,
    pub bus: Arc<Bus>,
    pub fanout: Arc<ClusterFanOut>,
    pub presence: Arc<ClusterPresence>,
}

impl Node {
    /// Starts the relay, the bus and presence on `redis_url` (nothing waits
    /// for Redis: the node is unhealthy until its subscription works).
    pub fn start(
        redis_url: &str,
        hub: &Arc<Hub>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        max_replay: usize,
    ) -> Result<Node, StoreError> {
        let client = redis::Client::open(redis_url)
            .map_err(|e| StoreError::open("--redis-url is not a Redis URL".into(), e))?;
        let node = rand::random::<u64>();
        let relay = Relay::start(hub.clone(), store, metrics, max_replay);
        let bus = Bus::start(client.clone(), node, relay.clone());
        let presence = ClusterPresence::start(hub.clone(), node, client);
        let fanout = Arc::new(ClusterFanOut {
            relay: relay.clone(),
            bus: bus.clone(),
        });
        Ok(Node {
            relay,
            bus,
            fanout,
            presence,
        })
    }
}

/// Where a cluster node's sequencer publishes: to this node's sockets
/// (through the relay, so that they keep the commit order with what comes
/// from other nodes) and to the other nodes (through the bus).
pub struct ClusterFanOut {
    pub relay: Arc<Relay>,
    pub bus: Arc<Bus>,
}

impl FanOut for ClusterFanOut {
    /// Deliveries are counted by the relay, which makes them.
    fn publish(&self, batch: &Batch) -> usize {
        self.relay.chat(batch);
        self.bus.chat(batch);
        0
    }

    fn publish_user(&self, notes: &Notes) -> usize {
        self.relay.notes(notes);
        self.bus.notes(notes);
        0
    }
}
