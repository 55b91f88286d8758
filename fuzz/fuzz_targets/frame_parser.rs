//! Arbitrary bytes as a chat socket's read buffer: decode frames one after
//! another (decode, advance by `len`, until `Ok(None)` or `Err`), and parse
//! every whole text message as a chat command, as `ws::Conn` does.
//!
//! Fragmented text messages (a non-final Text frame, then Continuation
//! frames) are reassembled and parsed too, with the same size limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley::protocol;
use parley::wire::{self as frame, OpCode};

/// The server's defaults (`--max-frame-bytes`, `--max-message-chars`).
const MAX_FRAME_BYTES: usize = 65536;
const MAX_CHARS: usize = 4000;

fn parse(payload: &mut [u8]) {
    // The server refuses non-UTF-8 text before parsing; the parser must not
    // panic on it either, so it gets every text payload.
    let _ = protocol::parse_command(payload, MAX_CHARS);
}

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut pos = 0;
    let mut fragments: Option<Vec<u8>> = None;
    loop {
        let mut needed = 0;
        match frame::decode(&mut buf[pos..], MAX_FRAME_BYTES, &mut needed) {
            Ok(Some(f)) => {
                let rest = buf.len() - pos;
                assert!(f.len <= rest, "frame longer than the buffer");
                assert!(f.payload.start <= f.payload.end && f.payload.end == f.len);
                assert!(f.payload.len() <= MAX_FRAME_BYTES);
                let payload = pos + f.payload.start..pos + f.payload.end;
                pos += f.len;
                match (f.opcode, f.fin) {
                    (OpCode::Text, true) => parse(&mut buf[payload]),
                    (OpCode::Text, false) => fragments = Some(buf[payload].to_vec()),
                    (OpCode::Continuation, fin) => {
                        let Some(fr) = fragments.as_mut() else { break };
                        if fr.len() + payload.len() > MAX_FRAME_BYTES {
                            break;
                        }
                        fr.extend_from_slice(&buf[payload]);
                        if fin {
                            if let Some(mut whole) = fragments.take() {
                                parse(&mut whole);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Ok(None) => {
                assert!(needed > buf.len() - pos, "asked for bytes it already has");
                break;
            }
            Err(_) => break,
        }
    }
});
