//! PostgreSQL as the system of record (cluster mode, `--database-url`):
//! every node of a cluster reads and writes the same database, so nothing
//! of the record is kept on a node.
//!
//! Reads are one query each on a pooled connection. A write group is one
//! transaction (`group.rs`), committed with `synchronous_commit` on: the
//! group is acknowledged only once PostgreSQL has it on disk, and one
//! commit serves every write of the group (group commit per node).
//!
//! Order across nodes comes from locks taken when a group begins, in one
//! order on every node (conversation rows by id, then users by key), never
//! from anything of ours: a conversation's event log positions and message
//! ids are issued under its row lock, a user's notification ids under the
//! user's advisory lock, so both increase in commit order whichever node
//! wrote them.
//!
//! The schema is versioned SQL in `migrations/`, applied at start by
//! refinery under an advisory lock, so nodes starting together apply it
//! once. A background task pings the database every second: while it does
//! not answer, [`Store::writable`] says so (`/healthz` 503, writes refused
//! without trying) and it clears by itself when the database answers again.

mod group;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::*;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The advisory lock the migrations run under ("parley" in ASCII).
const MIGRATION_LOCK: i64 = 0x7061_726c_6579;
/// Longest wait for the database in any one operation: beyond it the
/// operation fails (a write is refused, a read answers 503).
const TIMEOUT: Duration = Duration::from_secs(5);
/// How often the health task asks the database whether it answers.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Connections per node: a group in flight, the next one, and reads.
const POOL_SIZE: usize = 16;

/// The PostgreSQL backend. Cheap to share: the pool is behind an `Arc`.
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// The runtime the pool's connections run on: the sequencer thread,
    /// which is not one of its threads, blocks on it.
    rt: tokio::runtime::Handle,
    /// Set while the database does not answer (the health task, or a
    /// group that lost its connection); cleared by the health task.
    down: AtomicBool,
    /// What else writes need (a cluster node: its bus subscription).
    also: std::sync::OnceLock<Requirement>,
    /// Conversations read so far. A conversation never changes once
    /// created, so every node may keep it: an upgrade's checks (exists, a
    /// participant) then cost the database nothing, which matters when a
    /// dead node's clients all reconnect at once. Bounded; not-found is
    /// never kept (another node may create it next).
    conversations: dashmap::DashMap<ConversationId, Arc<Conversation>>,
}

/// Conversations kept per node; past it the cache starts over.
const CONVERSATIONS_KEPT: usize = 100_000;

impl Inner {
    fn remember(&self, c: &Conversation) {
        if self.conversations.len() >= CONVERSATIONS_KEPT {
            self.conversations.clear();
        }
        self.conversations.insert(c.id, Arc::new(c.clone()));
    }
}

/// A condition writes need besides the database itself.
pub type Requirement = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// A database error, kept whole.
fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::io(e)
}

fn timed_out() -> StoreError {
    StoreError::io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("PostgreSQL did not answer within {TIMEOUT:?}"),
    ))
}

impl PgStore {
    /// Connects, applies the migrations not yet applied, starts the pool
    /// and the health task. Called from the runtime the server runs on.
    pub async fn open(url: &str) -> Result<PgStore> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::open("--database-url is not a PostgreSQL URL".into(), e))?;
        // Acknowledged means on PostgreSQL's disk, whatever the server's
        // default: a write is answered only after its commit returns.
        let options = match config.get_options() {
            Some(o) => format!("{o} -c synchronous_commit=on"),
            None => "-c synchronous_commit=on".to_string(),
        };
        config.options(&options);
        config.application_name("parley");
        config.connect_timeout(TIMEOUT);
        migrate(&config).await?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(|e| StoreError::open("cannot build the PostgreSQL pool".into(), e))?;
        let inner = Arc::new(Inner {
            pool,
            rt: tokio::runtime::Handle::current(),
            down: AtomicBool::new(false),
            also: std::sync::OnceLock::new(),
            conversations: dashmap::DashMap::new(),
        });
        tokio::spawn(watch(Arc::downgrade(&inner)));
        Ok(PgStore { inner })
    }

    /// Makes writes (and `/healthz`) need `also` too: a cluster node takes
    /// no writes while it cannot hear the other nodes. Set once.
    pub fn require(&self, also: Requirement) {
        let _ = self.inner.also.set(also);
    }

    /// Runs a query on a pooled connection, on the store's runtime (a read
    /// may come from a thread that is not one of its threads).
    async fn query(&self, sql: &'static str, params: Vec<Box<dyn ToSql + Send + Sync>>) -> Result<Vec<Row>> {
        let inner = self.inner.clone();
        let task = self.inner.rt.spawn(async move {
            let run = async {
                let client = inner.pool.get().await.map_err(StoreError::io)?;
                let statement = client.prepare_cached(sql).await.map_err(pg)?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
                client.query(&statement, &refs).await.map_err(pg)
            };
            tokio::time::timeout(TIMEOUT, run)
                .await
                .unwrap_or_else(|_| Err(timed_out()))
        });
        task.await.map_err(StoreError::io)?
    }
}

/// Applies the migrations under a session advisory lock: a node that starts
/// while another migrates waits, then finds nothing left to apply.
async fn migrate(config: &tokio_postgres::Config) -> Result<()> {
    let (mut client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| StoreError::open("cannot connect to PostgreSQL (--database-url)".into(), e))?;
    let driver = tokio::spawn(connection);
    let open = |what: &str, e: tokio_postgres::Error| StoreError::open(format!("migrations: {what}"), e);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| open("cannot take the lock", e))?;
    let applied = embedded::migrations::runner().run_async(&mut client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = driver.await;
    match applied {
        Ok(report) => {
            for m in report.applied_migrations() {
                tracing::info!("applied migration {}", m);
            }
            Ok(())
        }
        Err(e) => Err(StoreError::open("cannot apply the schema migrations".into(), e)),
    }
}

/// Pings the database every second while the store lives, and keeps
/// `down` true exactly while it does not answer.
async fn watch(store: Weak<Inner>) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(inner) = store.upgrade() else { return };
        let ping = async {
            let client = inner.pool.get().await.map_err(StoreError::io)?;
            client.simple_query("SELECT 1").await.map_err(pg)
        };
        let answered = tokio::time::timeout(TIMEOUT, ping).await;
        let ok = matches!(answered, Ok(Ok(_)));
        let was_down = inner.down.swap(!ok, Ordering::Relaxed);
        match (was_down, ok) {
            (false, false) => {
                let why = match answered {
                    Ok(Err(e)) => e.chain(),
                    _ => timed_out().chain(),
                };
                tracing::error!("PostgreSQL does not answer; writes are refused until it does: {why}");
            }
            (true, true) => tracing::info!("PostgreSQL answers again; writes resume"),
            _ => {}
        }
    }
}

fn key(v: u64) -> i64 {
    v as i64
}

/// Text a user wrote, stored as its UTF-8 bytes (PostgreSQL's `text`
/// cannot hold U+0000). parley wrote them from a `String`, so they are
/// UTF-8; anything else would show replacement characters, never fail.
pub(super) fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn conversation_from(r: &Row) -> Conversation {
    Conversation {
        id: ConversationId(r.get::<_, i64>(0) as u64),
        title: r.get::<_, Option<Vec<u8>>>(1).map(text),
        participants: r.get(2),
        created_at: Micros(r.get::<_, i64>(3) as u64),
    }
}

/// Columns: id, conversation, sender, content, created_at, edited, deleted, seq.
fn message_from(r: &Row) -> Message {
    Message {
        id: MessageId(r.get::<_, i64>(0) as u64),
        conversation: ConversationId(r.get::<_, i64>(1) as u64),
        sender: r.get(2),
        content: text(r.get(3)),
        timestamp: Micros(r.get::<_, i64>(4) as u64),
        edited: r.get(5),
        deleted: r.get(6),
        seq: Seq(r.get::<_, i64>(7) as u64),
    }
}

/// Columns: id, user_name, message, is_read, created_at.
fn notification_from(r: &Row) -> Notification {
    Notification {
        id: NotificationId(r.get::<_, i64>(0) as u64),
        user: r.get(1),
        message: text(r.get(2)),
        is_read: r.get(3),
        timestamp: Micros(r.get::<_, i64>(4) as u64),
    }
}

fn kind_code(kind: EventKind) -> i16 {
    match kind {
        EventKind::Created => 0,
        EventKind::Edited => 1,
        EventKind::Deleted => 2,
    }
}

fn kind_from(code: i16) -> Result<EventKind> {
    match code {
        0 => Ok(EventKind::Created),
        1 => Ok(EventKind::Edited),
        2 => Ok(EventKind::Deleted),
        other => Err(StoreError::Corrupt(format!("an event of unknown kind {other}"))),
    }
}

const CONVERSATION: &str = "SELECT id, title, participants, created_at FROM conversations WHERE id = $1";

macro_rules! params {
    ($($p:expr),* $(,)?) => {
        vec![$(Box::new($p) as Box<dyn ToSql + Send + Sync>),*]
    };
}

#[async_trait]
impl Store for PgStore {
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        if let Some(c) = self.inner.conversations.get(&id) {
            return Ok(Some(Conversation::clone(&c)));
        }
        let rows = self.query(CONVERSATION, params![key(id.0)]).await?;
        let found = rows.first().map(conversation_from);
        if let Some(c) = &found {
            self.inner.remember(c);
        }
        Ok(found)
    }
    async fn conversation_exists(&self, id: ConversationId) -> Result<bool> {
        Ok(self.conversation(id).await?.is_some())
    }
    async fn is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool> {
        Ok(self
            .conversation(conversation)
            .await?
            .is_some_and(|c| c.participants.iter().any(|p| p == user)))
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>> {
        let rows = self
            .query(
                "SELECT c.id, c.title, c.participants, c.created_at FROM participants p \
                 JOIN conversations c ON c.id = p.conversation WHERE p.user_name = $1 ORDER BY c.id",
                params![user.to_string()],
            )
            .await?;
        Ok(rows.iter().map(conversation_from).collect())
    }
    async fn message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        const SQL: &str = "SELECT id, conversation, sender, content, created_at, edited, deleted, seq FROM messages WHERE id = $1 AND conversation = $2";
        let rows = self.query(SQL, params![key(id.0), key(conversation.0)]).await?;
        Ok(rows.first().map(message_from))
    }
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>> {
        const SQL: &str = "SELECT id, conversation, sender, content, created_at, edited, deleted, seq FROM messages WHERE conversation = $1 AND id < $2 AND NOT deleted ORDER BY id DESC LIMIT $3";
        let before = before.map_or(i64::MAX, |b| key(b.0));
        let rows = self
            .query(SQL, params![key(conversation.0), before, limit as i64 + 1])
            .await?;
        Ok(Page::cut(rows.iter().map(message_from).collect(), limit, |m| {
            m.id.0
        }))
    }
    async fn events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>> {
        let rows = self
            .query(
                "SELECT seq, kind, message, payload FROM events \
                 WHERE conversation = $1 AND seq > $2 ORDER BY seq DESC LIMIT $3",
                params![key(conversation.0), key(after.0), max as i64 + 1],
            )
            .await?;
        let truncated = rows.len() > max;
        let mut items = Vec::with_capacity(rows.len().min(max));
        for r in rows.iter().take(max).rev() {
            items.push(LoggedEvent {
                seq: Seq(r.get::<_, i64>(0) as u64),
                kind: kind_from(r.get(1))?,
                message: MessageId(r.get::<_, i64>(2) as u64),
                payload: Bytes::from(r.get::<_, Vec<u8>>(3)),
            });
        }
        if !truncated {
            return Ok(Replay {
                truncated_after: None,
                items,
            });
        }
        // The newest message created before the replayed window, looking
        // back past `after` too (0 when there is none).
        let first = items.first().map_or(u64::MAX, |e| e.seq.0);
        let before = self
            .query(
                "SELECT message FROM events WHERE conversation = $1 AND seq < $2 AND kind = 0 \
                 ORDER BY seq DESC LIMIT 1",
                params![key(conversation.0), key(first)],
            )
            .await?;
        Ok(Replay {
            truncated_after: Some(before.first().map_or(0, |r| r.get::<_, i64>(0) as u64)),
            items,
        })
    }
    async fn notification(&self, id: NotificationId) -> Result<Option<Notification>> {
        const SQL: &str =
            "SELECT id, user_name, message, is_read, created_at FROM notifications WHERE id = $1";
        let rows = self.query(SQL, params![key(id.0)]).await?;
        Ok(rows.first().map(notification_from))
    }
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        const ALL: &str = "SELECT id, user_name, message, is_read, created_at FROM notifications WHERE user_name = $1 AND id < $2 ORDER BY id DESC LIMIT $3";
        const UNREAD: &str = "SELECT id, user_name, message, is_read, created_at FROM notifications WHERE user_name = $1 AND id < $2 AND NOT is_read ORDER BY id DESC LIMIT $3";
        let before = before.map_or(i64::MAX, |b| key(b.0));
        let sql = if unread_only { UNREAD } else { ALL };
        let rows = self
            .query(sql, params![user.to_string(), before, limit as i64 + 1])
            .await?;
        Ok(Page::cut(
            rows.iter().map(notification_from).collect(),
            limit,
            |n| n.id.0,
        ))
    }
    async fn unread_count(&self, user: &str) -> Result<u64> {
        let rows = self
            .query(
                "SELECT count(*) FROM notifications WHERE user_name = $1 AND NOT is_read",
                params![user.to_string()],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }
    async fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>> {
        const SQL: &str = "SELECT id, user_name, message, is_read, created_at FROM notifications WHERE user_name = $1 AND id > $2 ORDER BY id DESC LIMIT $3";
        let rows = self
            .query(SQL, params![user.to_string(), key(after.0), max as i64 + 1])
            .await?;
        let truncated_after = rows.get(max).map(|r| r.get::<_, i64>(0) as u64);
        let items = rows.iter().take(max).rev().map(notification_from).collect();
        Ok(Replay {
            truncated_after,
            items,
        })
    }

    async fn last_seq(&self, conversation: ConversationId) -> Result<Seq> {
        let rows = self
            .query(
                "SELECT last_seq FROM conversations WHERE id = $1",
                params![key(conversation.0)],
            )
            .await?;
        Ok(Seq(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64)))
    }
    async fn last_notification(&self, user: &str) -> Result<NotificationId> {
        let rows = self
            .query(
                "SELECT max(id) FROM notifications WHERE user_name = $1",
                params![user.to_string()],
            )
            .await?;
        let newest: Option<i64> = rows.first().and_then(|r| r.get(0));
        Ok(NotificationId(newest.unwrap_or(0) as u64))
    }

    fn writable(&self) -> Result<()> {
        if self.inner.down.load(Ordering::Relaxed) {
            return Err(StoreError::Unreachable("PostgreSQL"));
        }
        match self.inner.also.get() {
            Some(also) => also(),
            None => Ok(()),
        }
    }

    fn begin(&self) -> Result<Box<dyn Group + '_>> {
        self.begin_planned(&Plan::default())
    }

    fn begin_planned(&self, plan: &Plan) -> Result<Box<dyn Group + '_>> {
        Ok(Box::new(group::PgGroup::begin(self.inner.clone(), plan)?))
    }

    /// Every acknowledged group is committed in PostgreSQL already.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
