//! parley's write-ahead log: the commit point. A group of changes is
//! encoded into one buffer of checksummed records ([`GroupBuf`]), appended
//! with one `pwrite` ([`Log::append`]) and made durable with one
//! `fdatasync` ([`Log::sync`]); only then may anything of it be shown.
//! sled is applied from the same groups later, and records (with its data)
//! the log position its state reflects; on start, [`Log::open`] replays
//! every group after that position.
//!
//! # Layout
//! - `<data_dir>/log/<start LSN, 16 hex digits>.wal`: segments,
//!   preallocated (64 MiB by default), each starting with a record.
//!   `spare-*.wal`: checkpointed segments kept for reuse, whose blocks are
//!   already written (appending to them needs no extent conversion).
//! - An LSN (log sequence number) is a byte position in the log as a whole.
//!   A segment named `S` holds the log from `S` on; when a group does not
//!   fit in the rest of a segment, the next segment starts at the current
//!   end (the rest stays unused), so consecutive segments' names are the
//!   end of the previous one's records. Records are framed as described in
//!   `record.rs`: length, kind, CRCs over the LSN, header and payload; a
//!   group is its change records and a commit record, all-or-nothing on
//!   replay.
//!
//! # What a replay accepts: the torn-tail rule
//! A power cut can leave the end of the log in any state: the last write
//! absent, partly there (any subset of its sectors), or whole; the space
//! after it zeros (fresh preallocation) or stale records (recycled
//! segment, whose CRCs name other positions and so never pass). None of
//! that was acknowledged, because acknowledgment waits for `fdatasync`. But
//! a record that was synced and is now bad is corruption, and skipping it
//! would silently lose acknowledged data. The two are told apart by what
//! the log wrote after the bad spot, not by how the spot looks:
//!
//! 1. A bad record (or a group without its commit) in any segment but the
//!    last is corruption: the log syncs a segment before it starts the next.
//! 2. In the last segment, the replay scans past the bad record (every
//!    8-aligned offset, header CRC first, so zeros cost a byte compare) for
//!    valid commit records. Each commit carries `synced_upto`, the position
//!    up to which the log knew every byte was synced when it appended that
//!    group. If one says `synced_upto` > the bad record's position, the bad
//!    record had been synced: [`LogError::Corrupt`], naming the segment and
//!    offset. Otherwise the bad record lies in what no completed sync
//!    covered: a torn tail. The replay ends at the start of its group, and
//!    every valid-looking record found past that point is zeroed (and
//!    synced) before the first append, so that a shorter group written
//!    there later can never be followed by the remains of an older one.
//!
//! The rule never turns a torn tail into an error (no group appended before
//! a sync can claim that sync), and it catches any corruption of a record
//! that a later, surviving group was appended after the sync of. What it
//! cannot tell from a torn write is damage to the very last synced groups
//! when nothing was appended after their sync: no log can, from the bytes
//! alone.
//!
//! # Faults
//! A failed `fdatasync` is fatal: Linux marks the pages clean after
//! reporting a writeback error, so a retry can succeed without the data
//! ever reaching the disk (PostgreSQL's "fsyncgate"). A failed write may
//! have left part of the group in place. Either way the log refuses every
//! append and sync from then on ([`Health`] says so, for `/healthz`) until
//! it is reopened, when the replay decides what is there. Failing to create
//! the next segment (a full disk) only refuses that append: nothing was
//! written, so the log stays usable and the next append tries again.
//!
//! # Using it
//! ```text
//! // start: replay what sled has not applied (`applied`: the `end` of the
//! // last group sled holds, stored with its data; 0 for a new store)
//! let mut r = Log::open(Box::new(FsDir::open(&data_dir.join("log"))?), LogConfig::default(), applied)?;
//! while let Some(g) = r.next_group()? {
//!     for c in &g.changes { ids.observe(&c.as_change()); /* apply c.as_change() to sled */ }
//!     applied = g.end;
//! }
//! let mut log = r.finish()?;              // the writer, at the tail
//! // per group: the sequencer encodes, the log thread writes
//! buf.clear(); buf.push(&change); ...     // GroupBuf, reused
//! let end = log.append(&mut buf)?;        // one pwrite
//! log.sync()?;                            // one fdatasync: now publish
//! // background: sled applied up to `end` (synced groups only), flushed
//! // and fsync'd, then
//! log.checkpoint(end)?;
//! ```

mod io;
mod record;
mod sim;
#[cfg(test)]
mod tests;

pub use io::{FsDir, LogDir, LogFile};
pub use record::{encode_change, DecodeError, GroupBuf, IdHighWater, OwnedChange};
pub use sim::{SimulatedDisk, Tear};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use record::{record_at, Record, ALIGN, HEADER};

/// A byte position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O error: {op} {file}")]
    Io {
        op: &'static str,
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The log failed earlier (a write or `fdatasync` error) and refuses
    /// writes until it is reopened.
    #[error("the commit log failed earlier and refuses writes until parley restarts")]
    Failed {
        #[source]
        source: Arc<LogError>,
    },
    /// The next segment could not be created (a full disk, typically).
    /// Nothing was written, so the log stays usable: a later append tries
    /// again.
    #[error("cannot create the next commit-log segment {file}")]
    NoSegment {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the commit log is corrupt: segment {segment} at offset {offset}: {reason}")]
    Corrupt {
        segment: String,
        offset: u64,
        reason: String,
    },
}

impl LogError {
    fn io(op: &'static str, file: &str, source: std::io::Error) -> LogError {
        LogError::Io {
            op,
            file: file.to_string(),
            source,
        }
    }

    fn corrupt(segment: &str, offset: usize, reason: impl Into<String>) -> LogError {
        LogError::Corrupt {
            segment: segment.to_string(),
            offset: offset as u64,
            reason: reason.into(),
        }
    }

    /// An equal error (same kind, message and source text), to keep as the
    /// cause of the failed state while the original goes to the caller.
    fn duplicate(&self) -> LogError {
        match self {
            LogError::Io { op, file, source } => LogError::Io {
                op,
                file: file.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            LogError::NoSegment { file, source } => LogError::NoSegment {
                file: file.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            LogError::Failed { source } => LogError::Failed {
                source: source.clone(),
            },
            LogError::Corrupt {
                segment,
                offset,
                reason,
            } => LogError::Corrupt {
                segment: segment.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
        }
    }
}

impl From<LogError> for super::StoreError {
    fn from(e: LogError) -> super::StoreError {
        match e {
            LogError::Corrupt { .. } => super::StoreError::Corrupt(e.to_string()),
            e => super::StoreError::io(e),
        }
    }
}

pub type Result<T> = std::result::Result<T, LogError>;

/// Tunables; the defaults are what parley runs with.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Bytes preallocated per segment (a group larger than this gets a
    /// segment of its own size).
    pub segment_size: u64,
    /// Checkpointed segments kept for reuse instead of deleted.
    pub spare_segments: usize,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_size: 64 << 20,
            spare_segments: 2,
        }
    }
}

/// The log's state as other threads see it: failed or not, and how far it
/// is durable. Cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    failed: OnceLock<Arc<LogError>>,
    durable: AtomicU64,
}

impl Health {
    /// `Err` once the log has failed (for `/healthz` and write refusal).
    pub fn check(&self) -> Result<()> {
        match self.inner.failed.get() {
            Some(e) => Err(LogError::Failed { source: e.clone() }),
            None => Ok(()),
        }
    }

    /// Everything before this position is durable.
    pub fn durable(&self) -> Lsn {
        Lsn(self.inner.durable.load(Ordering::Acquire))
    }
}

const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";

/// Writes the checkpoint record (the LSN and its CRC) durably: a temporary
/// file synced, renamed over the old one, the directory synced.
fn write_checkpoint(dir: &dyn LogDir, upto: Lsn) -> Result<()> {
    let mut rec = [0u8; 16];
    rec[..8].copy_from_slice(&upto.0.to_le_bytes());
    let crc = crc32fast::hash(&rec[..8]);
    rec[8..12].copy_from_slice(&crc.to_le_bytes());
    let _ = dir.remove(CHECKPOINT_TMP);
    let file = dir
        .create(CHECKPOINT_TMP)
        .map_err(|e| LogError::io("create", CHECKPOINT_TMP, e))?;
    file.write_at(&rec, 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| LogError::io("write", CHECKPOINT_TMP, e))?;
    dir.rename(CHECKPOINT_TMP, CHECKPOINT)
        .and_then(|()| dir.sync_dir())
        .map_err(|e| LogError::io("rename", CHECKPOINT, e))
}

fn segment_name(start: u64) -> String {
    format!("{start:016x}.wal")
}

fn parse_segment(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// The writer: append groups, sync, checkpoint. Owned by one thread.
pub struct Log {
    dir: Box<dyn LogDir>,
    config: LogConfig,
    /// Start LSNs of the segments, oldest first; the last is `file`.
    segments: Vec<u64>,
    spares: Vec<String>,
    file: Box<dyn LogFile>,
    /// The current segment's start LSN and file length.
    start: u64,
    cap: u64,
    /// Where the next group goes.
    tail: u64,
    /// Everything before it is synced.
    durable: u64,
    health: Health,
}

impl Log {
    /// Where the last checkpoint left the applied state durable (0 if none
    /// was taken): where a replay must start. The applied state may hold
    /// more than that (it is written in the background), but only up to
    /// here was it synced, so only up to here is it sure to be whole after
    /// a crash; replaying a group it already has changes nothing.
    pub fn checkpointed(dir: &dyn LogDir) -> Result<Lsn> {
        let file = match dir.open(CHECKPOINT) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lsn(0)),
            Err(e) => return Err(LogError::io("open", CHECKPOINT, e)),
        };
        let mut rec = [0u8; 16];
        let n = file
            .read_at(&mut rec, 0)
            .map_err(|e| LogError::io("read", CHECKPOINT, e))?;
        let crc = u32::from_le_bytes(rec[8..12].try_into().expect("4 bytes"));
        if n < 16 || crc != crc32fast::hash(&rec[..8]) {
            // Written and synced before it replaced the old one: a bad one
            // is damage, not a torn write.
            return Err(LogError::corrupt(
                CHECKPOINT,
                0,
                "the checkpoint record fails its checksum",
            ));
        }
        Ok(Lsn(u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"))))
    }

    /// Opens the log in `dir` and replays it from `from` (where the applied
    /// state is known durable, [`Log::checkpointed`]: 0 for a new store). Read the groups with
    /// [`Recovery::next_group`], then [`Recovery::finish`] to append.
    pub fn open(dir: Box<dyn LogDir>, config: LogConfig, from: Lsn) -> Result<Recovery> {
        let mut segments = Vec::new();
        let mut spares = Vec::new();
        for name in dir.list().map_err(|e| LogError::io("list", "log directory", e))? {
            if let Some(start) = parse_segment(&name) {
                segments.push(start);
            } else if name.starts_with("spare-") && name.ends_with(".wal") {
                spares.push(name);
            }
        }
        segments.sort_unstable();
        let from = from.0;
        if from % ALIGN as u64 != 0 {
            return Err(LogError::corrupt(
                "-",
                from as usize,
                "the applied position is not a record boundary",
            ));
        }
        // The segment holding `from`; those before it are wholly applied.
        let index = match segments.iter().rposition(|&s| s <= from) {
            Some(i) => i,
            None if segments.is_empty() => 0,
            None => {
                return Err(LogError::corrupt(
                    &segment_name(segments[0]),
                    0,
                    format!("the log starts after the applied position {from}: segments are missing"),
                ))
            }
        };
        let mut r = Recovery {
            dir,
            config,
            segments,
            spares,
            index,
            buf: Vec::new(),
            pos: 0,
            from,
            tail: from,
            dirty_end: 0,
            done: false,
        };
        if !r.segments.is_empty() {
            r.load(index)?;
            let pos = (from - r.segments[index]) as usize;
            if pos > r.buf.len() {
                return Err(LogError::corrupt(
                    &segment_name(r.segments[index]),
                    pos,
                    "the applied position is past the segment's end",
                ));
            }
            r.pos = pos;
        } else {
            r.done = true;
        }
        Ok(r)
    }

    fn fail(&mut self, e: LogError) -> LogError {
        let _ = self.health.inner.failed.set(Arc::new(e.duplicate()));
        e
    }

    /// Appends `group` at the tail with one write (rolling over to a new
    /// segment first if it does not fit) and returns the position after it:
    /// the group is durable once [`Log::sync`] has returned at least that.
    /// An empty group writes nothing.
    pub fn append(&mut self, group: &mut GroupBuf) -> Result<Lsn> {
        self.health.check()?;
        if group.is_empty() {
            return Ok(Lsn(self.tail));
        }
        let len = group.encoded_len() as u64;
        if self.tail + len > self.start + self.cap {
            self.roll_over(len)?;
        }
        let bytes = group.seal(self.tail, self.durable);
        if let Err(e) = self.file.write_at(bytes, self.tail - self.start) {
            let e = LogError::io("write", &segment_name(self.start), e);
            return Err(self.fail(e));
        }
        self.tail += len;
        Ok(Lsn(self.tail))
    }

    /// Makes every appended group durable: one `fdatasync` (none if nothing
    /// was appended since the last). Returns how far the log is durable.
    pub fn sync(&mut self) -> Result<Lsn> {
        self.health.check()?;
        if self.durable < self.tail {
            if let Err(e) = self.file.sync_data() {
                let e = LogError::io("fdatasync", &segment_name(self.start), e);
                return Err(self.fail(e));
            }
            self.set_durable(self.tail);
        }
        Ok(Lsn(self.durable))
    }

    fn set_durable(&mut self, at: u64) {
        self.durable = at;
        self.health.inner.durable.store(at, Ordering::Release);
    }

    /// Starts a segment at the tail with room for `need` bytes. The current
    /// one is synced first, so that a replay may treat any gap in a segment
    /// that has a successor as corruption (rule 1).
    fn roll_over(&mut self, need: u64) -> Result<()> {
        self.sync()?;
        let at = self.tail;
        let size = round_up(self.config.segment_size.max(need));
        let name = segment_name(at);
        let file = match self.spares.pop() {
            Some(spare) => {
                let r = self.dir.rename(&spare, &name);
                r.map_err(|e| LogError::io("reuse", &spare, e))?;
                self.dir.open(&name)
            }
            // A file of that name is what a refused roll-over at this same
            // position could not remove: nothing was appended since.
            None => self.dir.create(&name).or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => self.dir.open(&name),
                _ => Err(e),
            }),
        };
        let ready = file.and_then(|f| {
            let len = f.size()?;
            if len < size {
                f.allocate(size)?;
                return Ok((f, size));
            }
            Ok((f, len))
        });
        let (file, cap) = match ready {
            Ok(ready) => ready,
            Err(e) => {
                // A full disk: nothing was written into the new segment, so
                // the log stays usable; the next append tries again.
                let _ = self.dir.remove(&name);
                return Err(LogError::NoSegment {
                    file: name,
                    source: e,
                });
            }
        };
        if let Err(e) = self.dir.sync_dir() {
            // Whether the new name is durable is unknown: appending to a
            // file that may vanish in a power cut would lose acknowledged
            // groups.
            return Err(self.fail(LogError::io("fsync of the directory for", &name, e)));
        }
        self.file = file;
        self.start = at;
        self.cap = cap;
        self.segments.push(at);
        Ok(())
    }

    /// Records that the applied state is durable at `upto` (the `checkpoint`
    /// file, written and synced before anything is recycled: a replay starts
    /// there, see [`Log::checkpointed`]), then recycles the segments wholly
    /// below it: kept as spares up to the configured number, deleted
    /// otherwise. The current segment always stays. An error here leaves
    /// old segments behind, which the next checkpoint or open removes; it
    /// does not fail the log.
    pub fn checkpoint(&mut self, upto: Lsn) -> Result<()> {
        write_checkpoint(&*self.dir, upto)?;
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1] <= upto.0 {
            let name = segment_name(self.segments[0]);
            if self.spares.len() < self.config.spare_segments {
                let spare = format!("spare-{}", name);
                self.dir
                    .rename(&name, &spare)
                    .map_err(|e| LogError::io("recycle", &name, e))?;
                self.spares.push(spare);
            } else {
                self.dir
                    .remove(&name)
                    .map_err(|e| LogError::io("remove", &name, e))?;
            }
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            self.dir
                .sync_dir()
                .map_err(|e| LogError::io("fsync of the directory after recycling", "log", e))?;
        }
        Ok(())
    }

    /// Where the next group goes: the end of everything appended.
    pub fn tail(&self) -> Lsn {
        Lsn(self.tail)
    }

    /// Everything before this is durable.
    pub fn durable(&self) -> Lsn {
        Lsn(self.durable)
    }

    /// A handle other threads can watch the log's state by.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Segment start LSNs, oldest first (for tests and metrics).
    pub fn segments(&self) -> &[u64] {
        &self.segments
    }
}

/// A whole committed group read back from the log.
#[derive(Debug)]
pub struct ReplayedGroup {
    /// Where the group starts.
    pub start: Lsn,
    /// Where it ends: the position the applied state reflects once this
    /// group is applied.
    pub end: Lsn,
    pub changes: Vec<OwnedChange>,
}

/// An opened log being replayed; [`Recovery::finish`] turns it into the
/// writer.
pub struct Recovery {
    dir: Box<dyn LogDir>,
    config: LogConfig,
    segments: Vec<u64>,
    spares: Vec<String>,
    /// The segment being read, its bytes (cut at the next segment's start
    /// when it has a successor) and the read position in it.
    index: usize,
    buf: Vec<u8>,
    pos: usize,
    /// Where the replay started, and where it ended (once `done`).
    from: u64,
    tail: u64,
    /// In the last segment: the end of the last valid-looking record past
    /// the tail, to be zeroed before appending.
    dirty_end: usize,
    done: bool,
}

impl Recovery {
    fn name(&self) -> String {
        segment_name(self.segments[self.index])
    }

    /// Reads segment `index` whole (it was preallocated, so its length is
    /// its capacity; a successor's start bounds what belongs to it).
    fn load(&mut self, index: usize) -> Result<()> {
        self.index = index;
        let name = self.name();
        let file = self.dir.open(&name).map_err(|e| LogError::io("open", &name, e))?;
        let len = file.size().map_err(|e| LogError::io("stat", &name, e))? as usize;
        let limit = match self.segments.get(index + 1) {
            Some(&next) => {
                let limit = (next - self.segments[index]) as usize;
                if limit > len {
                    return Err(LogError::corrupt(
                        &name,
                        len,
                        format!("the segment ends before the next one starts (at LSN {next})"),
                    ));
                }
                limit
            }
            None => len,
        };
        self.buf.clear();
        self.buf.resize(limit, 0);
        let n = file
            .read_at(&mut self.buf, 0)
            .map_err(|e| LogError::io("read", &name, e))?;
        self.buf.truncate(n);
        self.pos = 0;
        Ok(())
    }

    /// The next whole committed group, in log order; `None` at the end.
    pub fn next_group(&mut self) -> Result<Option<ReplayedGroup>> {
        while !self.done {
            if let Some(g) = self.group_here()? {
                return Ok(Some(g));
            }
        }
        Ok(None)
    }

    /// The group at the read position, or `None` when the records of the
    /// segment end there (the replay then moved to the next segment, or is
    /// done).
    fn group_here(&mut self) -> Result<Option<ReplayedGroup>> {
        let base = self.segments[self.index];
        let group = self.pos;
        let mut changes = Vec::new();
        loop {
            match record_at(&self.buf, self.pos, base) {
                Some((Record::Change(payload), next)) => {
                    let change = OwnedChange::decode(payload)
                        .map_err(|e| LogError::corrupt(&self.name(), self.pos, e.to_string()))?;
                    changes.push(change);
                    self.pos = next;
                }
                Some((Record::Commit { changes: n, .. }, next)) if n as usize == changes.len() => {
                    self.pos = next;
                    return Ok(Some(ReplayedGroup {
                        start: Lsn(base + group as u64),
                        end: Lsn(base + next as u64),
                        changes,
                    }));
                }
                _ => return self.end_of_records(group).map(|()| None),
            }
        }
    }

    /// The records of the current segment end at `self.pos`, inside the
    /// group starting at `group`: the next segment, the torn tail, or
    /// corruption (the rule in the module doc).
    fn end_of_records(&mut self, group: usize) -> Result<()> {
        let base = self.segments[self.index];
        if self.index + 1 < self.segments.len() {
            if self.pos == group && self.pos == self.buf.len() {
                return self.load(self.index + 1);
            }
            return Err(LogError::corrupt(
                &self.name(),
                self.pos,
                "a bad record in a segment that has a successor (it was synced before the next began)",
            ));
        }
        // The last segment: was the bad record ever synced?
        let bad = self.pos;
        let mut dirty_end = bad;
        // From the bad spot itself: a valid commit whose count did not
        // match is dirty too.
        let mut q = bad;
        while q + HEADER <= self.buf.len() {
            match record_at(&self.buf, q, base) {
                Some((rec, next)) => {
                    if let Record::Commit { synced_upto, .. } = rec {
                        if synced_upto > base + bad as u64 {
                            return Err(LogError::corrupt(
                                &self.name(),
                                bad,
                                format!(
                                    "a bad record, yet the group committed at offset {q} was appended after \
                                     the log was synced up to LSN {synced_upto}"
                                ),
                            ));
                        }
                    }
                    dirty_end = next;
                    q = next;
                }
                None => q += ALIGN,
            }
        }
        self.tail = base + group as u64;
        self.dirty_end = dirty_end;
        self.pos = group;
        self.done = true;
        Ok(())
    }

    /// Where the replay ended: the next append goes here.
    pub fn tail(&self) -> Lsn {
        Lsn(self.tail)
    }

    /// Ends the replay (reading any groups not yet read) and returns the
    /// writer, positioned at the tail. Before it returns, whatever followed
    /// the tail and looked like records is zeroed and the tail segment
    /// synced: the replayed groups will be shown after the restart, so they
    /// must be durable even if the crash was only a process's.
    pub fn finish(mut self) -> Result<Log> {
        while self.next_group()?.is_some() {}
        let health = Health::default();
        if self.segments.is_empty() {
            let mut log = Log {
                dir: self.dir,
                config: self.config,
                segments: Vec::new(),
                spares: self.spares,
                file: Box::new(NoFile),
                start: self.tail,
                cap: 0,
                tail: self.tail,
                durable: self.tail,
                health,
            };
            log.roll_over(0)?;
            return Ok(log);
        }
        let name = self.name();
        let start = self.segments[self.index];
        let file = self.dir.open(&name).map_err(|e| LogError::io("open", &name, e))?;
        let tail_off = (self.tail - start) as usize;
        if self.dirty_end > tail_off {
            let zeros = vec![0u8; self.dirty_end - tail_off];
            file.write_at(&zeros, tail_off as u64)
                .map_err(|e| LogError::io("zero the torn tail of", &name, e))?;
        }
        let mut cap = file.size().map_err(|e| LogError::io("stat", &name, e))?;
        let size = round_up(self.config.segment_size);
        if cap < size {
            // The preallocation did not survive the cut: reserve the space
            // again.
            file.allocate(size)
                .map_err(|e| LogError::io("allocate", &name, e))?;
            cap = size;
        }
        file.sync_data()
            .map_err(|e| LogError::io("fdatasync", &name, e))?;
        let mut log = Log {
            dir: self.dir,
            config: self.config,
            segments: self.segments,
            spares: self.spares,
            file,
            start,
            cap: cap / ALIGN as u64 * ALIGN as u64,
            tail: self.tail,
            durable: 0,
            health,
        };
        log.set_durable(self.tail);
        // Segments wholly below the replay's start are applied already.
        log.checkpoint(Lsn(self.from))?;
        Ok(log)
    }
}

/// The "current segment" of a log that has none yet; replaced by the first
/// roll-over before anything is written.
struct NoFile;

impl LogFile for NoFile {
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("no segment"))
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<usize> {
        Ok(0)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(0)
    }
    fn allocate(&self, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("no segment"))
    }
}
