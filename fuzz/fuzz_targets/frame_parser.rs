//! Arbitrary bytes as a chat socket's read buffer: parley's frame decoder
//! against a reference decoder, re-encoding round trips, and every whole
//! text frame through the command parser. The oracle is
//! `parley_fuzz::check_frames`; `tests/corpus.rs` runs it over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| parley_fuzz::check_frames(data));
