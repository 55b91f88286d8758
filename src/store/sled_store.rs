//! The embedded backend: one sled tree, keys named for what they map, ids
//! big-endian so key order is id order and every page is a range scan.
//!
//! | key | value |
//! | --- | --- |
//! | `k` | [`Counters`], 4 × u64 |
//! | `K` | ids reserved (interval mode), 4 × u64 |
//! | `c` conv | [`Conversation`] |
//! | `p` conv user | participant marker |
//! | `u` user 0 conv | the user's conversations |
//! | `m` conv msg | [`Message`] (current state) |
//! | `e` conv seq | event log entry: kind, message id, frame payload |
//! | `n` user 0 id | [`Notification`] |
//! | `r` user 0 id | unread marker |
//! | `o` id | the notification's owner |
//!
//! One tree, so that each [`Change`] is a single atomic `apply_batch`.
//! Usernames never contain a 0 byte (see `auth::valid_username`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::*;

/// Ids reserved at a time in `interval` mode (see `SledGroup::reserve`).
const ID_BLOCK: u64 = 10_000;

/// The last id issued of each kind. Persisted with every change, so ids
/// keep increasing across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    conversation: u64,
    message: u64,
    notification: u64,
    event: u64,
}

impl Counters {
    fn covers(&self, other: &Counters) -> bool {
        other.conversation <= self.conversation
            && other.message <= self.message
            && other.notification <= self.notification
            && other.event <= self.event
    }
}

const COUNTERS: &[u8] = b"k";
const RESERVED: &[u8] = b"K";
const CONVERSATION: u8 = b'c';
const PARTICIPANT: u8 = b'p';
const USER_CONVERSATION: u8 = b'u';
const MESSAGE: u8 = b'm';
const EVENT: u8 = b'e';
const NOTIFICATION: u8 = b'n';
const UNREAD: u8 = b'r';
const OWNER: u8 = b'o';

pub struct SledStore {
    /// `ManuallyDrop`: a failed instance is leaked at exit, because sled's
    /// drop flushes and a flush after an I/O error waits forever.
    db: std::mem::ManuallyDrop<sled::Db>,
    tree: std::mem::ManuallyDrop<sled::Tree>,
    /// False after a write or flush failed. sled 0.34 keeps its first I/O
    /// error (a full disk) for good, and dropping a failed instance blocks,
    /// so the store stays failed until parley restarts: reads are refused
    /// too, so that a write refused to its client is never shown by a read
    /// (it was never flushed, and sled's recovery leaves it out).
    healthy: AtomicBool,
    /// sled's log file, for `fdatasync` (see `sync`).
    log: std::fs::File,
    fdatasync: bool,
    dir: std::path::PathBuf,
    min_free: u64,
    /// Free bytes on the data dir's disk, and when that was read.
    free: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
    /// `interval` mode: writes are not flushed per group, so ids are
    /// reserved durably in blocks before they are used.
    interval: bool,
    /// (issued, reserved): where counting resumes, owned by the one writer.
    counters: Mutex<(Counters, Counters)>,
}

fn io(e: sled::Error) -> StoreError {
    StoreError::io(e)
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn id_key(prefix: u8, a: u64, b: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..9].copy_from_slice(&a.to_be_bytes());
    k[9..].copy_from_slice(&b.to_be_bytes());
    k
}

fn user_key(prefix: u8, user: &str, id: u64) -> Vec<u8> {
    key(prefix, &[user.as_bytes(), &[0], &id.to_be_bytes()])
}

fn tail_id(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[k.len() - 8..]);
    u64::from_be_bytes(b)
}

fn decode<T: DeserializeOwned>(v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn event_value(kind: EventKind, message: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    v.push(match kind {
        EventKind::Created => b'c',
        EventKind::Edited => b'e',
        EventKind::Deleted => b'd',
    });
    v.extend_from_slice(&message.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn event_from(k: &[u8], v: sled::IVec) -> Result<LoggedEvent> {
    if v.len() < 9 {
        return Err(StoreError::Corrupt("short event".into()));
    }
    let kind = match v[0] {
        b'c' => EventKind::Created,
        b'e' => EventKind::Edited,
        b'd' => EventKind::Deleted,
        _ => return Err(StoreError::Corrupt("unknown event kind".into())),
    };
    let message = MessageId(tail_id(&v[..9]));
    Ok(LoggedEvent {
        seq: Seq(tail_id(k)),
        kind,
        message,
        payload: Bytes::copy_from_slice(&v[9..]),
    })
}

fn open_handle(dir: &std::path::Path, flush_every_ms: Option<u64>) -> Result<(sled::Db, sled::Tree)> {
    let db = sled::Config::new()
        .path(dir.join("db"))
        .flush_every_ms(flush_every_ms)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| {
            let message = if e.to_string().contains("could not acquire lock") {
                format!(
                    "the data dir {} is in use by another parley (or another process holds its lock)",
                    dir.display()
                )
            } else {
                format!("cannot open the store in {}", dir.display())
            };
            StoreError::open(message, e)
        })?;
    let tree = db.open_tree("parley").map_err(io)?;
    Ok((db, tree))
}

impl SledStore {
    /// Opens (or creates) the store. `flush_every` is sled's own background
    /// flush period: `None` in `sync` mode, where the sequencer flushes.
    pub fn open(dir: &std::path::Path, flush_every_ms: Option<u64>) -> Result<SledStore> {
        SledStore::open_with_reserve(dir, flush_every_ms, 0)
    }

    /// As `open`, refusing writes while the disk has less than `min_free`
    /// bytes free.
    pub fn open_with_reserve(
        dir: &std::path::Path,
        flush_every_ms: Option<u64>,
        min_free: u64,
    ) -> Result<SledStore> {
        let (db, tree) = open_handle(dir, flush_every_ms)?;
        let log = std::fs::File::open(dir.join("db").join("db"))
            .map_err(|e| StoreError::open(format!("cannot open sled's log in {}", dir.display()), e))?;
        let store = SledStore {
            db: std::mem::ManuallyDrop::new(db),
            tree: std::mem::ManuallyDrop::new(tree),
            healthy: AtomicBool::new(true),
            log,
            fdatasync: false,
            dir: dir.to_path_buf(),
            min_free,
            free: std::sync::Mutex::new((u64::MAX, None)),
            interval: flush_every_ms.is_some(),
            counters: Mutex::new(Default::default()),
        };
        let issued = store.read_counters(COUNTERS)?;
        let reserved = store.read_counters(RESERVED)?;
        // Counting resumes above every id issued or reserved.
        let start = Counters {
            conversation: issued.conversation.max(reserved.conversation),
            message: issued.message.max(reserved.message),
            notification: issued.notification.max(reserved.notification),
            event: issued.event.max(reserved.event),
        };
        *store.counters.lock().unwrap_or_else(|p| p.into_inner()) = (start, start);
        Ok(store)
    }

    /// Also `fdatasync` sled's log on every `sync` (`--durability fsync`).
    pub fn with_fdatasync(mut self, on: bool) -> SledStore {
        self.fdatasync = on;
        self
    }

    /// Free bytes on the data dir's disk, read at most every 50 ms.
    fn free_bytes(&self) -> u64 {
        let mut cached = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if cached
            .1
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(50))
        {
            return cached.0;
        }
        let free = statvfs_free(&self.dir).unwrap_or(u64::MAX);
        *cached = (free, Some(std::time::Instant::now()));
        free
    }

    /// The tree, while the store is healthy.
    fn tree(&self) -> Result<&sled::Tree> {
        if self.healthy.load(Ordering::Relaxed) {
            Ok(&self.tree)
        } else {
            Err(StoreError::Failed)
        }
    }

    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>> {
        match self.tree()?.get(k).map_err(io)? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    fn track<T>(&self, r: std::result::Result<T, sled::Error>) -> Result<T> {
        self.healthy.store(r.is_ok(), Ordering::Relaxed);
        r.map_err(io)
    }
}

/// The reads, shared by [`Store`] and [`SledGroup`] (sled reads see
/// every applied batch at once).
impl SledStore {
    fn get_conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        self.get(&id_key(CONVERSATION, id.0, 0)[..9])
    }

    fn get_conversation_exists(&self, id: ConversationId) -> Result<bool> {
        self.tree()?
            .contains_key(&id_key(CONVERSATION, id.0, 0)[..9])
            .map_err(io)
    }

    fn get_is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool> {
        let k = key(PARTICIPANT, &[&conversation.0.to_be_bytes(), user.as_bytes()]);
        self.tree()?.contains_key(k).map_err(io)
    }

    fn get_conversations_of(&self, user: &str) -> Result<Vec<Conversation>> {
        let prefix = key(USER_CONVERSATION, &[user.as_bytes(), &[0]]);
        let mut out = Vec::new();
        for kv in self.tree()?.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(io)?;
            if let Some(c) = self.get_conversation(ConversationId(tail_id(&k)))? {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn get_message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.get(&id_key(MESSAGE, conversation.0, id.0))
    }

    fn get_history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>> {
        let start = id_key(MESSAGE, conversation.0, 0);
        let end = id_key(MESSAGE, conversation.0, before.map_or(u64::MAX, |b| b.0));
        let mut items = Vec::with_capacity(limit + 1);
        for kv in self.tree()?.range(start..end).rev() {
            let (_, v) = kv.map_err(io)?;
            let m: Message = decode(&v)?;
            if m.deleted {
                continue;
            }
            items.push(m);
            if items.len() > limit {
                break;
            }
        }
        Ok(Page::cut(items, limit, |m| m.id.0))
    }

    fn get_events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>> {
        let (conversation, after_seq) = (conversation.0, after.0);
        let start = id_key(EVENT, conversation, after_seq.saturating_add(1));
        let end = id_key(EVENT, conversation, u64::MAX);
        let mut newest_first = Vec::with_capacity(max.min(1024) + 1);
        let mut truncated_after = None;
        let mut range = self.tree()?.range(start..end).rev();
        for kv in range.by_ref() {
            let (k, v) = kv.map_err(io)?;
            if newest_first.len() == max {
                // More were missed than the bound: name the newest message
                // created before the replay (0 when there is none).
                let mut e = event_from(&k, v)?;
                loop {
                    if e.kind == EventKind::Created {
                        truncated_after = Some(e.message.0);
                        break;
                    }
                    match range.next() {
                        Some(kv) => {
                            let (k, v) = kv.map_err(io)?;
                            e = event_from(&k, v)?;
                        }
                        None => {
                            truncated_after =
                                Some(self.message_created_at_or_before(conversation, after_seq)?);
                            break;
                        }
                    }
                }
                break;
            }
            newest_first.push(event_from(&k, v)?);
        }
        newest_first.reverse();
        Ok(Replay {
            truncated_after,
            items: newest_first,
        })
    }

    fn get_notification(&self, id: NotificationId) -> Result<Option<Notification>> {
        let id = id.0;
        let Some(owner) = self.tree()?.get(&id_key(OWNER, id, 0)[..9]).map_err(io)? else {
            return Ok(None);
        };
        let owner = std::str::from_utf8(&owner).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.get(&user_key(NOTIFICATION, owner, id))
    }

    fn get_notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        let prefix = if unread_only { UNREAD } else { NOTIFICATION };
        let start = user_key(prefix, user, 0);
        let end = user_key(prefix, user, before.map_or(u64::MAX, |b| b.0));
        let mut items = Vec::with_capacity(limit + 1);
        for kv in self.tree()?.range(start..end).rev().take(limit + 1) {
            let (k, v) = kv.map_err(io)?;
            let n = if unread_only {
                self.get(&user_key(NOTIFICATION, user, tail_id(&k)))?
                    .ok_or_else(|| StoreError::Corrupt("unread marker without notification".into()))?
            } else {
                decode(&v)?
            };
            items.push(n);
        }
        Ok(Page::cut(items, limit, |n| n.id.0))
    }

    fn get_unread(&self, user: &str) -> Result<Vec<NotificationId>> {
        let prefix = key(UNREAD, &[user.as_bytes(), &[0]]);
        self.tree()?
            .scan_prefix(prefix)
            .keys()
            .map(|k| k.map(|k| NotificationId(tail_id(&k))).map_err(io))
            .collect()
    }

    fn get_notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>> {
        let start = user_key(NOTIFICATION, user, after.0.saturating_add(1));
        let end = user_key(NOTIFICATION, user, u64::MAX);
        let mut newest_first: Vec<Notification> = Vec::new();
        let mut truncated_after = None;
        for kv in self.tree()?.range(start..end).rev() {
            let (k, v) = kv.map_err(io)?;
            if newest_first.len() == max {
                truncated_after = Some(tail_id(&k));
                break;
            }
            newest_first.push(decode(&v)?);
        }
        newest_first.reverse();
        Ok(Replay {
            truncated_after,
            items: newest_first,
        })
    }

    fn put(&self, change: Change<'_>, counters: &Counters) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(COUNTERS, &counters_bytes(counters)[..]);
        match change {
            Change::Conversation(conv) => {
                let id = conv.id.0;
                batch.insert(&id_key(CONVERSATION, id, 0)[..9], encode(conv));
                for user in &conv.participants {
                    batch.insert(key(PARTICIPANT, &[&id.to_be_bytes(), user.as_bytes()]), &[][..]);
                    batch.insert(user_key(USER_CONVERSATION, user, id), &[][..]);
                }
            }
            Change::Chat {
                message,
                kind,
                seq,
                payload,
                notifications,
            } => {
                let conversation = message.conversation.0;
                batch.insert(&id_key(MESSAGE, conversation, message.id.0)[..], encode(message));
                batch.insert(
                    &id_key(EVENT, conversation, seq.0)[..],
                    event_value(kind, message.id.0, payload),
                );
                put_notifications(&mut batch, notifications);
            }
            Change::Notifications(ns) => put_notifications(&mut batch, ns),
        }
        let r = self.tree()?.apply_batch(batch);
        self.track(r)
    }

    fn sync(&self) -> Result<()> {
        // A flush after an I/O error never returns in sled 0.34.
        self.tree()?;
        let r = self.db.flush().map(|_| ());
        self.track(r)?;
        if !self.fdatasync {
            return Ok(());
        }
        // sled 0.34 makes its log durable with `sync_file_range`, which
        // neither syncs the file's metadata (the log grows) nor flushes the
        // disk's write cache: enough for a process crash, not for a power
        // loss. One `fdatasync` per group closes that gap.
        let r = self.log.sync_data();
        self.healthy.store(r.is_ok(), Ordering::Relaxed);
        r.map_err(StoreError::io)
    }

    fn check_writable(&self) -> Result<()> {
        self.tree()?;
        if self.min_free > 0 {
            let free = self.free_bytes();
            if free < self.min_free {
                return Err(StoreError::Full { free });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for SledStore {
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        self.get_conversation(id)
    }
    async fn conversation_exists(&self, id: ConversationId) -> Result<bool> {
        self.get_conversation_exists(id)
    }
    async fn is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool> {
        self.get_is_participant(conversation, user)
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>> {
        self.get_conversations_of(user)
    }
    async fn message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.get_message(conversation, id)
    }
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>> {
        self.get_history(conversation, before, limit)
    }
    async fn events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>> {
        self.get_events_after(conversation, after, max)
    }
    async fn notification(&self, id: NotificationId) -> Result<Option<Notification>> {
        self.get_notification(id)
    }
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        self.get_notifications(user, unread_only, before, limit)
    }
    async fn unread_count(&self, user: &str) -> Result<u64> {
        let prefix = key(UNREAD, &[user.as_bytes(), &[0]]);
        let mut n = 0;
        for k in self.tree()?.scan_prefix(prefix).keys() {
            k.map_err(io)?;
            n += 1;
        }
        Ok(n)
    }
    async fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>> {
        self.get_notifications_after(user, after, max)
    }

    fn writable(&self) -> Result<()> {
        self.check_writable()
    }

    fn begin(&self) -> Result<Box<dyn Group + '_>> {
        let (issued, reserved) = *self.counters.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Box::new(SledGroup {
            store: self,
            next: issued,
            reserved,
            wrote: false,
        }))
    }

    fn flush(&self) -> Result<()> {
        self.sync()
    }
}

/// A group on sled: each change is one atomic `apply_batch` (so later reads
/// of the group see it), and the commit is one flush for them all (group
/// commit), or none in `interval` mode, where sled flushes on its own.
struct SledGroup<'a> {
    store: &'a SledStore,
    /// The last ids issued, including this group's.
    next: Counters,
    /// Ids below these may have been shown (interval mode); see `reserve`.
    reserved: Counters,
    wrote: bool,
}

impl SledGroup<'_> {
    /// In `interval` mode a crash loses the last writes, and with them the
    /// counters that issued ids clients may already have seen. So ids are
    /// reserved in blocks, durably, before they are used: after a crash,
    /// counting resumes above every id that could have been shown. (In the
    /// other modes every issued id is flushed before it is shown.)
    fn reserve(&mut self) -> Result<()> {
        if !self.store.interval || self.reserved.covers(&self.next) {
            return Ok(());
        }
        let n = self.next;
        let reserved = Counters {
            conversation: n.conversation + ID_BLOCK,
            message: n.message + ID_BLOCK,
            notification: n.notification + ID_BLOCK,
            event: n.event + ID_BLOCK,
        };
        let r = self
            .store
            .tree()?
            .insert(RESERVED, &counters_bytes(&reserved)[..])
            .map(|_| ());
        self.store.track(r)?;
        self.store.sync()?;
        self.reserved = reserved;
        Ok(())
    }

    fn bump(&mut self, pick: impl Fn(&mut Counters) -> &mut u64) -> Result<u64> {
        let id = {
            let c = pick(&mut self.next);
            *c += 1;
            *c
        };
        self.reserve()?;
        Ok(id)
    }
}

impl Group for SledGroup<'_> {
    fn conversation(&mut self, id: ConversationId) -> Result<Option<Conversation>> {
        self.store.get_conversation(id)
    }
    fn message(&mut self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.store.get_message(conversation, id)
    }
    fn notification(&mut self, id: NotificationId) -> Result<Option<Notification>> {
        self.store.get_notification(id)
    }
    fn unread(&mut self, user: &str) -> Result<Vec<NotificationId>> {
        self.store.get_unread(user)
    }

    fn next_conversation(&mut self) -> Result<ConversationId> {
        self.bump(|c| &mut c.conversation).map(ConversationId)
    }
    fn next_message(&mut self) -> Result<MessageId> {
        self.bump(|c| &mut c.message).map(MessageId)
    }
    fn next_notification(&mut self) -> Result<NotificationId> {
        self.bump(|c| &mut c.notification).map(NotificationId)
    }
    /// One sequence over all conversations: increasing within each, which
    /// is all a log position needs.
    fn next_seq(&mut self, _conversation: ConversationId) -> Result<Seq> {
        self.bump(|c| &mut c.event).map(Seq)
    }

    fn apply(&mut self, change: Change<'_>) -> Result<()> {
        self.store.put(change, &self.next)?;
        self.wrote = true;
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<()> {
        *self.store.counters.lock().unwrap_or_else(|p| p.into_inner()) = (self.next, self.reserved);
        if self.wrote && !self.store.interval {
            self.store.sync()?;
        }
        Ok(())
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `dir`.
fn statvfs_free(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a NUL-terminated path and a correctly sized out-parameter.
    let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs filled it in.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail * st.f_frsize)
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if self.healthy.load(Ordering::Relaxed) {
            // SAFETY: dropped once, here, and never used again.
            unsafe {
                std::mem::ManuallyDrop::drop(&mut self.tree);
                std::mem::ManuallyDrop::drop(&mut self.db);
            }
        }
    }
}

fn counters_bytes(c: &Counters) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&c.conversation.to_be_bytes());
    b[8..16].copy_from_slice(&c.message.to_be_bytes());
    b[16..24].copy_from_slice(&c.notification.to_be_bytes());
    b[24..].copy_from_slice(&c.event.to_be_bytes());
    b
}

impl SledStore {
    fn read_counters(&self, key: &[u8]) -> Result<Counters> {
        Ok(match self.tree()?.get(key).map_err(io)? {
            Some(v) if v.len() == 32 => Counters {
                conversation: tail_id(&v[..8]),
                message: tail_id(&v[..16]),
                notification: tail_id(&v[..24]),
                event: tail_id(&v[..32]),
            },
            Some(_) => return Err(StoreError::Corrupt("counters".into())),
            None => Counters::default(),
        })
    }

    /// The newest message created at or before `seq` (0: none), for a
    /// truncated replay whose window starts right after the resume point.
    fn message_created_at_or_before(&self, conversation: u64, seq: u64) -> Result<u64> {
        let start = id_key(EVENT, conversation, 0);
        let end = id_key(EVENT, conversation, seq.saturating_add(1));
        for kv in self.tree()?.range(start..end).rev() {
            let (k, v) = kv.map_err(io)?;
            let e = event_from(&k, v)?;
            if e.kind == EventKind::Created {
                return Ok(e.message.0);
            }
        }
        Ok(0)
    }
}

fn put_notifications(batch: &mut sled::Batch, ns: &[Notification]) {
    for n in ns {
        batch.insert(user_key(NOTIFICATION, &n.user, n.id.0), encode(n));
        batch.insert(&id_key(OWNER, n.id.0, 0)[..9], n.user.as_bytes());
        let unread = user_key(UNREAD, &n.user, n.id.0);
        if n.is_read {
            batch.remove(unread);
        } else {
            batch.insert(unread, &[][..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_store_conformance_suite() {
        struct Sled(tempfile::TempDir);
        impl crate::store::conformance::Backend for Sled {
            /// A reopen right after the last handle dropped may find the
            /// lock still held for a moment (sled's flusher thread lets go
            /// of the database after its owner): retry, bounded, as a
            /// restarted process would find it free.
            fn open(&self) -> Box<dyn Store> {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    match SledStore::open(self.0.path(), None) {
                        Ok(s) => return Box::new(s),
                        Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        Err(e) => panic!("open: {}", e.chain()),
                    }
                }
            }
        }
        crate::store::conformance::run(&Sled(tempfile::tempdir().unwrap()));
    }
}
