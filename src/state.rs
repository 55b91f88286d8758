//! The state every connection shares, HTTP and sockets alike.
//!
//! Its own module so that `server` (which accepts), `http` (which routes
//! and upgrades) and `ws` (which runs sockets) all depend on it and none of
//! them on each other: the accept loop calls into `http`, never the other
//! way round.

use std::sync::Arc;

use crate::auth::Verifier;
use crate::cluster::Relay;
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::Gate;
use crate::metrics::Metrics;
use crate::sequencer::Sequencer;
use crate::store::Store;

/// What every connection shares, passed explicitly (no globals).
pub struct Shared {
    pub config: Config,
    pub verifier: Verifier,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub sequencer: Sequencer,
    /// A cluster node's sockets join (and resume) through its relay, which
    /// delivers in commit order what every node wrote; `None` on one node.
    pub relay: Option<Arc<Relay>>,
    pub metrics: Arc<Metrics>,
    /// Open (or upgrading) WebSockets: `--max-connections`, the per-user
    /// and per-IP limits, and whether shutdown began.
    pub gate: Gate,
}
