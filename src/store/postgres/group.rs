//! One write group, one PostgreSQL transaction.
//!
//! Begun with its [`Plan`]: one pipelined round trip takes the row locks of
//! the conversations it writes to (sorted by id, on every node), reads
//! what it will edit or mark read, and takes the ids of its new messages
//! (after the locks, so they increase in commit order within each
//! conversation). When the sequencer knows whose notifications it creates,
//! a second round trip takes those users' advisory locks (sorted by key)
//! and their notification ids. Handling then needs no round trip: every
//! read is answered from what the group holds, its own changes included.
//! The commit is a last pipelined round trip: every insert and update of the
//! group, then `COMMIT`; it runs on the runtime while the sequencer handles
//! the next group ([`Group::start_commit`]).
//!
//! Anything a group touches that its plan did not name is read or locked
//! as it comes (one round trip each): correct, but two nodes doing so in
//! opposite orders would wait on each other until PostgreSQL breaks the
//! deadlock, which is why the sequencer always plans.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::*;

/// More users than this in one group take one lock for every user at once
/// (PostgreSQL's lock table is shared and small: a few thousand entries).
const MAX_USER_LOCKS: usize = 64;

const BEGIN: &str = "BEGIN";
const COMMIT: &str = "COMMIT";
const LOCK_CONVERSATIONS: &str = "SELECT id, title, participants, created_at, last_seq FROM conversations \
     WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";
const MESSAGES: &str = "SELECT id, conversation, sender, content, created_at, edited, deleted, seq \
     FROM messages WHERE id = ANY($1)";
const NOTIFICATIONS: &str =
    "SELECT id, user_name, message, is_read, created_at FROM notifications WHERE id = ANY($1)";
const UNREAD: &str = "SELECT id, user_name, message, is_read, created_at FROM notifications \
     WHERE user_name = ANY($1) AND NOT is_read ORDER BY id";
const MESSAGE_IDS: &str = "SELECT nextval('message_ids') FROM generate_series(1, $1::int)";
const NOTIFICATION_IDS: &str = "SELECT nextval('notification_ids') FROM generate_series(1, $1::int)";
/// Each user's newest notification, read under the user's lock.
const LAST_NOTIFICATIONS: &str = "SELECT u, (SELECT max(id) FROM notifications WHERE user_name = u) \
     FROM unnest($1::text[]) AS u";
const CONVERSATION_ID: &str = "SELECT nextval('conversation_ids')";
/// Taken shared by a group that locks users one by one, exclusive by one
/// that locks them all: the two never overlap.
const ALL_USERS_SHARED: &str = "SELECT pg_advisory_xact_lock_shared(2, 0)";
const ALL_USERS: &str = "SELECT pg_advisory_xact_lock(2, 0)";
/// One advisory lock per user, in key order (two users sharing a key only
/// wait on each other a little more).
const LOCK_USERS: &str = "SELECT pg_advisory_xact_lock(1, h) \
     FROM (SELECT DISTINCT hashtext(u) AS h FROM unnest($1::text[]) AS u ORDER BY h) AS s";

const INSERT_CONVERSATION: &str =
    "INSERT INTO conversations (id, title, participants, created_at, last_seq) VALUES ($1, $2, $3, $4, $5)";
const INSERT_PARTICIPANTS: &str = "INSERT INTO participants (user_name, conversation) \
     SELECT u, $2 FROM unnest($1::text[]) AS u ON CONFLICT DO NOTHING";
/// Every row a group writes, in one statement (each part does nothing
/// when its arrays are empty): one statement to plan and run per group.
const WRITE_GROUP: &str = "WITH \
     m AS (INSERT INTO messages (id, conversation, sender, content, created_at, edited, deleted, seq) \
       SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::bytea[], $5::int8[], $6::bool[], $7::bool[], $8::int8[]) \
       ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content, edited = EXCLUDED.edited, deleted = EXCLUDED.deleted), \
     e AS (INSERT INTO events (conversation, seq, kind, message, payload) \
       SELECT * FROM unnest($9::int8[], $10::int8[], $11::int2[], $12::int8[], $13::bytea[])), \
     n AS (INSERT INTO notifications (id, user_name, message, is_read, created_at) \
       SELECT * FROM unnest($14::int8[], $15::text[], $16::bytea[], $17::bool[], $18::int8[]) \
       ON CONFLICT (id) DO UPDATE SET is_read = EXCLUDED.is_read), \
     s AS (UPDATE conversations AS c SET last_seq = d.s \
       FROM unnest($19::int8[], $20::int8[]) AS d (id, s) WHERE c.id = d.id) \
     SELECT 1";

type Step<'a, T> = Pin<Box<dyn Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'a>>;

/// A conversation the group holds the lock of (or created).
struct Held {
    conversation: Conversation,
    last_seq: u64,
    /// Created by this group: inserted, not updated.
    new: bool,
    /// Its `last_seq` moved.
    moved: bool,
}

pub(super) struct PgGroup {
    inner: Arc<Inner>,
    /// The connection the transaction is open on; `None` once committed.
    client: Option<Object>,
    held: HashMap<ConversationId, Held>,
    /// Every message, notification and unread list the group has read or
    /// written, as the group leaves it.
    messages: HashMap<MessageId, Message>,
    notifications: HashMap<NotificationId, Notification>,
    unread: HashMap<String, BTreeSet<NotificationId>>,
    message_ids: VecDeque<u64>,
    notification_ids: VecDeque<u64>,
    /// The newest notification of each user named to `notifying`, before
    /// this group.
    before: HashMap<String, u64>,
    /// What the commit writes, in the order it was applied.
    new_conversations: Vec<ConversationId>,
    changed_messages: Vec<MessageId>,
    changed_notifications: Vec<NotificationId>,
    events: Events,
}

#[derive(Default)]
struct Events {
    conversation: Vec<i64>,
    seq: Vec<i64>,
    kind: Vec<i16>,
    message: Vec<i64>,
    payload: Vec<Vec<u8>>,
}

/// Runs `f` on the store's runtime from the sequencer thread, bounded.
fn block<T>(inner: &Inner, f: impl Future<Output = Result<T>>) -> Result<T> {
    let r = inner.rt.block_on(async {
        tokio::time::timeout(TIMEOUT, f)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    });
    if let Err(StoreError::Io(e)) = &r {
        // A lost connection or no answer (not an error PostgreSQL
        // reported): writes are refused until the health task hears from it.
        let reported = e
            .downcast_ref::<tokio_postgres::Error>()
            .is_some_and(|e| e.as_db_error().is_some());
        if !reported {
            inner.down.store(true, Ordering::Relaxed);
        }
    }
    r
}

fn ids(rows: &[Row]) -> VecDeque<u64> {
    rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect()
}

impl PgGroup {
    pub(super) fn begin(inner: Arc<Inner>, plan: &Plan) -> Result<PgGroup> {
        let mut conversations: Vec<i64> = plan.conversations.iter().map(|c| key(c.0)).collect();
        conversations.sort_unstable();
        conversations.dedup();
        let messages: Vec<i64> = plan.messages.iter().map(|(_, m)| key(m.0)).collect();
        let notifications: Vec<i64> = plan.notifications.iter().map(|n| key(n.0)).collect();
        let mut unread_of = plan.unread.clone();
        unread_of.sort_unstable();
        unread_of.dedup();
        let new_messages = plan.new_messages as i32;
        let pool = inner.pool.clone();
        let (client, rows) = block(&inner, async move {
            let client = pool.get().await.map_err(StoreError::io)?;
            let rows = begin(
                &client,
                &conversations,
                &messages,
                &notifications,
                &unread_of,
                new_messages,
            )
            .await
            .map_err(pg);
            match rows {
                Ok(rows) => Ok((client, rows)),
                Err(e) => {
                    // Never back into the pool with a transaction open.
                    drop(Object::take(client));
                    Err(e)
                }
            }
        })?;
        let mut g = PgGroup {
            inner,
            client: Some(client),
            held: HashMap::new(),
            messages: HashMap::new(),
            notifications: HashMap::new(),
            unread: HashMap::new(),
            message_ids: VecDeque::new(),
            notification_ids: VecDeque::new(),
            before: HashMap::new(),
            new_conversations: Vec::new(),
            changed_messages: Vec::new(),
            changed_notifications: Vec::new(),
            events: Events::default(),
        };
        for (step, rows) in rows {
            match step {
                Begun::Conversations => {
                    for r in &rows {
                        g.hold(r);
                    }
                }
                Begun::Messages => {
                    for r in &rows {
                        let m = message_from(r);
                        g.messages.insert(m.id, m);
                    }
                }
                Begun::Notifications => {
                    for r in &rows {
                        let n = notification_from(r);
                        g.notifications.insert(n.id, n);
                    }
                }
                Begun::Unread(users) => {
                    for u in users {
                        g.unread.entry(u).or_default();
                    }
                    for r in &rows {
                        let n = notification_from(r);
                        g.unread.entry(n.user.clone()).or_default().insert(n.id);
                        g.notifications.insert(n.id, n);
                    }
                }
                Begun::MessageIds => g.message_ids = ids(&rows),
            }
        }
        Ok(g)
    }

    /// A locked conversation row: its columns, then `last_seq`.
    fn hold(&mut self, r: &Row) {
        let conversation = conversation_from(r);
        self.held.insert(
            conversation.id,
            Held {
                last_seq: r.get::<_, i64>(4) as u64,
                conversation,
                new: false,
                moved: false,
            },
        );
    }

    fn client(&self) -> Result<&Object> {
        self.client.as_ref().ok_or(StoreError::Failed)
    }

    /// One statement now, in the transaction (what the plan did not name).
    fn query(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let client = self.client()?;
        block(&self.inner, async {
            let statement = client.prepare_cached(sql).await.map_err(pg)?;
            client.query(&statement, params).await.map_err(pg)
        })
    }

    fn put_notification(&mut self, n: &Notification) {
        if let Some(unread) = self.unread.get_mut(&n.user) {
            if n.is_read {
                unread.remove(&n.id);
            } else {
                unread.insert(n.id);
            }
        }
        if self
            .notifications
            .insert(n.id, n.clone())
            .is_none_or(|old| old != *n)
        {
            self.changed_notifications.push(n.id);
        }
    }

    /// Everything the commit writes, owned, so that it can run on the
    /// runtime while the sequencer goes on.
    fn writes(&mut self) -> Writes {
        let mut w = Writes::default();
        for id in &self.new_conversations {
            let h = &self.held[id];
            let c = &h.conversation;
            w.conversations.push((
                key(c.id.0),
                c.title.as_ref().map(|t| t.as_bytes().to_vec()),
                c.participants.clone(),
                c.created_at.0 as i64,
                h.last_seq as i64,
            ));
        }
        for (id, h) in &self.held {
            if h.moved && !h.new {
                w.seq_ids.push(key(id.0));
                w.seqs.push(h.last_seq as i64);
            }
        }
        let mut seen = HashSet::new();
        for id in &self.changed_messages {
            if !seen.insert(*id) {
                continue;
            }
            let m = &self.messages[id];
            w.m_id.push(key(m.id.0));
            w.m_conversation.push(key(m.conversation.0));
            w.m_sender.push(m.sender.clone());
            w.m_content.push(m.content.as_bytes().to_vec());
            w.m_at.push(m.timestamp.0 as i64);
            w.m_edited.push(m.edited);
            w.m_deleted.push(m.deleted);
            w.m_seq.push(m.seq.0 as i64);
        }
        let mut seen = HashSet::new();
        for id in &self.changed_notifications {
            if !seen.insert(*id) {
                continue;
            }
            let n = &self.notifications[id];
            w.n_id.push(key(n.id.0));
            w.n_user.push(n.user.clone());
            w.n_message.push(n.message.as_bytes().to_vec());
            w.n_read.push(n.is_read);
            w.n_at.push(n.timestamp.0 as i64);
        }
        w.events = std::mem::take(&mut self.events);
        w
    }
}

/// What the begin round trip read, by statement.
enum Begun {
    Conversations,
    Messages,
    Notifications,
    Unread(Vec<String>),
    MessageIds,
}

/// `BEGIN`, the conversation locks, the reads and the message ids, in one
/// pipelined round trip, in this order (the ids after the locks).
async fn begin(
    client: &Object,
    conversations: &Vec<i64>,
    messages: &Vec<i64>,
    notifications: &Vec<i64>,
    unread_of: &Vec<String>,
    new_messages: i32,
) -> std::result::Result<Vec<(Begun, Vec<Row>)>, tokio_postgres::Error> {
    let begin = client.prepare_cached(BEGIN).await?;
    let lock = client.prepare_cached(LOCK_CONVERSATIONS).await?;
    let read_messages = client.prepare_cached(MESSAGES).await?;
    let read_notifications = client.prepare_cached(NOTIFICATIONS).await?;
    let read_unread = client.prepare_cached(UNREAD).await?;
    let message_ids = client.prepare_cached(MESSAGE_IDS).await?;
    let p_conversations: [&(dyn ToSql + Sync); 1] = [conversations];
    let p_messages: [&(dyn ToSql + Sync); 1] = [messages];
    let p_notifications: [&(dyn ToSql + Sync); 1] = [notifications];
    let p_unread: [&(dyn ToSql + Sync); 1] = [unread_of];
    let p_ids: [&(dyn ToSql + Sync); 1] = [&new_messages];
    let mut kinds = Vec::new();
    let mut steps: Vec<Step<'_, Vec<Row>>> = vec![Box::pin(client.query(&begin, &[]))];
    if !conversations.is_empty() {
        steps.push(Box::pin(client.query(&lock, &p_conversations)));
        kinds.push(Begun::Conversations);
    }
    if !messages.is_empty() {
        steps.push(Box::pin(client.query(&read_messages, &p_messages)));
        kinds.push(Begun::Messages);
    }
    if !notifications.is_empty() {
        steps.push(Box::pin(client.query(&read_notifications, &p_notifications)));
        kinds.push(Begun::Notifications);
    }
    if !unread_of.is_empty() {
        steps.push(Box::pin(client.query(&read_unread, &p_unread)));
        kinds.push(Begun::Unread(unread_of.clone()));
    }
    if new_messages > 0 {
        steps.push(Box::pin(client.query(&message_ids, &p_ids)));
        kinds.push(Begun::MessageIds);
    }
    let mut results = futures_util::future::try_join_all(steps).await?.into_iter();
    results.next(); // BEGIN
    Ok(kinds.into_iter().zip(results).collect())
}

/// A conversation row: id, title, participants, created at, last seq.
type NewConversation = (i64, Option<Vec<u8>>, Vec<String>, i64, i64);

/// What a commit writes, as the columns PostgreSQL takes them in.
#[derive(Default)]
struct Writes {
    conversations: Vec<NewConversation>,
    seq_ids: Vec<i64>,
    seqs: Vec<i64>,
    m_id: Vec<i64>,
    m_conversation: Vec<i64>,
    m_sender: Vec<String>,
    m_content: Vec<Vec<u8>>,
    m_at: Vec<i64>,
    m_edited: Vec<bool>,
    m_deleted: Vec<bool>,
    m_seq: Vec<i64>,
    events: Events,
    n_id: Vec<i64>,
    n_user: Vec<String>,
    n_message: Vec<Vec<u8>>,
    n_read: Vec<bool>,
    n_at: Vec<i64>,
}

/// Every write of the group, then `COMMIT`, in one pipelined round trip.
async fn commit(client: &Object, w: &Writes) -> std::result::Result<(), tokio_postgres::Error> {
    let insert_conversation = client.prepare_cached(INSERT_CONVERSATION).await?;
    let insert_participants = client.prepare_cached(INSERT_PARTICIPANTS).await?;
    let write_group = client.prepare_cached(WRITE_GROUP).await?;
    let commit = client.prepare_cached(COMMIT).await?;
    type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;
    let mut steps: Vec<Step<'_, u64>> = Vec::new();
    for (id, title, participants, at, last_seq) in &w.conversations {
        let p: Params<'_> = vec![id, title, participants, at, last_seq];
        steps.push(Box::pin(client.execute_raw(&insert_conversation, p)));
        let p: Params<'_> = vec![participants, id];
        steps.push(Box::pin(client.execute_raw(&insert_participants, p)));
    }
    let e = &w.events;
    let p: Params<'_> = vec![
        &w.m_id,
        &w.m_conversation,
        &w.m_sender,
        &w.m_content,
        &w.m_at,
        &w.m_edited,
        &w.m_deleted,
        &w.m_seq,
        &e.conversation,
        &e.seq,
        &e.kind,
        &e.message,
        &e.payload,
        &w.n_id,
        &w.n_user,
        &w.n_message,
        &w.n_read,
        &w.n_at,
        &w.seq_ids,
        &w.seqs,
    ];
    steps.push(Box::pin(client.execute_raw(&write_group, p)));
    let none: Params<'_> = Vec::new();
    steps.push(Box::pin(client.execute_raw(&commit, none)));
    futures_util::future::try_join_all(steps).await?;
    Ok(())
}

impl Group for PgGroup {
    fn conversation(&mut self, id: ConversationId) -> Result<Option<Conversation>> {
        if let Some(h) = self.held.get(&id) {
            return Ok(Some(h.conversation.clone()));
        }
        // Its participants never change: no lock needed to read them.
        let rows = self.query(CONVERSATION, &[&key(id.0)])?;
        Ok(rows.first().map(conversation_from))
    }

    fn message(&mut self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        if !self.messages.contains_key(&id) {
            let rows = self.query(MESSAGES, &[&vec![key(id.0)]])?;
            match rows.first().map(message_from) {
                Some(m) => self.messages.insert(id, m),
                None => return Ok(None),
            };
        }
        Ok(self
            .messages
            .get(&id)
            .filter(|m| m.conversation == conversation)
            .cloned())
    }

    fn notification(&mut self, id: NotificationId) -> Result<Option<Notification>> {
        if !self.notifications.contains_key(&id) {
            let rows = self.query(NOTIFICATIONS, &[&vec![key(id.0)]])?;
            match rows.first().map(notification_from) {
                Some(n) => self.notifications.insert(id, n),
                None => return Ok(None),
            };
        }
        Ok(self.notifications.get(&id).cloned())
    }

    fn unread(&mut self, user: &str) -> Result<Vec<NotificationId>> {
        if !self.unread.contains_key(user) {
            let rows = self.query(UNREAD, &[&vec![user.to_string()]])?;
            let mut set = BTreeSet::new();
            for r in &rows {
                let n = notification_from(r);
                set.insert(n.id);
                self.notifications.entry(n.id).or_insert(n);
            }
            // What the group itself holds of this user's is newer.
            for n in self.notifications.values().filter(|n| n.user == user) {
                if n.is_read {
                    set.remove(&n.id);
                } else {
                    set.insert(n.id);
                }
            }
            self.unread.insert(user.to_string(), set);
        }
        Ok(self.unread[user].iter().copied().collect())
    }

    fn next_conversation(&mut self) -> Result<ConversationId> {
        let rows = self.query(CONVERSATION_ID, &[])?;
        Ok(ConversationId(ids(&rows).pop_front().unwrap_or(0)))
    }

    fn next_message(&mut self) -> Result<MessageId> {
        if self.message_ids.is_empty() {
            self.message_ids = ids(&self.query(MESSAGE_IDS, &[&1i32])?);
        }
        self.message_ids
            .pop_front()
            .map(MessageId)
            .ok_or(StoreError::Failed)
    }

    fn next_notification(&mut self) -> Result<NotificationId> {
        if self.notification_ids.is_empty() {
            self.notification_ids = ids(&self.query(NOTIFICATION_IDS, &[&1i32])?);
        }
        self.notification_ids
            .pop_front()
            .map(NotificationId)
            .ok_or(StoreError::Failed)
    }

    fn next_seq(&mut self, conversation: ConversationId) -> Result<Seq> {
        if !self.held.contains_key(&conversation) {
            let rows = self.query(LOCK_CONVERSATIONS, &[&vec![key(conversation.0)]])?;
            match rows.first() {
                Some(r) => self.hold(r),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "an event for conversation {}, which does not exist",
                        conversation.0
                    )))
                }
            }
        }
        let h = self.held.get_mut(&conversation).ok_or(StoreError::Failed)?;
        h.last_seq += 1;
        h.moved = true;
        Ok(Seq(h.last_seq))
    }

    fn notifying(&mut self, users: &[&str], count: usize) -> Result<()> {
        let mut users: Vec<String> = users.iter().map(|u| u.to_string()).collect();
        users.sort_unstable();
        users.dedup();
        let count = count as i32;
        let client = self.client()?;
        let (last, fresh) = block(&self.inner, async {
            let ids = client.prepare_cached(NOTIFICATION_IDS).await.map_err(pg)?;
            let one_by_one = users.len() <= MAX_USER_LOCKS;
            let all = client
                .prepare_cached(if one_by_one { ALL_USERS_SHARED } else { ALL_USERS })
                .await
                .map_err(pg)?;
            let each = client.prepare_cached(LOCK_USERS).await.map_err(pg)?;
            let newest = client.prepare_cached(LAST_NOTIFICATIONS).await.map_err(pg)?;
            let p_users: [&(dyn ToSql + Sync); 1] = [&users];
            let p_count: [&(dyn ToSql + Sync); 1] = [&count];
            let mut steps: Vec<Step<'_, Vec<Row>>> = vec![Box::pin(client.query(&all, &[]))];
            if one_by_one {
                steps.push(Box::pin(client.query(&each, &p_users)));
            }
            steps.push(Box::pin(client.query(&newest, &p_users)));
            steps.push(Box::pin(client.query(&ids, &p_count)));
            let mut done = futures_util::future::try_join_all(steps).await.map_err(pg)?;
            let fresh = done.pop().unwrap_or_default();
            let last = done.pop().unwrap_or_default();
            Ok((last, fresh))
        })?;
        for r in &last {
            let newest: Option<i64> = r.get(1);
            self.before.insert(r.get(0), newest.unwrap_or(0) as u64);
        }
        self.notification_ids = ids(&fresh);
        Ok(())
    }

    fn notification_before(&mut self, user: &str) -> Option<NotificationId> {
        self.before.get(user).map(|&id| NotificationId(id))
    }

    fn apply(&mut self, change: Change<'_>) -> Result<()> {
        match change {
            Change::Conversation(c) => {
                self.held.insert(
                    c.id,
                    Held {
                        conversation: c.clone(),
                        last_seq: 0,
                        new: true,
                        moved: false,
                    },
                );
                self.new_conversations.push(c.id);
            }
            Change::Chat {
                message,
                kind,
                seq,
                payload,
                notifications,
            } => {
                self.messages.insert(message.id, message.clone());
                self.changed_messages.push(message.id);
                let e = &mut self.events;
                e.conversation.push(key(message.conversation.0));
                e.seq.push(seq.0 as i64);
                e.kind.push(kind_code(kind));
                e.message.push(key(message.id.0));
                e.payload.push(payload.to_vec());
                for n in notifications {
                    self.put_notification(n);
                }
            }
            Change::Notifications(ns) => {
                for n in ns {
                    self.put_notification(n);
                }
            }
        }
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.start_commit().wait()
    }

    fn start_commit(mut self: Box<Self>) -> Box<dyn Commit> {
        let writes = self.writes();
        let inner = self.inner.clone();
        let Some(client) = self.client.take() else {
            return Box::new(PgCommit::Done(Err(StoreError::Failed)));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let task = inner.clone();
        inner.rt.spawn(async move {
            let run = tokio::time::timeout(TIMEOUT, commit(&client, &writes)).await;
            let r = match run {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    if e.as_db_error().is_none() {
                        task.down.store(true, Ordering::Relaxed);
                    }
                    Err(pg(e))
                }
                Err(_) => {
                    task.down.store(true, Ordering::Relaxed);
                    Err(timed_out())
                }
            };
            if r.is_err() {
                // Rolled back by PostgreSQL when the connection closes.
                drop(Object::take(client));
            }
            let _ = tx.send(r);
        });
        Box::new(PgCommit::Running(rx))
    }
}

impl Drop for PgGroup {
    /// A group dropped without its commit (refused): its transaction is
    /// rolled back and the connection goes back to the pool.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.inner.rt.spawn(async move {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    drop(Object::take(client));
                }
            });
        }
    }
}

enum PgCommit {
    Running(std::sync::mpsc::Receiver<Result<()>>),
    Done(Result<()>),
}

impl Commit for PgCommit {
    fn wait(self: Box<Self>) -> Result<()> {
        match *self {
            PgCommit::Running(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(StoreError::io(std::io::Error::other("the commit task ended")))),
            PgCommit::Done(r) => r,
        }
    }
}
