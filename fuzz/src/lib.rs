//! The fuzz targets' oracles, as plain functions: each `fuzz_targets/*.rs`
//! is one line calling one of them, and `tests/corpus.rs` runs them over
//! every stored corpus input on a stable toolchain (what CI does; libFuzzer
//! itself needs nightly flags). An oracle panics when parley is wrong.
//!
//! - [`check_frames`]: parley's frame decoder (`wire::decode`, the one the
//!   server runs) against [`reference`], a small RFC 6455 decoder written
//!   from the RFC; every decoded frame re-encoded (parley's `put_frame`,
//!   and masked by the reference encoder) decodes to the same frame; every
//!   whole text frame goes to [`check_command`].
//! - [`check_command`]: `protocol::parse_command` against `serde_json`: what
//!   parley accepts is a JSON object of that type with that text, and the
//!   text survives the event encoder (`encode_chat_event`) byte for byte.
//! - [`check_token`]: token extraction and verification never panic, and
//!   never accept a subject `valid_username` refuses.

use std::path::Path;
use std::sync::LazyLock;

use arbitrary::Arbitrary;
use bytes::BytesMut;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::{Algorithm, EncodingKey};
use parley::auth::{self, Verifier};
use parley::config::Config;
use parley::protocol::{self, ChatEvent, Command, MessageView, Micros};
use parley::wire::{self, OpCode};

/// The server's defaults (`--max-frame-bytes`, `--max-message-chars`).
pub const MAX_FRAME_BYTES: usize = 65536;
pub const MAX_CHARS: usize = 4000;

pub mod reference {
    //! RFC 6455 §5.2 for frames a client sends, written independently of
    //! `parley::wire`: the comparison point for its decoder.

    /// What the reference makes of the start of a buffer.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Decoded {
        /// The frame is not whole: it takes this many bytes in all (or at
        /// least this many, while the header itself is cut).
        Incomplete(usize),
        /// The connection must close with this code.
        Refused(u16),
        Frame {
            fin: bool,
            opcode: u8,
            payload: Vec<u8>,
            len: usize,
        },
    }

    /// Decodes one frame. `masked`: a client's frame, which must be masked
    /// (a server's must not be, for the encode round trip).
    pub fn decode(buf: &[u8], max_payload: usize, masked: bool) -> Decoded {
        if buf.len() < 2 {
            return Decoded::Incomplete(2);
        }
        let fin = buf[0] >> 7 == 1;
        let rsv = (buf[0] >> 4) & 0b111;
        let opcode = buf[0] & 0xF;
        let has_mask = buf[1] >> 7 == 1;
        if rsv != 0 || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) || has_mask != masked {
            return Decoded::Refused(1002);
        }
        let short = (buf[1] & 0x7F) as u64;
        let (len, header) = match short {
            126 if buf.len() < 4 => return Decoded::Incomplete(4),
            126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() < 10 => return Decoded::Incomplete(10),
            127 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
            n => (n, 2),
        };
        let control = opcode >= 8;
        if control && (len > 125 || !fin) {
            return Decoded::Refused(1002);
        }
        if len > max_payload as u64 {
            return Decoded::Refused(1009);
        }
        let key_len = if masked { 4 } else { 0 };
        let total = header + key_len + len as usize;
        if buf.len() < total {
            return Decoded::Incomplete(total);
        }
        let key = &buf[header..header + key_len];
        let payload = buf[header + key_len..total]
            .iter()
            .enumerate()
            .map(|(i, b)| if masked { b ^ key[i % 4] } else { *b })
            .collect();
        Decoded::Frame {
            fin,
            opcode,
            payload,
            len: total,
        }
    }

    /// A masked client frame, shortest length form.
    pub fn encode_masked(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }
}

use reference::Decoded;

/// An opcode's 4 bits (`wire` keeps its own mapping private).
fn bits(op: OpCode) -> u8 {
    match op {
        OpCode::Continuation => 0x0,
        OpCode::Text => 0x1,
        OpCode::Binary => 0x2,
        OpCode::Close => 0x8,
        OpCode::Ping => 0x9,
        OpCode::Pong => 0xA,
    }
}

fn opcode(bits: u8) -> OpCode {
    match bits {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        b => panic!("a decoded frame with opcode {b:#x}"),
    }
}

/// parley's decoder on `buf`, in the reference's terms.
fn parley_decode(buf: &mut [u8], max: usize) -> Decoded {
    let mut needed = 0;
    match wire::decode(buf, max, &mut needed) {
        Ok(Some(f)) => Decoded::Frame {
            fin: f.fin,
            opcode: bits(f.opcode),
            payload: buf[f.payload.clone()].to_vec(),
            len: f.len,
        },
        Ok(None) => Decoded::Incomplete(needed),
        Err(v) => Decoded::Refused(v.code),
    }
}

/// Arbitrary bytes as a socket's read buffer: frames decoded one after
/// another by parley and by the reference, which must agree on every frame
/// (header, unmasked payload, length), on where more bytes are needed, and
/// on the close code of a refusal.
pub fn check_frames(data: &[u8]) {
    let mut pos = 0;
    let mut key = [0x5Au8, 0xA5, 0x0F, 0xF0];
    loop {
        let rest = &data[pos..];
        let want = reference::decode(rest, MAX_FRAME_BYTES, true);
        let got = parley_decode(&mut rest.to_vec(), MAX_FRAME_BYTES);
        assert_eq!(got, want, "parley and the reference disagree at byte {pos}");
        let Decoded::Frame {
            fin,
            opcode,
            payload,
            len,
        } = got
        else {
            return;
        };
        pos += len;
        check_round_trip(fin, opcode, &payload, key);
        key.rotate_left(1);
        if opcode == 0x1 && fin {
            check_command(&payload);
        }
    }
}

/// A decoded frame, encoded again, decodes to the same frame: as a server
/// frame (parley's encoder, read by the reference) and as a client frame
/// (the reference's masked encoder, read by parley).
fn check_round_trip(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) {
    let op = self::opcode(opcode);
    if fin {
        let mut out = BytesMut::new();
        wire::put_frame(&mut out, op, payload);
        assert_eq!(
            reference::decode(&out, usize::MAX, false),
            Decoded::Frame {
                fin: true,
                opcode,
                payload: payload.to_vec(),
                len: out.len()
            },
            "put_frame's output, read back"
        );
    }
    let mut masked = reference::encode_masked(fin, opcode, payload, key);
    let len = masked.len();
    assert_eq!(
        parley_decode(&mut masked, MAX_FRAME_BYTES),
        Decoded::Frame {
            fin,
            opcode,
            payload: payload.to_vec(),
            len
        },
        "a masked re-encoding, decoded"
    );
}

/// A text message as a chat command: parley's parser against serde_json,
/// and what it accepts through the event encoder and back.
pub fn check_command(payload: &[u8]) {
    let mut copy = payload.to_vec();
    let Ok(cmd) = protocol::parse_command(&mut copy, MAX_CHARS) else {
        return;
    };
    let value: serde_json::Value = serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("parley accepted what serde_json refuses ({e}): {payload:?}"));
    // With a key given twice, which one counts is up to each parser.
    let twice = |key: &str| {
        let needle = format!("\"{key}\"");
        payload
            .windows(needle.len())
            .filter(|w| *w == needle.as_bytes())
            .count()
            > 1
    };
    let (ty, text) = match &cmd {
        Command::Send { text } => ("chat_message", Some(("message", text.as_ref()))),
        Command::Edit { content, .. } => ("edit_message", Some(("content", content.as_ref()))),
        Command::Delete { .. } => ("delete_message", None),
    };
    if !twice("type") {
        assert_eq!(value["type"], ty, "the command's type: {payload:?}");
    }
    if let Some((key, text)) = text {
        assert!(
            text.chars().count() <= MAX_CHARS,
            "a text over the limit was accepted"
        );
        if !twice(key) && !payload.contains(&b'\\') {
            assert_eq!(value[key], text, "the command's {key}: {payload:?}");
        } else if !twice(key) {
            // Escapes: compare decoded values.
            assert_eq!(
                value[key].as_str(),
                Some(text),
                "the command's {key}: {payload:?}"
            );
        }
        // Whatever text is accepted goes out in an event unchanged.
        let mut out = Vec::new();
        protocol::encode_chat_event(
            &mut out,
            &ChatEvent::Created(MessageView {
                id: 1,
                sender: "alice",
                content: text,
                timestamp: Micros(0),
                edited: None,
            }),
        );
        let event: serde_json::Value = serde_json::from_slice(&out).expect("the encoder writes JSON");
        assert_eq!(
            event["content"].as_str(),
            Some(text),
            "the text through the event encoder"
        );
    }
}

const SECRET: &str = "fuzz-secret-0123456789abcdef";

struct Verifiers {
    /// The test configuration: HS256, `exp` required, no audience or issuer.
    plain: Verifier,
    /// With an audience and an issuer required as well.
    strict: Verifier,
}

static VERIFIERS: LazyLock<Verifiers> = LazyLock::new(|| {
    let jwt = Config::for_tests(Path::new("/nonexistent/parley-fuzz"), SECRET).jwt;
    assert_eq!(jwt.algorithm, parley::auth::JwtAlgorithm::Hs256);
    let mut strict = jwt.clone();
    strict.audience = Some("parley".into());
    strict.issuer = Some("https://issuer.example".into());
    Verifiers {
        plain: Verifier::new(&jwt),
        strict: Verifier::new(&strict),
    }
});

static KEY: LazyLock<EncodingKey> = LazyLock::new(|| EncodingKey::from_secret(SECRET.as_bytes()));

/// What `token_extraction` is fed.
#[derive(Arbitrary, Debug)]
pub struct TokenInput<'a> {
    pub socket: bool,
    pub strict: bool,
    /// `Authorization` values, raw bytes (invalid ones are not headers).
    pub authorization: Vec<&'a [u8]>,
    /// `Sec-WebSocket-Protocol` values, raw bytes.
    pub protocol: Vec<&'a [u8]>,
    pub query: Option<&'a str>,
    pub param: &'a str,
    /// Verified as is.
    pub token: &'a str,
    /// Base64url-encoded and signed into a token; `None`: a valid HS256 header.
    pub jwt_header: Option<&'a [u8]>,
    pub jwt_claims: &'a [u8],
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Headers and query strings into `auth::presented` / `query_param`, raw
/// strings and correctly signed HS256 tokens around arbitrary header and
/// claims bytes into `Verifier::verify`: no panic, no bad subject accepted,
/// and a token presented in a header is the header's exact text.
pub fn check_token(input: &TokenInput<'_>) {
    let mut headers = HeaderMap::new();
    for v in &input.authorization {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(AUTHORIZATION, v);
        }
    }
    for v in &input.protocol {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    let verifier = if input.strict {
        &VERIFIERS.strict
    } else {
        &VERIFIERS.plain
    };
    let p = auth::presented(&headers, input.query, input.socket);
    if let Some(t) = p.token {
        let _ = verifier.verify(t);
    }
    let _ = auth::query_param(input.query, input.param);
    let _ = auth::query_param(input.query, "token");
    let _ = verifier.verify(input.token);

    let header = input.jwt_header.unwrap_or(br#"{"alg":"HS256","typ":"JWT"}"#);
    let message = format!("{}.{}", b64(header), b64(input.jwt_claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &KEY, Algorithm::HS256)
        .expect("HS256 signing cannot fail");
    let token = format!("{message}.{signature}");
    if let Ok(id) = verifier.verify(&token) {
        assert!(auth::valid_username(&id.user), "accepted a bad subject");
    }
}
