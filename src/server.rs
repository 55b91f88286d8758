//! The accept loop, the state every connection shares, and shutdown.
//!
//! `run(listener, config, shutdown)` is the whole server: tests bind port 0
//! and cancel the token; `main` passes ctrl-c / SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::cluster::{Node, Relay};
use crate::config::{ClusterConfig, Config, Durability};
use crate::hub::Hub;
use crate::limits::{ClientAddr, Gate};
use crate::metrics::Metrics;
use crate::sequencer::{Sequencer, Wiring};
use crate::state::Shared;
use crate::store::{PgStore, SledStore, Store, StoreError, WalOptions, WalStore};
use crate::wire::Closing;
use crate::wire::{close, GOING_AWAY, SERVICE_RESTART};

/// How long shutdown waits for HTTP connections to finish before exiting
/// anyway (sockets get `--close-timeout` plus [`SHUTDOWN_SLACK`]).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Beyond the close timeout, for the last sockets' tasks to run once their
/// timer fires (a busy runtime under thousands of closes).
const SHUTDOWN_SLACK: Duration = Duration::from_secs(2);
/// How long the sequencer may take to finish its last group and flush.
const WRITER_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("the store's final flush did not finish within {0:?} of shutdown")]
    FlushTimeout(Duration),
}

/// Binds `addr` with a listen backlog deep enough for connection storms
/// (std's default of 128 overflows at a few hundred handshakes in flight;
/// the kernel caps it at `net.core.somaxconn`).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Opens the store at `config.data_dir`: the commit log with sled as its
/// applied state, or sled alone in `interval` mode. A data dir last written
/// in the default mode has its log replayed into sled first, whichever mode
/// opens it now.
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| StoreError::open(format!("cannot create {}", config.data_dir.display()), e))?;
    let wal = || {
        WalStore::open(
            &config.data_dir,
            WalOptions {
                segment_bytes: config.wal_segment_bytes,
                min_free: config.min_free_bytes,
                ..WalOptions::default()
            },
        )
    };
    match config.durability {
        Durability::Sync | Durability::Fsync => Ok(Arc::new(wal()?)),
        Durability::Interval(d) => {
            if config.data_dir.join("log").exists() {
                // Replayed, applied and checkpointed as it drops.
                drop(wal()?);
            }
            let every = Some(d.as_millis().max(1) as u64);
            let store = SledStore::open_with_reserve(&config.data_dir, every, config.min_free_bytes)?;
            Ok(Arc::new(store))
        }
    }
}

/// A cluster node's wiring: PostgreSQL as its store (migrated at start),
/// the relay that hands its sockets events in commit order, and the bus to
/// the other nodes, whose subscription writes then need.
async fn join_cluster(
    cluster: &ClusterConfig,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    max_replay: usize,
) -> Result<(Wiring, Arc<Relay>), ServerError> {
    let pg = Arc::new(PgStore::open(&cluster.database_url).await?);
    let store: Arc<dyn Store> = pg.clone();
    let node = Node::start(
        &cluster.redis_url,
        hub,
        store.clone(),
        metrics.clone(),
        max_replay,
    )?;
    let heard = node.bus.clone();
    pg.require(Box::new(move || heard.check()));
    let wiring = Wiring {
        store,
        hub: hub.clone(),
        fanout: node.fanout,
        presence: node.presence,
        metrics: metrics.clone(),
        max_replay,
    };
    let relay = node.relay;
    Ok((wiring, relay))
}

/// Serves until `shutdown` is cancelled, then closes every socket with 1001,
/// flushes the store and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let hub = Arc::new(Hub::new());
    let metrics = Arc::new(Metrics::new());
    let (wiring, relay) = match &config.cluster {
        None => {
            let store = open_store(&config)?;
            let wiring = Wiring::local(store, hub.clone(), metrics.clone(), config.max_replay_events);
            (wiring, None)
        }
        Some(cluster) => {
            let (wiring, relay) = join_cluster(cluster, &hub, &metrics, config.max_replay_events).await?;
            (wiring, Some(relay))
        }
    };
    let store = wiring.store.clone();
    let (sequencer, writer) = Sequencer::start(wiring)?;
    let shared = Arc::new(Shared {
        relay,
        verifier: Verifier::new(&config.jwt),
        store: store.clone(),
        hub: hub.clone(),
        sequencer,
        gate: Gate::new(
            config.max_connections,
            Some(config.max_sockets_per_user),
            Some(config.max_upgrades_per_ip),
        ),
        config,
        metrics,
    });
    println!("listening on http://{}", listener.local_addr()?);
    let tracker = TaskTracker::new();
    if let Some(interval) = shared.config.ping_interval {
        tokio::spawn(reap_idle(shared.clone(), interval, shutdown.clone()));
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(connection(stream, peer, shared, shutdown));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    shut_down(shared, tracker, writer, store).await
}

/// The tail of [`run`]: no new sockets, every open one closed with 1001,
/// the sequencer's last group flushed. Every wait is bounded: a peer that
/// does not answer its close is reset after `--close-timeout`, an HTTP
/// connection is dropped after [`SHUTDOWN_GRACE`], and a writer that does
/// not finish within [`WRITER_GRACE`] is an error (exit 1), never a hang.
async fn shut_down(
    shared: Arc<Shared>,
    tracker: TaskTracker,
    writer: std::thread::JoinHandle<()>,
    store: Arc<dyn Store>,
) -> Result<(), ServerError> {
    // Joins are refused from here on; one that took its slot before this
    // line checks again once joined (`ws::Subscription::join`), so the
    // close below reaches every socket, whenever it joined.
    shared.gate.begin_shutdown();
    tracker.close();
    let drain = shared
        .config
        .cluster
        .as_ref()
        .map_or(Duration::ZERO, |c| c.drain_period);
    if drain.is_zero() {
        shared.hub.close_all(GOING_AWAY);
    } else {
        drain_sockets(&shared.hub, drain).await;
    }
    let sockets_bound = drain + shared.config.close_timeout + SHUTDOWN_SLACK;
    let bound = sockets_bound.max(SHUTDOWN_GRACE);
    let started = std::time::Instant::now();
    let all_done = async {
        tokio::join!(tracker.wait(), shared.gate.all_closed());
    };
    if tokio::time::timeout(bound, all_done).await.is_err() {
        tracing::warn!(
            "{} sockets still open after {bound:?}; exiting anyway",
            shared.gate.open()
        );
    } else {
        tracing::info!("every connection closed in {:?}", started.elapsed());
    }
    // Dropping the last sequencer handle ends the writer after a final
    // flush. A plain thread, not `spawn_blocking`: the runtime waits for
    // its blocking tasks when dropped, and this wait must stay bounded.
    drop(shared);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = writer.join();
        let _ = tx.send(store.flush());
    });
    match tokio::time::timeout(WRITER_GRACE, rx).await {
        Ok(Ok(r)) => Ok(r?),
        Ok(Err(_)) => {
            tracing::error!("final flush thread ended without an answer");
            Ok(())
        }
        Err(_) => Err(ServerError::FlushTimeout(WRITER_GRACE)),
    }
}

/// A cluster node's shutdown (a deploy): its sockets are closed with 1012
/// a slice at a time over `period`, so that their clients reconnect (and
/// resume) through the balancer on the other nodes without all arriving at
/// once. Upgrades are refused from the start.
async fn drain_sockets(hub: &Hub, period: Duration) {
    const STEP: Duration = Duration::from_millis(50);
    let mut open = Vec::new();
    hub.each(|o| open.push(o.clone()));
    let steps = (period.as_millis() / STEP.as_millis()).max(1) as usize;
    let per_step = open.len().div_ceil(steps).max(1);
    tracing::info!("draining {} sockets over {period:?}", open.len());
    let mut tick = tokio::time::interval(period / steps as u32);
    for slice in open.chunks(per_step) {
        tick.tick().await;
        for o in slice {
            o.close(SERVICE_RESTART);
        }
    }
    // Any that joined while the list was taken.
    hub.close_all(SERVICE_RESTART);
}

/// Pings sockets that have been quiet for `interval` and closes those that
/// stay quiet `ping_timeout` longer. One task walks every socket every few
/// seconds, so an idle socket carries no timer of its own.
async fn reap_idle(shared: Arc<Shared>, interval: Duration, shutdown: CancellationToken) {
    const TIMED_OUT: Closing = Closing {
        code: close::GOING_AWAY,
        reason: "no answer to ping",
    };
    let ping_after = crate::outbox::tenths(interval);
    let give_up_after = ping_after + crate::outbox::tenths(shared.config.ping_timeout);
    // Fine enough that a deadline is kept to within a fifth of it.
    let tick = (interval.min(shared.config.ping_timeout) / 5)
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping = Bytes::from_static(b"\x89\x00");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        shared.hub.each(|o| {
            let quiet = o.quiet_for();
            if quiet >= give_up_after {
                o.close(TIMED_OUT);
            } else if quiet >= ping_after && o.first_ping() {
                o.push(ping.clone());
            }
        });
    }
}

/// One TCP connection: HTTP/1.1 until it upgrades (the socket then lives
/// in `ws::serve`) or closes.
async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, shutdown: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let timeout = shared.config.handshake_timeout;
    let svc_shared = shared.clone();
    // The peer's address travels with its requests only when a per-IP
    // limit needs it (an extension costs an allocation per request).
    let tag = shared.gate.limits_ips();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if tag {
            req.extensions_mut().insert(ClientAddr(peer));
        }
        let shared = svc_shared.clone();
        async move { Ok::<_, std::convert::Infallible>(crate::http::handle(req, shared).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    // Boxed: the HTTP phase's large state is freed when it ends, so an
    // upgraded socket's task does not carry it.
    let mut conn = Box::pin(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("http connection error: {e}");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}
