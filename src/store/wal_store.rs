//! The default backend: parley's commit log ([`super::log`]) is the commit
//! point, and a sled tree (the schema of [`super::SledStore`]) is the
//! applied state that reads come from.
//!
//! # A group's way
//! 1. The sequencer applies each change to a [`WalGroup`]: encoded once into
//!    the group's log records ([`GroupBuf`]) and once into the group's own
//!    layer of sled keys, so that later reads of the group see it.
//! 2. `start_commit`: the records go to the log thread, which appends them
//!    with one `pwrite` and syncs them with one `fdatasync`; meanwhile the
//!    group's layer is "in flight": the next group's reads see it, no other
//!    reader does. The sequencer handles the next group, then waits
//!    (`Commit::wait`). Only once the sync returned does the layer join the
//!    overlay every reader sees, and only then does the sequencer publish
//!    and answer. A commit that fails shows nothing: its layer is dropped
//!    (and the sequencer refuses the group handled on top of it).
//! 3. The applier thread writes the overlay's layers into sled in one batch
//!    every APPLY_EVERY or per 1 MiB of log (not per message: sled's cost is
//!    per key and per batch), with the id counters, then drops those layers.
//! 4. A checkpoint (sled flushed and its file `fdatasync`ed, then the log's
//!    `checkpoint` record written and synced) lets the log recycle the
//!    segments below it.
//!
//! # Start
//! sled is opened, and every log group after the checkpoint record is
//! replayed into one overlay layer (not into sled: serving starts as soon as
//! the log is read; the applier writes the layer to sled in the
//! background). sled may hold more than the checkpoint, but only up to it is
//! it known whole after a crash (a full disk has been seen to leave sled
//! with part of a batch). Ids resume above both sled's counters and every id
//! in the replayed groups. A replayed change is the whole new state of what
//! it touches, so replaying a group sled already has changes nothing.
//!
//! # Faults
//! A log write or `fdatasync` failure is fatal to the log (see its module
//! doc): writes are refused until restart, reads go on. A full disk when
//! the log needs a new segment refuses writes until a segment fits again.
//! A sled failure in the applier refuses writes until restart (sled 0.34
//! then fails reads too); the log keeps every acknowledged write durable
//! until the restart replays it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use smallvec::SmallVec;

use super::log::{FsDir, GroupBuf, IdHighWater, Log, LogConfig, LogDir, Lsn};
use super::sled_store::{
    io, open_handle, write_change, Counters, FreeSpace, Layer, Sink, View, COUNTERS, RESERVED,
};
use super::*;

/// How often the applier moves durable groups into sled ...
const APPLY_EVERY: Duration = Duration::from_millis(100);
/// ... or sooner, once this many bytes of log wait: sled's writes come in
/// bounded bursts (the `--min-free-bytes` margin must cover one), and the
/// overlay stays small.
const APPLY_BYTES: u64 = 1 << 20;
/// Keys per sled batch (see `apply_and_checkpoint`).
const APPLY_CHUNK: usize = 64;
/// Durable layers beyond which the writer waits for the applier (sled
/// slower than the log for a long while): memory stays bounded.
const MAX_LAYERS: usize = 16_384;
/// A checkpoint at least this often while anything was applied since.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// How to open a [`WalStore`].
pub struct WalOptions {
    /// Bytes preallocated per log segment.
    pub segment_bytes: u64,
    /// `--min-free-bytes`.
    pub min_free: u64,
    /// Checkpoint once this much log was applied since the last one
    /// (`None`: half a segment; `u64::MAX`: only at shutdown, for tests).
    pub checkpoint_bytes: Option<u64>,
    /// The log's directory (`None`: `<data_dir>/log` on the real file
    /// system; tests pass a [`super::log::SimulatedDisk`]).
    pub log_dir: Option<Box<dyn LogDir>>,
    /// `false`: groups stay in the overlay until `flush` (tests of the
    /// overlay's reads, and the start-up measurement, which needs a log
    /// that sled has not caught up with).
    pub apply_in_background: bool,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            segment_bytes: LogConfig::default().segment_size,
            min_free: 0,
            checkpoint_bytes: None,
            log_dir: None,
            apply_in_background: true,
        }
    }
}

/// A group durable in the log and not yet in sled (or, while its commit
/// is in flight, about to be).
struct Durable {
    /// The log position after the group, once appended.
    end: AtomicU64,
    /// Ids issued up to and including the group.
    counters: Counters,
    keys: Layer,
    /// The group's size in the log.
    bytes: u64,
}

pub struct WalStore {
    inner: Arc<Inner>,
    applier: Option<std::thread::JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What the log thread answers, in the order the groups were sent.
type Written = (GroupBuf, super::log::Result<Lsn>);

struct Inner {
    /// `ManuallyDrop`: a failed sled is leaked at exit (its drop flushes,
    /// and a flush after an I/O error waits forever).
    db: std::mem::ManuallyDrop<sled::Db>,
    tree: std::mem::ManuallyDrop<sled::Tree>,
    /// sled's file, `fdatasync`ed by a checkpoint (sled's own flush uses
    /// `sync_file_range`, which survives a crash but not a power cut).
    sled_file: std::fs::File,
    log: Mutex<Log>,
    health: super::log::Health,
    /// To the log thread, which appends and syncs each group while the
    /// sequencer handles the next (`None` once the store is dropped) ...
    jobs: Mutex<Option<std::sync::mpsc::SyncSender<GroupBuf>>>,
    /// ... and its answers.
    written: Mutex<std::sync::mpsc::Receiver<Written>>,
    /// The group whose commit is in flight: the next group's reads see it,
    /// other readers do not (it is not durable yet).
    inflight: Mutex<Option<Arc<Durable>>>,
    /// Durable groups not yet in sled, oldest first. Readers clone the
    /// `Arc`s and let go of the lock before they read.
    overlay: RwLock<VecDeque<Arc<Durable>>>,
    /// Wakes the applier; `true` once the store is being dropped.
    wake: (Mutex<bool>, Condvar),
    /// One applier at a time (the thread, or `flush` at shutdown).
    applying: Mutex<Applied>,
    /// A sled failure: writes are refused until restart.
    failed: OnceLock<StoreError>,
    free: FreeSpace,
    /// Ids issued, owned by the one writer between groups.
    counters: Mutex<Counters>,
    /// The encoding buffer, reused from group to group.
    buf: Mutex<GroupBuf>,
    checkpoint_bytes: u64,
    apply_in_background: bool,
    segment_bytes: u64,
    /// The log could not create its next segment (a full disk): writes are
    /// refused, and `/healthz` says so, until a segment's worth is free.
    out_of_space: std::sync::atomic::AtomicBool,
    /// Bytes of log in the overlay (see `APPLY_BYTES`).
    pending: AtomicU64,
}

/// What the applier has done.
struct Applied {
    /// The log position sled reflects.
    upto: Lsn,
    /// The position of the last checkpoint, and when it was taken.
    checkpointed: Lsn,
    at: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WalStore {
    /// Opens (or creates) the store in `dir` and replays the log's groups
    /// that sled does not have yet.
    pub fn open(dir: &std::path::Path, options: WalOptions) -> Result<WalStore> {
        let (db, tree) = open_handle(dir, None)?;
        let segment_bytes = options.segment_bytes;
        let sled_file = std::fs::File::open(dir.join("db").join("db"))
            .map_err(|e| StoreError::open(format!("cannot open sled's file in {}", dir.display()), e))?;
        let view = View::new(&tree, &[]);
        let mut counters = view.counters(COUNTERS)?.max(&view.counters(RESERVED)?);
        let log_dir = match options.log_dir {
            Some(d) => d,
            None => Box::new(FsDir::open(&dir.join("log")).map_err(|e| {
                StoreError::open(
                    format!("cannot open the commit log in {}", dir.join("log").display()),
                    e,
                )
            })?),
        };
        let config = LogConfig {
            segment_size: segment_bytes,
            ..LogConfig::default()
        };
        // sled may hold more than the checkpoint (the applier writes ahead
        // of it), but only up to it is sled known to be whole after a crash.
        let applied = Log::checkpointed(&*log_dir)?;
        let started = Instant::now();
        let mut recovery = Log::open(log_dir, config, applied)?;
        let (mut keys, mut high, mut end, mut groups) = (Layer::new(), IdHighWater::default(), applied, 0);
        while let Some(g) = recovery.next_group()? {
            for c in &g.changes {
                let c = c.as_change();
                high.observe(&c);
                write_change(&c, &mut keys);
            }
            end = g.end;
            groups += 1;
        }
        let log = recovery.finish().map_err(|e| match e {
            super::log::LogError::Io { .. } | super::log::LogError::NoSegment { .. } => StoreError::open(
                format!(
                    "cannot prepare the commit log in {} (each segment preallocates {} MiB: see --wal-segment-mib)",
                    dir.join("log").display(),
                    segment_bytes >> 20
                ),
                e,
            ),
            e => e.into(),
        })?;
        counters = counters.max(&Counters::from(high));
        let mut overlay = VecDeque::new();
        if groups > 0 {
            tracing::info!(
                "commit log: replayed {groups} groups (log positions {applied} to {end}) in {} ms",
                started.elapsed().as_millis()
            );
            overlay.push_back(Arc::new(Durable {
                end: AtomicU64::new(end.0),
                counters,
                keys,
                bytes: end.0 - applied.0,
            }));
        }
        let (jobs, jobs_rx) = std::sync::mpsc::sync_channel::<GroupBuf>(1);
        let (written_tx, written) = std::sync::mpsc::sync_channel::<Written>(1);
        let inner = Arc::new(Inner {
            db: std::mem::ManuallyDrop::new(db),
            tree: std::mem::ManuallyDrop::new(tree),
            sled_file,
            health: log.health(),
            log: Mutex::new(log),
            jobs: Mutex::new(Some(jobs)),
            written: Mutex::new(written),
            inflight: Mutex::new(None),
            overlay: RwLock::new(overlay),
            wake: (Mutex::new(false), Condvar::new()),
            applying: Mutex::new(Applied {
                upto: applied,
                checkpointed: applied,
                at: Instant::now(),
            }),
            failed: OnceLock::new(),
            free: FreeSpace::new(dir, options.min_free),
            counters: Mutex::new(counters),
            buf: Mutex::new(GroupBuf::with_capacity(64 << 10)),
            checkpoint_bytes: options.checkpoint_bytes.unwrap_or(segment_bytes / 2).max(1),
            apply_in_background: options.apply_in_background,
            segment_bytes,
            pending: AtomicU64::new(0),
            out_of_space: std::sync::atomic::AtomicBool::new(false),
        });
        let applier = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("parley-applier".into())
                .spawn(move || inner.apply_loop())
                .map_err(|e| StoreError::open("cannot start the applier thread".into(), e))?
        };
        let writer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("parley-log".into())
                .spawn(move || inner.write_loop(jobs_rx, written_tx))
                .map_err(|e| StoreError::open("cannot start the log thread".into(), e))?
        };
        Ok(WalStore {
            inner,
            applier: Some(applier),
            writer: Some(writer),
        })
    }
}

impl Inner {
    /// The durable layers as they are now, oldest first. Cloned out (an
    /// `Arc` each) so that the lock is let go before anything is read.
    fn durable<C: FromIterator<Arc<Durable>>>(&self) -> C {
        self.overlay
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Reads through the overlay as it is now.
    fn read<T>(&self, f: impl FnOnce(&View<'_>) -> Result<T>) -> Result<T> {
        let mut durable: SmallVec<[Arc<Durable>; 8]> = self.durable();
        durable.reverse();
        let layers: SmallVec<[&Layer; 8]> = durable.iter().map(|d| &d.keys).collect();
        f(&View::new(&self.tree, &layers))
    }

    /// The log thread: append and `fdatasync` each group, in order.
    fn write_loop(
        &self,
        jobs: std::sync::mpsc::Receiver<GroupBuf>,
        written: std::sync::mpsc::SyncSender<Written>,
    ) {
        while let Ok(mut buf) = jobs.recv() {
            let r = {
                let mut log = lock(&self.log);
                log.append(&mut buf).and_then(|end| log.sync().map(|_| end))
            };
            if written.send((buf, r)).is_err() {
                return;
            }
        }
    }

    fn apply_loop(&self) {
        // Background work: under a full CPU, the sequencer and the sockets
        // go first (the overlay serves reads meanwhile, and MAX_LAYERS
        // bounds how far behind this thread may fall).
        // SAFETY: setpriority on this thread's own id; no memory involved.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
        }
        loop {
            let stopping = {
                let (m, cv) = &self.wake;
                let stop = lock(m);
                let (stop, _) = cv
                    .wait_timeout(stop, APPLY_EVERY)
                    .unwrap_or_else(|p| p.into_inner());
                *stop
            };
            if self.failed.get().is_some() || !self.apply_in_background {
                if stopping {
                    return;
                }
                continue;
            }
            if let Err(e) = self.apply_and_checkpoint(stopping) {
                tracing::error!("applying the commit log to sled failed: {}", e.chain());
                let _ = self.failed.set(e);
            }
            if stopping {
                return;
            }
        }
    }

    /// Moves every durable layer into sled (one batch), then checkpoints if
    /// enough log was applied since the last one, or `force`.
    fn apply_and_checkpoint(&self, force: bool) -> Result<()> {
        let mut applied = lock(&self.applying);
        let layers: Vec<Arc<Durable>> = self.durable();
        if let Some(last) = layers.last() {
            // In sled batches of at most APPLY_CHUNK keys: sled 0.34 keeps
            // every page version a batch replaces until the batch ends
            // (one epoch guard), so one batch of thousands of keys held tens
            // of MB (measured: +35 MB after 1,000 conversations created at
            // once). A batch need not be a whole group: readers see the
            // group's layer until all of it is in, and after a crash the
            // replay from the checkpoint rewrites whatever sled half has.
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for d in &layers {
                for (k, v) in &d.keys {
                    batch.put(k.clone(), v.clone());
                    n += 1;
                    if n == APPLY_CHUNK {
                        self.tree.apply_batch(std::mem::take(&mut batch)).map_err(io)?;
                        n = 0;
                    }
                }
            }
            let end = Lsn(last.end.load(Ordering::Acquire));
            batch.insert(COUNTERS, &last.counters.to_bytes()[..]);
            self.tree.apply_batch(batch).map_err(io)?;
            // Dropped only now that sled has them: a reader finds each key
            // in one or the other.
            self.overlay
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..layers.len());
            let bytes: u64 = layers.iter().map(|d| d.bytes).sum();
            let _ = self
                .pending
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                    Some(p.saturating_sub(bytes))
                });
            applied.upto = end;
        }
        let behind = applied.upto.0 - applied.checkpointed.0;
        let due = behind >= self.checkpoint_bytes || (behind > 0 && applied.at.elapsed() >= CHECKPOINT_EVERY);
        if due || (force && behind > 0) {
            self.checkpoint(&mut applied)?;
        }
        Ok(())
    }

    /// Makes sled durable up to what it has applied, then lets the log
    /// recycle the segments below.
    fn checkpoint(&self, applied: &mut Applied) -> Result<()> {
        let upto = applied.upto;
        self.db.flush().map_err(io)?;
        self.sled_file.sync_data().map_err(StoreError::io)?;
        if let Err(e) = lock(&self.log).checkpoint(upto) {
            // Old segments stay behind; the next checkpoint removes them.
            tracing::warn!("recycling log segments failed: {e}");
        }
        applied.checkpointed = upto;
        applied.at = Instant::now();
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        self.health.check()?;
        if let Some(e) = self.failed.get() {
            return Err(e.clone());
        }
        if self.out_of_space.load(Ordering::Relaxed) {
            self.free.at_least(self.segment_bytes)?;
            self.out_of_space.store(false, Ordering::Relaxed);
        }
        self.free.check()
    }
}

#[async_trait]
impl Store for WalStore {
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        self.inner.read(|v| v.conversation(id))
    }
    async fn conversation_exists(&self, id: ConversationId) -> Result<bool> {
        self.inner.read(|v| v.conversation_exists(id))
    }
    async fn is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool> {
        self.inner.read(|v| v.is_participant(conversation, user))
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>> {
        self.inner.read(|v| v.conversations_of(user))
    }
    async fn message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.inner.read(|v| v.message(conversation, id))
    }
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>> {
        self.inner.read(|v| v.history(conversation, before, limit))
    }
    async fn events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>> {
        self.inner.read(|v| v.events_after(conversation, after, max))
    }
    async fn notification(&self, id: NotificationId) -> Result<Option<Notification>> {
        self.inner.read(|v| v.notification(id))
    }
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        self.inner
            .read(|v| v.notifications(user, unread_only, before, limit))
    }
    async fn unread_count(&self, user: &str) -> Result<u64> {
        self.inner.read(|v| v.unread_count(user))
    }
    async fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>> {
        self.inner.read(|v| v.notifications_after(user, after, max))
    }

    fn writable(&self) -> Result<()> {
        self.inner.writable()
    }

    fn begin(&self) -> Result<Box<dyn Group + '_>> {
        let inner = &self.inner;
        // Newest first: the group in flight, then the durable ones.
        let mut durable: Vec<Arc<Durable>> = inner.durable();
        durable.extend(lock(&inner.inflight).iter().cloned());
        durable.reverse();
        Ok(Box::new(WalGroup {
            store: inner.clone(),
            durable,
            keys: Layer::new(),
            buf: std::mem::take(&mut *lock(&inner.buf)),
            next: *lock(&inner.counters),
        }))
    }

    /// Applies everything to sled and checkpoints (at shutdown).
    fn flush(&self) -> Result<()> {
        if let Some(e) = self.inner.failed.get() {
            return Err(e.clone());
        }
        self.inner.apply_and_checkpoint(true)
    }
}

impl Drop for WalStore {
    fn drop(&mut self) {
        drop(lock(&self.inner.jobs).take());
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        *lock(&self.inner.wake.0) = true;
        self.inner.wake.1.notify_one();
        if let Some(h) = self.applier.take() {
            let _ = h.join();
        }
        if self.inner.failed.get().is_none() {
            if let Some(inner) = Arc::get_mut(&mut self.inner) {
                // SAFETY: dropped once, here, and never used again (the
                // applier, the only other owner, has ended).
                unsafe {
                    std::mem::ManuallyDrop::drop(&mut inner.tree);
                    std::mem::ManuallyDrop::drop(&mut inner.db);
                }
            }
        }
    }
}

/// A group: its changes encoded for the log and kept as its own layer of
/// keys, on top of the durable layers as they were when it began (only this
/// group's commit adds layers, and the applier drops one only once sled has
/// it, so that snapshot plus sled stays whole).
struct WalGroup {
    store: Arc<Inner>,
    /// Newest first.
    durable: Vec<Arc<Durable>>,
    keys: Layer,
    buf: GroupBuf,
    next: Counters,
}

impl WalGroup {
    fn read<T>(&self, f: impl FnOnce(&View<'_>) -> Result<T>) -> Result<T> {
        let mut layers: SmallVec<[&Layer; 16]> = SmallVec::with_capacity(1 + self.durable.len());
        layers.push(&self.keys);
        layers.extend(self.durable.iter().map(|d| &d.keys));
        f(&View::new(&self.store.tree, &layers))
    }

    fn bump(&mut self, pick: impl Fn(&mut Counters) -> &mut u64) -> u64 {
        let c = pick(&mut self.next);
        *c += 1;
        *c
    }
}

impl Group for WalGroup {
    fn conversation(&mut self, id: ConversationId) -> Result<Option<Conversation>> {
        self.read(|v| v.conversation(id))
    }
    fn message(&mut self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.read(|v| v.message(conversation, id))
    }
    fn notification(&mut self, id: NotificationId) -> Result<Option<Notification>> {
        self.read(|v| v.notification(id))
    }
    fn unread(&mut self, user: &str) -> Result<Vec<NotificationId>> {
        self.read(|v| v.unread(user))
    }

    /// Ids need no reservation here: an id is shown only inside a change,
    /// a change only once its group is in the log, and a replay resumes
    /// counting above every id the log holds.
    fn next_conversation(&mut self) -> Result<ConversationId> {
        Ok(ConversationId(self.bump(|c| &mut c.conversation)))
    }
    fn next_message(&mut self) -> Result<MessageId> {
        Ok(MessageId(self.bump(|c| &mut c.message)))
    }
    fn next_notification(&mut self) -> Result<NotificationId> {
        Ok(NotificationId(self.bump(|c| &mut c.notification)))
    }
    /// One sequence over all conversations: increasing within each.
    fn next_seq(&mut self, _conversation: ConversationId) -> Result<Seq> {
        Ok(Seq(self.bump(|c| &mut c.event)))
    }

    fn apply(&mut self, change: Change<'_>) -> Result<()> {
        self.buf.push(&change);
        write_change(&change, &mut self.keys);
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.start_commit().wait()
    }

    /// Hands the group's records to the log thread; its keys become the
    /// in-flight layer, which only the next group reads.
    fn start_commit(self: Box<Self>) -> Box<dyn Commit> {
        let WalGroup {
            store,
            keys,
            buf,
            next,
            ..
        } = *self;
        *lock(&store.counters) = next;
        if buf.is_empty() {
            *lock(&store.buf) = buf;
            return Box::new(WalCommit { store, layer: None });
        }
        let layer = Arc::new(Durable {
            end: AtomicU64::new(0),
            counters: next,
            keys,
            bytes: buf.encoded_len() as u64,
        });
        *lock(&store.inflight) = Some(layer.clone());
        let sent = lock(&store.jobs).as_ref().map(|jobs| jobs.send(buf));
        if !matches!(sent, Some(Ok(()))) {
            *lock(&store.inflight) = None;
            return WalCommit::failed();
        }
        Box::new(WalCommit {
            store,
            layer: Some(layer),
        })
    }
}

/// A group in the log thread's hands.
struct WalCommit {
    store: Arc<Inner>,
    /// `None`: nothing was sent (an empty group), or it was waited for.
    layer: Option<Arc<Durable>>,
}

impl WalCommit {
    /// The log thread is gone (the store is being dropped).
    fn failed() -> Box<dyn Commit> {
        struct Failed;
        impl Commit for Failed {
            fn wait(self: Box<Self>) -> Result<()> {
                Err(StoreError::Failed)
            }
        }
        Box::new(Failed)
    }

    /// The log thread's answer for this group; on success the group's
    /// layer joins the overlay every reader sees.
    fn finish(&mut self) -> Result<()> {
        let Some(layer) = self.layer.take() else {
            return Ok(());
        };
        let store = &self.store;
        let answer = lock(&store.written).recv();
        let r = match answer {
            Ok((mut buf, written)) => {
                buf.clear();
                *lock(&store.buf) = buf;
                if let Err(super::log::LogError::NoSegment { .. }) = &written {
                    store.out_of_space.store(true, Ordering::Relaxed);
                }
                written.map_err(StoreError::from)
            }
            Err(_) => Err(StoreError::Failed),
        };
        let layers = match r {
            Ok(end) => {
                layer.end.store(end.0, Ordering::Release);
                if store.pending.fetch_add(layer.bytes, Ordering::Relaxed) + layer.bytes > APPLY_BYTES {
                    store.wake.1.notify_one();
                }
                let mut overlay = store.overlay.write().unwrap_or_else(|p| p.into_inner());
                overlay.push_back(layer);
                overlay.len()
            }
            Err(_) => 0,
        };
        *lock(&store.inflight) = None;
        if layers > MAX_LAYERS {
            // sled has fallen far behind: wait for the applier rather than
            // grow without bound.
            store.wake.1.notify_one();
            while store.overlay.read().unwrap_or_else(|p| p.into_inner()).len() > MAX_LAYERS / 2
                && store.failed.get().is_none()
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        r.map(|_| ())
    }
}

impl Commit for WalCommit {
    fn wait(mut self: Box<Self>) -> Result<()> {
        self.finish()
    }
}

impl Drop for WalCommit {
    /// A commit nobody waited for (a panic on the way) is still taken off
    /// the log thread's answers, so that the next one reads its own.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests;
