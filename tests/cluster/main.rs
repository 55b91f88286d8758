//! Several parley nodes on one PostgreSQL and one Redis, each started as
//! an operator would (`--database-url`, `--redis-url`), the engines real
//! and private to the test (tests/support/engines.rs).
//!
//! The whole contract suite also runs against a node and against three
//! nodes behind a round-robin balancer (`.ci/cluster.sh`); this suite
//! checks what only a cluster can get wrong: order across nodes, resume on
//! another node, a node that loses the bus, the engines restarting.

#[path = "../contract/harness.rs"]
#[allow(unused_imports, unused_macros)]
mod harness;

#[path = "../support/engines.rs"]
mod engines;

mod faults;
mod order;
mod util;
