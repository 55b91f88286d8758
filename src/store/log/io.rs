//! The log's file I/O, behind two small traits, so that tests can run the
//! log on a [`super::SimulatedDisk`] that loses what a power cut loses.
//! [`FsDir`] is the real thing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One segment file.
pub trait LogFile: Send + Sync {
    /// Writes all of `buf` at `offset` (one `pwrite`, unless the kernel
    /// writes short).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync`: every write before it is durable once it returns.
    fn sync_data(&self) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
    /// Reserves the file's blocks up to `len` (zero-filled), so that
    /// appends neither run out of space nor change the file's size (which
    /// would make every `fdatasync` write metadata too).
    fn allocate(&self, len: u64) -> io::Result<()>;
}

/// The log's directory.
pub trait LogDir: Send + Sync {
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, name: &str) -> io::Result<Box<dyn LogFile>>;
    fn open(&self, name: &str) -> io::Result<Box<dyn LogFile>>;
    /// The names of the files in it.
    fn list(&self) -> io::Result<Vec<String>>;
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// `fsync` of the directory: creations, renames and removals before it
    /// survive a power cut once it returns.
    fn sync_dir(&self) -> io::Result<()>;
}

/// A directory on the real file system (`<data_dir>/log`).
pub struct FsDir {
    path: PathBuf,
    dir: File,
}

impl FsDir {
    /// Opens `path`, creating it (and making its entry in the parent
    /// durable) if it is missing.
    pub fn open(path: &Path) -> io::Result<FsDir> {
        if !path.exists() {
            std::fs::create_dir_all(path)?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(FsDir {
            path: path.to_path_buf(),
            dir: File::open(path)?,
        })
    }
}

struct FsFile(File);

impl LogFile for FsFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(&self.0, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
    fn sync_data(&self) -> io::Result<()> {
        // `File::sync_data` is `fdatasync(2)` on Linux.
        self.0.sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        use rustix::io::Errno;
        let start = self.0.metadata()?.len();
        match fallocate(&self.0, FallocateFlags::empty(), 0, len) {
            Ok(()) => {}
            // File systems without fallocate: a sparse file of the right
            // size still keeps appends from changing the size.
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS => return self.0.set_len(len),
            Err(e) => return Err(e.into()),
        }
        // fallocate leaves the blocks "unwritten": the first write to each
        // one converts its extent, a metadata change that every
        // `fdatasync` after it must commit through the file system's
        // journal. Writing the zeros once now (as PostgreSQL does for new
        // WAL segments) keeps the per-group `fdatasync` to the data alone.
        let zeros = vec![0u8; 1 << 20];
        let mut at = start;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.0.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.0.sync_data()
    }
}

impl LogDir for FsDir {
    fn create(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path.join(name))?;
        Ok(Box::new(FsFile(f)))
    }
    fn open(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path.join(name))?;
        Ok(Box::new(FsFile(f)))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.path)? {
            if let Ok(name) = e?.file_name().into_string() {
                out.push(name);
            }
        }
        Ok(out)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path.join(from), self.path.join(to))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.dir.sync_all()
    }
}
