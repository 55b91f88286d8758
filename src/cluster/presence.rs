//! Who watches a conversation, across the nodes of a cluster: a chat
//! message notifies a participant only if no socket of theirs, on any
//! node, is open on the conversation.
//!
//! In Redis: one hash per watched conversation, `parley:w:<conversation>`,
//! with a field `<node>:<user>` per user watching it on that node (set when
//! their first socket there joins, removed when their last leaves), and a
//! key per live node, `parley:node:<node>`, that the node renews every
//! second and that expires 5 s after it stops. A field of a node whose key
//! is gone counts for nothing, so a node that dies leaves nobody "watching"
//! beyond those seconds (and such fields are deleted when seen). When Redis
//! comes back empty (a restart), each node writes its whole share again.
//!
//! Asked only when someone is absent on this node (the common room whose
//! members are all here costs nothing); if Redis does not answer in time,
//! the notification is sent: one too many rather than one lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use smallvec::SmallVec;
use tokio::sync::mpsc;

use crate::hub::{Ask, Hub, Presence};
use crate::ids::ConversationId;

const NODES: &str = "parley:nodes";
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A node whose key is older than this is taken for dead.
const NODE_TTL_MS: u64 = 5_000;
/// Longest the sequencer waits for Redis to say who watches elsewhere.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(2);

fn watchers_key(c: ConversationId) -> String {
    format!("parley:w:{}", c.0)
}

/// The field of `user` watching on `node`, in a conversation's hash.
fn watch_field(node: u64, user: &str) -> String {
    format!("{node:x}:{user}")
}

fn node_key(node: u64) -> String {
    format!("parley:node:{node:x}")
}

enum Change {
    Watch(ConversationId, Arc<str>, bool),
    /// A field of a dead node, seen while asking.
    Forget(ConversationId, String),
}

pub struct ClusterPresence {
    hub: Arc<Hub>,
    node: u64,
    client: redis::Client,
    rt: tokio::runtime::Handle,
    /// The connection the sequencer asks on (`None`: connect first).
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// The nodes whose key was there at the last renewal.
    alive: Arc<RwLock<HashSet<u64>>>,
    changes: mpsc::UnboundedSender<Change>,
}

impl ClusterPresence {
    /// Hooks into `hub` (set before any socket joins) and starts the task
    /// that writes this node's share and renews its key.
    pub fn start(hub: Arc<Hub>, node: u64, client: redis::Client) -> Arc<ClusterPresence> {
        let (changes, rx) = mpsc::unbounded_channel();
        let alive = Arc::new(RwLock::new(HashSet::new()));
        let hook = changes.clone();
        hub.on_watch(Box::new(move |c, user, watching| {
            let _ = hook.send(Change::Watch(c, user.clone(), watching));
        }));
        tokio::spawn(write(hub.clone(), node, client.clone(), rx, alive.clone()));
        Arc::new(ClusterPresence {
            hub,
            node,
            client,
            rt: tokio::runtime::Handle::current(),
            conn: Mutex::new(None),
            alive,
            changes,
        })
    }

    /// For each conversation, the users watching it on other live nodes:
    /// one round trip for all of them (two when a node is new).
    fn elsewhere(&self, convs: &[ConversationId]) -> redis::RedisResult<Vec<HashSet<String>>> {
        let cached = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let alive = self.alive.clone();
        let node = self.node;
        self.rt.block_on(async {
            let mut conn = match cached {
                Some(conn) => conn,
                None => {
                    let conn =
                        tokio::time::timeout(ASK_TIMEOUT, self.client.get_multiplexed_async_connection())
                            .await
                            .map_err(|_| timed_out())??;
                    *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
                    conn
                }
            };
            let asked = async {
                let mut pipe = redis::pipe();
                for c in convs {
                    pipe.cmd("HKEYS").arg(watchers_key(*c));
                }
                let answers: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
                // (node, user, field) per conversation.
                let mut watching: Vec<Vec<(u64, String, String)>> = Vec::with_capacity(convs.len());
                for fields in answers {
                    let mut w = Vec::new();
                    for f in fields {
                        let Some((n, user)) = f.split_once(':') else {
                            continue;
                        };
                        let Ok(n) = u64::from_str_radix(n, 16) else {
                            continue;
                        };
                        // This node's own sockets: the hub knows them better.
                        if n != node {
                            w.push((n, user.to_string(), f.clone()));
                        }
                    }
                    watching.push(w);
                }
                // Nodes not alive at the last renewal may have started since:
                // asked about directly, and only those whose key is gone are
                // dead (their fields are deleted).
                let mut unknown: Vec<u64> = {
                    let alive = alive.read().unwrap_or_else(|p| p.into_inner());
                    watching
                        .iter()
                        .flatten()
                        .map(|w| w.0)
                        .filter(|n| !alive.contains(n))
                        .collect()
                };
                unknown.sort_unstable();
                unknown.dedup();
                let mut dead = HashSet::new();
                if !unknown.is_empty() {
                    let mut get = redis::cmd("MGET");
                    for n in &unknown {
                        get.arg(node_key(*n));
                    }
                    let values: Vec<Option<String>> = get.query_async(&mut conn).await?;
                    let mut alive = alive.write().unwrap_or_else(|p| p.into_inner());
                    for (n, v) in unknown.iter().zip(values) {
                        if v.is_some() {
                            alive.insert(*n);
                        } else {
                            dead.insert(*n);
                        }
                    }
                }
                Ok::<_, redis::RedisError>((watching, dead))
            };
            let (watching, dead) = tokio::time::timeout(ASK_TIMEOUT, asked)
                .await
                .map_err(|_| timed_out())??;
            let mut out = Vec::with_capacity(convs.len());
            for (c, w) in convs.iter().zip(watching) {
                let mut users = HashSet::new();
                for (n, user, field) in w {
                    if dead.contains(&n) {
                        let _ = self.changes.send(Change::Forget(*c, field));
                    } else {
                        users.insert(user);
                    }
                }
                out.push(users);
            }
            Ok(out)
        })
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer",
    ))
}

impl Presence for ClusterPresence {
    fn absent(
        &self,
        conversation: ConversationId,
        participants: &[Arc<str>],
        sender: &str,
    ) -> SmallVec<[Arc<str>; 4]> {
        let ask = Ask {
            conversation,
            participants,
            sender,
        };
        self.absent_each(std::slice::from_ref(&ask))
            .pop()
            .unwrap_or_default()
    }

    /// Absent here first (the hub); only conversations where someone is
    /// are asked of Redis, all in one round trip.
    fn absent_each(&self, asks: &[Ask<'_>]) -> Vec<SmallVec<[Arc<str>; 4]>> {
        let mut out: Vec<SmallVec<[Arc<str>; 4]>> = asks
            .iter()
            .map(|a| self.hub.absent(a.conversation, a.participants, a.sender))
            .collect();
        let mut convs: Vec<ConversationId> = asks
            .iter()
            .zip(&out)
            .filter(|(_, absent)| !absent.is_empty())
            .map(|(a, _)| a.conversation)
            .collect();
        if convs.is_empty() {
            return out;
        }
        convs.sort_unstable();
        convs.dedup();
        match self.elsewhere(&convs) {
            Ok(watching) => {
                for (a, absent) in asks.iter().zip(out.iter_mut()) {
                    if let Ok(i) = convs.binary_search(&a.conversation) {
                        absent.retain(|u| !watching[i].contains(&**u));
                    }
                }
            }
            Err(e) => {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::warn!(
                    "cannot ask Redis who watches {} conversations: {e}; notifying",
                    convs.len()
                );
            }
        }
        out
    }
}

/// Writes this node's share of presence, renews its key every second,
/// reads which nodes are alive, and writes everything again on every new
/// connection (Redis may have restarted empty).
async fn write(
    hub: Arc<Hub>,
    node: u64,
    client: redis::Client,
    mut rx: mpsc::UnboundedReceiver<Change>,
    alive: Arc<RwLock<HashSet<u64>>>,
) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut tick = tokio::time::interval(RENEW_EVERY);
    let mut queued = Vec::new();
    loop {
        let renew = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => { queued.push(c); false }
                None => return,
            },
            _ = tick.tick() => true,
        };
        while let Ok(c) = rx.try_recv() {
            queued.push(c);
        }
        let mut pipe = redis::pipe();
        if conn.is_none() {
            match tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection()).await {
                Ok(Ok(c)) => {
                    conn = Some(c);
                    // Everything again: this connection may be to a Redis
                    // that forgot it (and what is queued is in it).
                    queued.clear();
                    for (c, user) in hub.watching() {
                        queued.push(Change::Watch(c, user, true));
                    }
                }
                _ => {
                    queued.clear();
                    continue;
                }
            }
        }
        for c in queued.drain(..) {
            match c {
                Change::Watch(c, user, true) => {
                    pipe.cmd("HSET")
                        .arg(watchers_key(c))
                        .arg(watch_field(node, &user))
                        .arg(1)
                        .ignore();
                }
                Change::Watch(c, user, false) => {
                    pipe.cmd("HDEL")
                        .arg(watchers_key(c))
                        .arg(watch_field(node, &user))
                        .ignore();
                }
                Change::Forget(c, field) => {
                    pipe.cmd("HDEL").arg(watchers_key(c)).arg(field).ignore();
                }
            }
        }
        if renew {
            pipe.cmd("SET")
                .arg(node_key(node))
                .arg(1)
                .arg("PX")
                .arg(NODE_TTL_MS)
                .ignore();
            pipe.cmd("SADD").arg(NODES).arg(format!("{node:x}")).ignore();
        }
        let c = conn.as_mut().expect("connected above");
        let done = tokio::time::timeout(TIMEOUT, pipe.query_async::<()>(c)).await;
        if !matches!(done, Ok(Ok(()))) {
            tracing::warn!("writing presence to Redis failed; writing it all again once connected");
            conn = None;
            continue;
        }
        if renew {
            match tokio::time::timeout(TIMEOUT, live_nodes(c)).await {
                Ok(Ok(nodes)) => *alive.write().unwrap_or_else(|p| p.into_inner()) = nodes,
                _ => conn = None,
            }
        }
    }
}

/// The nodes whose key is there; forgets the others.
async fn live_nodes(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<HashSet<u64>> {
    let members: Vec<String> = redis::cmd("SMEMBERS").arg(NODES).query_async(conn).await?;
    if members.is_empty() {
        return Ok(HashSet::new());
    }
    let mut get = redis::cmd("MGET");
    for m in &members {
        if let Ok(n) = u64::from_str_radix(m, 16) {
            get.arg(node_key(n));
        } else {
            get.arg(format!("parley:node:{m}"));
        }
    }
    let values: Vec<Option<String>> = get.query_async(conn).await?;
    let mut alive = HashSet::new();
    for (m, v) in members.iter().zip(values) {
        match (u64::from_str_radix(m, 16), v) {
            (Ok(n), Some(_)) => {
                alive.insert(n);
            }
            _ => {
                let _: redis::RedisResult<()> = redis::cmd("SREM").arg(NODES).arg(m).query_async(conn).await;
            }
        }
    }
    Ok(alive)
}
