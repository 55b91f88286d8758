//! A disk that loses what a power cut loses, for tests: the log's files and
//! directory in memory, with what was made durable kept apart from what
//! was only written.
//!
//! - A write lands in the file's current content; only `sync_data` makes it
//!   durable. A new file, a rename or a removal is durable only after
//!   `sync_dir`.
//! - [`SimulatedDisk::cut`] is a power cut, at any moment, from any thread:
//!   the disk goes back to its durable state, except that the last write
//!   not yet synced may leave a random prefix behind ([`Tear::LastPrefix`]),
//!   or every unsynced write may leave a random subset of its 512-byte
//!   sectors ([`Tear::Sectors`], what a disk that reorders writes in its
//!   cache can do). Every handle opened before the cut fails from then on,
//!   as if its process had died; the log is reopened on the same disk.
//! - Faults on demand: failing syncs, failing writes, a full disk.
//!
//! Cloning shares the disk (so a test can cut it while other threads use
//! the log on it).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::io::{LogDir, LogFile};

/// What a cut keeps of the writes that were not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tear {
    /// A random prefix (possibly empty, possibly whole) of the last write.
    LastPrefix,
    /// A random subset of the 512-byte sectors of every unsynced write.
    Sectors,
}

#[derive(Clone)]
pub struct SimulatedDisk {
    inner: Arc<Mutex<Sim>>,
}

struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a cut.
    durable: Vec<u8>,
    /// Unsynced writes, oldest first: (offset, len).
    pending: Vec<(u64, usize)>,
}

struct Sim {
    /// Bumped by every cut: handles of an older generation are dead.
    generation: u64,
    next_inode: u64,
    inodes: BTreeMap<u64, Inode>,
    dir: BTreeMap<String, u64>,
    durable_dir: BTreeMap<String, u64>,
    /// The last write not yet synced: (inode, offset, len).
    last_write: Option<(u64, u64, usize)>,
    tear: Tear,
    rng: StdRng,
    fail_syncs: u32,
    fail_writes: u32,
    full: bool,
    syncs: u64,
}

fn dead() -> io::Error {
    io::Error::other("simulated power cut: this handle died with its process")
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("simulated {what} failure"))
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl SimulatedDisk {
    /// An empty disk whose cuts draw from `seed`.
    pub fn new(seed: u64) -> SimulatedDisk {
        SimulatedDisk {
            inner: Arc::new(Mutex::new(Sim {
                generation: 0,
                next_inode: 1,
                inodes: BTreeMap::new(),
                dir: BTreeMap::new(),
                durable_dir: BTreeMap::new(),
                last_write: None,
                tear: Tear::LastPrefix,
                rng: StdRng::seed_from_u64(seed),
                fail_syncs: 0,
                fail_writes: 0,
                full: false,
                syncs: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sim> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_tear(&self, tear: Tear) {
        self.lock().tear = tear;
    }

    /// The next `n` `sync_data` calls fail (and make nothing durable).
    pub fn fail_syncs(&self, n: u32) {
        self.lock().fail_syncs = n;
    }

    /// The next `n` writes fail; each leaves a random prefix written (as a
    /// real failed write may).
    pub fn fail_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    /// While full, allocations and writes past a file's end fail with
    /// `ENOSPC`; writes into allocated space still succeed.
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    /// `sync_data` calls that succeeded so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// A directory view of the disk, for [`super::Log::open`].
    pub fn dir(&self) -> Box<dyn LogDir> {
        let generation = self.lock().generation;
        Box::new(SimDir {
            disk: self.clone(),
            generation,
        })
    }

    /// The power goes: see the module doc. Returns the generation now
    /// current; handles from before fail.
    pub fn cut(&self) -> u64 {
        let mut s = self.lock();
        let s = &mut *s;
        let mut keep: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        match s.tear {
            Tear::LastPrefix => {
                if let Some((ino, off, len)) = s.last_write {
                    // Nothing, all, or a random part: the ends are the
                    // cases that matter most, so they are not left to a
                    // 1-in-len chance.
                    let n = match s.rng.random_range(0..4) {
                        0 => 0,
                        1 => len,
                        _ => s.rng.random_range(0..=len),
                    };
                    let data = &s.inodes[&ino].data;
                    let o = off as usize;
                    keep.push((ino, off, data[o..o + n].to_vec()));
                }
            }
            Tear::Sectors => {
                for (&ino, inode) in &s.inodes {
                    for &(off, len) in &inode.pending {
                        let (start, end) = (off as usize, off as usize + len);
                        let mut at = start;
                        while at < end {
                            let next = ((at / 512) + 1) * 512;
                            let next = next.min(end);
                            if s.rng.random_bool(0.5) && next <= inode.data.len() {
                                keep.push((ino, at as u64, inode.data[at..next].to_vec()));
                            }
                            at = next;
                        }
                    }
                }
            }
        }
        for inode in s.inodes.values_mut() {
            inode.data = inode.durable.clone();
            inode.pending.clear();
        }
        for (ino, off, bytes) in keep {
            let inode = s.inodes.get_mut(&ino).expect("inode");
            let end = off as usize + bytes.len();
            if inode.data.len() < end {
                inode.data.resize(end, 0);
            }
            inode.data[off as usize..end].copy_from_slice(&bytes);
            inode.durable = inode.data.clone();
        }
        s.dir = s.durable_dir.clone();
        let live: std::collections::HashSet<u64> = s.dir.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        s.last_write = None;
        s.generation += 1;
        s.generation
    }

    /// Changes `name`'s bytes at `offset` on the disk itself (durably), as
    /// bit rot would: for corruption tests.
    pub fn corrupt(&self, name: &str, offset: u64, f: impl FnOnce(&mut u8)) {
        let mut s = self.lock();
        let ino = s.dir[name];
        let inode = s.inodes.get_mut(&ino).expect("inode");
        let o = offset as usize;
        f(&mut inode.data[o]);
        if inode.durable.len() <= o {
            inode.durable.resize(o + 1, 0);
        }
        inode.durable[o] = inode.data[o];
    }

    /// The current names in the directory.
    pub fn names(&self) -> Vec<String> {
        self.lock().dir.keys().cloned().collect()
    }

    /// A file's current bytes.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let s = self.lock();
        s.dir.get(name).map(|ino| s.inodes[ino].data.clone())
    }
}

struct SimDir {
    disk: SimulatedDisk,
    generation: u64,
}

struct SimFile {
    disk: SimulatedDisk,
    inode: u64,
    generation: u64,
}

impl SimDir {
    fn live(&self) -> io::Result<MutexGuard<'_, Sim>> {
        let s = self.disk.lock();
        if s.generation != self.generation {
            return Err(dead());
        }
        Ok(s)
    }

    fn handle(&self, inode: u64) -> Box<dyn LogFile> {
        Box::new(SimFile {
            disk: self.disk.clone(),
            inode,
            generation: self.generation,
        })
    }
}

impl LogDir for SimDir {
    fn create(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let mut s = self.live()?;
        if s.dir.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let ino = s.next_inode;
        s.next_inode += 1;
        s.inodes.insert(
            ino,
            Inode {
                data: Vec::new(),
                durable: Vec::new(),
                pending: Vec::new(),
            },
        );
        s.dir.insert(name.to_string(), ino);
        drop(s);
        Ok(self.handle(ino))
    }
    fn open(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let s = self.live()?;
        let ino = *s
            .dir
            .get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        drop(s);
        Ok(self.handle(ino))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.live()?.dir.keys().cloned().collect())
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.live()?;
        let ino = s
            .dir
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        s.dir.insert(to.to_string(), ino);
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.live()?;
        s.dir
            .remove(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        let mut s = self.live()?;
        s.durable_dir = s.dir.clone();
        Ok(())
    }
}

impl SimFile {
    fn live(&self) -> io::Result<MutexGuard<'_, Sim>> {
        let s = self.disk.lock();
        if s.generation != self.generation {
            return Err(dead());
        }
        Ok(s)
    }
}

impl LogFile for SimFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.live()?;
        let s = &mut *s;
        let o = offset as usize;
        let end = o + buf.len();
        let mut n = buf.len();
        let mut fail = None;
        if s.fail_writes > 0 {
            s.fail_writes -= 1;
            n = s.rng.random_range(0..=buf.len());
            fail = Some(injected("write"));
        }
        let inode = s.inodes.get_mut(&self.inode).expect("inode");
        if s.full && end > inode.data.len() {
            return Err(no_space());
        }
        if inode.data.len() < o + n {
            inode.data.resize(o + n, 0);
        }
        inode.data[o..o + n].copy_from_slice(&buf[..n]);
        inode.pending.push((offset, n));
        s.last_write = Some((self.inode, offset, n));
        match fail {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let s = self.live()?;
        let data = &s.inodes[&self.inode].data;
        let o = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - o);
        buf[..n].copy_from_slice(&data[o..o + n]);
        Ok(n)
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.live()?;
        let s = &mut *s;
        if s.fail_syncs > 0 {
            s.fail_syncs -= 1;
            // What the kernel does after a failed writeback: the pages are
            // marked clean and their contents may never reach the disk.
            return Err(injected("fdatasync"));
        }
        let inode = s.inodes.get_mut(&self.inode).expect("inode");
        inode.durable.resize(inode.data.len(), 0);
        for &(off, len) in &inode.pending {
            let (a, b) = (off as usize, off as usize + len);
            inode.durable[a..b].copy_from_slice(&inode.data[a..b]);
        }
        inode.pending.clear();
        if s.last_write.is_some_and(|(ino, _, _)| ino == self.inode) {
            s.last_write = None;
        }
        s.syncs += 1;
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.live()?.inodes[&self.inode].data.len() as u64)
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut s = self.live()?;
        let full = s.full;
        let inode = s.inodes.get_mut(&self.inode).expect("inode");
        if (inode.data.len() as u64) < len {
            if full {
                return Err(no_space());
            }
            let old = inode.data.len();
            inode.data.resize(len as usize, 0);
            // The new size becomes durable with the next sync (fdatasync
            // writes the size when data needs it).
            inode.pending.push((old as u64, len as usize - old));
        }
        Ok(())
    }
}
