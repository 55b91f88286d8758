//! Where a token comes from and whether it is valid, on arbitrary input.
//! The oracle is `parley_fuzz::check_token`; `tests/corpus.rs` runs it over
//! the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: parley_fuzz::TokenInput<'_>| parley_fuzz::check_token(&input));
