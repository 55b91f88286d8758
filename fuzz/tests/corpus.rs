//! Every stored corpus input through its target's oracle, on a stable
//! toolchain: what CI runs (`.ci/fuzz.sh`). libFuzzer explores further
//! (nightly flags, `fuzz/README.md`); this keeps what it found checked.

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};

/// The inputs of one corpus, with their names; fails on an empty corpus
/// (then nothing would be checked).
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    assert!(
        inputs.len() > 100,
        "{target}: only {} corpus inputs",
        inputs.len()
    );
    inputs
}

/// Runs `check` on each input, naming the one that fails.
fn each(target: &str, check: impl Fn(&[u8])) {
    let inputs = corpus(target);
    for (name, data) in &inputs {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(data))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target}: corpus input {name} fails its oracle: {msg}");
        }
    }
    println!("{target}: {} corpus inputs pass", inputs.len());
}

#[test]
fn frame_parser_corpus_passes_its_oracle() {
    each("frame_parser", parley_fuzz::check_frames);
}

#[test]
fn token_extraction_corpus_passes_its_oracle() {
    each("token_extraction", |data| {
        // As libfuzzer-sys builds a target's input from its bytes.
        if let Ok(input) = parley_fuzz::TokenInput::arbitrary_take_rest(Unstructured::new(data)) {
            parley_fuzz::check_token(&input);
        }
    });
}

/// The oracles can fail: hand-made frames the reference and parley must
/// agree on, including each refusal.
#[test]
fn frame_parser_oracle_covers_the_refusals() {
    use parley_fuzz::reference::{decode, encode_masked, Decoded};
    let text = encode_masked(
        true,
        0x1,
        br#"{"type":"chat_message","message":"hi"}"#,
        [1, 2, 3, 4],
    );
    parley_fuzz::check_frames(&text);
    assert!(matches!(
        decode(&text, 65536, true),
        Decoded::Frame { opcode: 1, .. }
    ));
    for (bytes, code) in [
        (vec![0x83, 0x80, 0, 0, 0, 0], 1002),                // reserved opcode
        (vec![0xC1, 0x80, 0, 0, 0, 0], 1002),                // RSV1
        (vec![0x81, 0x00], 1002),                            // unmasked
        (vec![0x09, 0x80, 0, 0, 0, 0], 1002),                // fragmented ping
        (vec![0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0], 1009), // 2^63 bytes
    ] {
        assert_eq!(decode(&bytes, 65536, true), Decoded::Refused(code), "{bytes:x?}");
        parley_fuzz::check_frames(&bytes);
    }
}

/// The token oracle can fail: a correctly signed, unexpired token whose
/// subject `valid_username` refuses must not be accepted.
#[test]
fn token_oracle_covers_a_bad_subject() {
    for sub in ["a b", "", "x\u{0}y"] {
        let claims = format!(r#"{{"sub":{},"exp":9999999999}}"#, serde_json::json!(sub));
        for strict in [false, true] {
            parley_fuzz::check_token(&parley_fuzz::TokenInput {
                socket: false,
                strict,
                authorization: vec![],
                protocol: vec![],
                query: None,
                param: "token",
                token: "",
                jwt_header: None,
                jwt_claims: claims.as_bytes(),
            });
        }
    }
}
