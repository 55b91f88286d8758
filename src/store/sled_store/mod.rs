//! The embedded backend on sled alone: one tree (schema in `keys`), each
//! [`Change`] one atomic `apply_batch`, the commit a sled flush. Used in
//! `interval` mode (sled flushes on its own period); the default mode runs
//! [`crate::store::WalStore`], the commit log with this same tree as its
//! applied state. Reads are written once, in `view`, for both.

mod keys;
mod view;

pub(crate) use keys::{write_change, Counters, Sink, COUNTERS, RESERVED};
pub(crate) use view::{io, Layer, View};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;

/// Ids reserved at a time in `interval` mode (see `SledGroup::reserve`).
const ID_BLOCK: u64 = 10_000;

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
    free: FreeSpace,
    /// `interval` mode: writes are not flushed per group, so ids are
    /// reserved durably in blocks before they are used.
    interval: bool,
    /// (issued, reserved): where counting resumes, owned by the one writer.
    counters: Mutex<(Counters, Counters)>,
}

pub(crate) fn open_handle(
    dir: &std::path::Path,
    flush_every_ms: Option<u64>,
) -> Result<(sled::Db, sled::Tree)> {
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
        let store = SledStore {
            db: std::mem::ManuallyDrop::new(db),
            tree: std::mem::ManuallyDrop::new(tree),
            healthy: AtomicBool::new(true),
            free: FreeSpace::new(dir, min_free),
            interval: flush_every_ms.is_some(),
            counters: Mutex::new(Default::default()),
        };
        // Counting resumes above every id issued or reserved.
        let view = store.view()?;
        let start = view.counters(COUNTERS)?.max(&view.counters(RESERVED)?);
        *store.counters.lock().unwrap_or_else(|p| p.into_inner()) = (start, start);
        Ok(store)
    }

    /// The tree, while the store is healthy.
    fn tree(&self) -> Result<&sled::Tree> {
        if self.healthy.load(Ordering::Relaxed) {
            Ok(&self.tree)
        } else {
            Err(StoreError::Failed)
        }
    }

    fn track<T>(&self, r: std::result::Result<T, sled::Error>) -> Result<T> {
        self.healthy.store(r.is_ok(), Ordering::Relaxed);
        r.map_err(io)
    }

    fn put(&self, change: Change<'_>, counters: &Counters) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(COUNTERS, &counters.to_bytes()[..]);
        write_change(&change, &mut batch);
        let r = self.tree()?.apply_batch(batch);
        self.track(r)
    }

    /// The tree, as every read sees it (no layers: writes are in sled as
    /// soon as they are applied).
    fn view(&self) -> Result<View<'_>> {
        Ok(View::new(self.tree()?, &[]))
    }

    fn sync(&self) -> Result<()> {
        // A flush after an I/O error never returns in sled 0.34.
        self.tree()?;
        let r = self.db.flush().map(|_| ());
        self.track(r)
    }

    fn check_writable(&self) -> Result<()> {
        self.tree()?;
        self.free.check()
    }
}

#[async_trait]
impl Store for SledStore {
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        self.view()?.conversation(id)
    }
    async fn conversation_exists(&self, id: ConversationId) -> Result<bool> {
        self.view()?.conversation_exists(id)
    }
    async fn is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool> {
        self.view()?.is_participant(conversation, user)
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>> {
        self.view()?.conversations_of(user)
    }
    async fn message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.view()?.message(conversation, id)
    }
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>> {
        self.view()?.history(conversation, before, limit)
    }
    async fn events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>> {
        self.view()?.events_after(conversation, after, max)
    }
    async fn notification(&self, id: NotificationId) -> Result<Option<Notification>> {
        self.view()?.notification(id)
    }
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        self.view()?.notifications(user, unread_only, before, limit)
    }
    async fn unread_count(&self, user: &str) -> Result<u64> {
        self.view()?.unread_count(user)
    }
    async fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>> {
        self.view()?.notifications_after(user, after, max)
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
            .insert(RESERVED, &reserved.to_bytes()[..])
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
        self.store.view()?.conversation(id)
    }
    fn message(&mut self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.store.view()?.message(conversation, id)
    }
    fn notification(&mut self, id: NotificationId) -> Result<Option<Notification>> {
        self.store.view()?.notification(id)
    }
    fn unread(&mut self, user: &str) -> Result<Vec<NotificationId>> {
        self.store.view()?.unread(user)
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

/// The `--min-free-bytes` margin: writes are refused while the data dir's
/// disk has less free, so that no engine meets a full disk in the middle of
/// a write (sled 0.34 cannot recover from one in-process).
pub(crate) struct FreeSpace {
    dir: std::path::PathBuf,
    min_free: u64,
    /// Free bytes, and when that was read.
    cached: Mutex<(u64, Option<std::time::Instant>)>,
}

impl FreeSpace {
    pub fn new(dir: &std::path::Path, min_free: u64) -> FreeSpace {
        FreeSpace {
            dir: dir.to_path_buf(),
            min_free,
            cached: Mutex::new((u64::MAX, None)),
        }
    }

    /// `Full` while less than the margin is free (read at most every 50 ms).
    pub fn check(&self) -> Result<()> {
        if self.min_free == 0 {
            return Ok(());
        }
        self.at_least(self.min_free)
    }

    /// `Full` while less than `bytes` are free.
    pub fn at_least(&self, bytes: u64) -> Result<()> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cached
            .1
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(50));
        if !fresh {
            *cached = (
                statvfs_free(&self.dir).unwrap_or(u64::MAX),
                Some(std::time::Instant::now()),
            );
        }
        let free = cached.0;
        if free < bytes {
            return Err(StoreError::Full { free });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_store_conformance_suite() {
        struct Sled(tempfile::TempDir);
        impl crate::store::conformance::Backend for Sled {
            fn open(&self) -> Box<dyn Store> {
                Box::new(crate::store::reopen(|| SledStore::open(self.0.path(), None)))
            }
        }
        crate::store::conformance::run(&Sled(tempfile::tempdir().unwrap()));
    }
}
