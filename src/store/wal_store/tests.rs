//! The log + sled backend: the conformance suite, replay at start, faults,
//! and power cuts under concurrent load through the real sequencer.

use super::*;
use crate::store::log::SimulatedDisk;

/// Opens a `WalStore` on `dir`, retrying (bounded) while sled's lock is
/// still held by a handle dropped a moment ago.
fn open(dir: &std::path::Path, options: impl Fn() -> WalOptions) -> WalStore {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match WalStore::open(dir, options()) {
            Ok(s) => return s,
            Err(StoreError::Open { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open: {}", e.chain()),
        }
    }
}

#[test]
fn passes_the_store_conformance_suite() {
    struct Wal(tempfile::TempDir);
    impl crate::store::conformance::Backend for Wal {
        fn open(&self) -> Box<dyn Store> {
            Box::new(open(self.0.path(), WalOptions::default))
        }
    }
    crate::store::conformance::run(&Wal(tempfile::tempdir().unwrap()));
}

/// The conformance suite again on a simulated disk, with tiny segments and
/// sled never written: every read goes through the overlay, and every
/// reopen replays the whole log.
#[test]
fn passes_the_store_conformance_suite_on_a_simulated_disk() {
    struct Sim(tempfile::TempDir, SimulatedDisk);
    impl crate::store::conformance::Backend for Sim {
        fn open(&self) -> Box<dyn Store> {
            Box::new(open(self.0.path(), || WalOptions {
                segment_bytes: 4096,
                checkpoint_bytes: Some(u64::MAX),
                log_dir: Some(self.1.dir()),
                // Everything read through the overlay, and every reopen a
                // replay of the whole log.
                apply_in_background: false,
                ..WalOptions::default()
            }))
        }
    }
    crate::store::conformance::run(&Sim(tempfile::tempdir().unwrap(), SimulatedDisk::new(7)));
}
