//! Faults only a test can ask for: compiled with the `test-hooks` feature
//! alone, which only `cargo test` turns on (the crate is its own
//! dev-dependency with that feature, see Cargo.toml). `cargo build`,
//! `cargo run` and release binaries contain none of this.
//!
//! `PARLEY_TEST_PANIC=<site>:<text>`: the chat message whose text is `<text>`
//! panics at `<site>` (`socket`: in its socket's task, `sequencer`: in the
//! writer), so the failure table's "a bug panics" row has a test.

use std::sync::OnceLock;

/// Panics if the test asked for a panic at `site` on this text.
pub fn panic_if_asked(site: &str, text: &str) {
    static ASKED: OnceLock<Option<(String, String)>> = OnceLock::new();
    let asked = ASKED.get_or_init(|| {
        let v = std::env::var("PARLEY_TEST_PANIC").ok()?;
        let (s, t) = v.split_once(':')?;
        Some((s.to_string(), t.to_string()))
    });
    if let Some((s, t)) = asked {
        if s == site && t == text {
            panic!("PARLEY_TEST_PANIC: a panic asked for in the {site}");
        }
    }
}
