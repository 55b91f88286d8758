//! The log + sled backend passes the conformance suite, on a real directory
//! and on a simulated disk. (Power cuts under load, through the real
//! sequencer: `sequencer::power_cut`.)

use super::*;
use crate::store::log::SimulatedDisk;

fn open(dir: &std::path::Path, options: impl Fn() -> WalOptions) -> WalStore {
    crate::store::reopen(|| WalStore::open(dir, options()))
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
