//! The per-frame CPU cost of the wire contract.
//!
//! Inbound: `wire::decode` of a masked client frame (header checks plus
//! unmasking in place), `protocol::parse_command` of its payload (simd-json,
//! in place), and both together, as a chat socket does for every frame.
//! Outbound: `protocol::encode_chat_event` into a reused `Vec` plus
//! `wire::put_frame`, as the sequencer does once per event (not once
//! per receiver).
//!
//! `cargo bench --bench protocol`

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use parley::protocol::{self, ChatEvent, Command, MessageView, Micros};
use parley::wire::{self as frame, OpCode};

/// The server's default `--max-message-chars` and `--max-frame-bytes`.
const MAX_CHARS: usize = 4000;
const MAX_FRAME: usize = 65536;

/// About 1 KiB of chat text that exercises the slow paths: JSON escapes
/// (quotes, backslashes, newlines, tabs, `\u` escapes) and 4-byte emoji.
fn long_text() -> String {
    let chunk = "Line with \"quotes\", a back\\slash,\ttabs and\nnewlines; caf\u{e9} \u{1F600}\u{1F389} ";
    let mut s = String::new();
    while s.len() < 1024 {
        s.push_str(chunk);
    }
    s
}

/// The JSON text of a client frame, as a browser would send it.
fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    let long = long_text();
    let long_json = serde_json::to_string(&long).unwrap();
    let v = vec![
        (
            "chat_message/short",
            br#"{"type": "chat_message", "message": "hi bob, see you at 5?"}"#.to_vec(),
        ),
        (
            "chat_message/1KiB",
            format!(r#"{{"type": "chat_message", "message": {long_json}}}"#).into_bytes(),
        ),
        (
            "edit_message/short",
            br#"{"type": "edit_message", "message_id": 123456, "content": "hi bob, see you at 6?"}"#.to_vec(),
        ),
        (
            "edit_message/1KiB",
            format!(r#"{{"type": "edit_message", "message_id": 123456, "content": {long_json}}}"#)
                .into_bytes(),
        ),
        (
            "delete_message",
            br#"{"type": "delete_message", "message_id": 123456}"#.to_vec(),
        ),
    ];
    // Every payload must be accepted, or the bench measures the error path.
    for (name, p) in &v {
        let mut b = p.clone();
        assert!(
            protocol::parse_command(&mut b, MAX_CHARS).is_ok(),
            "{name} must parse"
        );
    }
    v
}

/// A final, masked text frame carrying `payload`, as a client sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut v = vec![0x81];
    match payload.len() {
        n @ 0..=125 => v.push(0x80 | n as u8),
        n @ 126..=65535 => {
            v.push(0x80 | 126);
            v.extend((n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend((n as u64).to_be_bytes());
        }
    }
    v.extend(mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

fn inbound(c: &mut Criterion) {
    let mut g = c.benchmark_group("inbound");
    g.throughput(Throughput::Elements(1));
    for (name, payload) in payloads() {
        let wire = client_frame(&payload);

        // `decode` unmasks in place, and unmasking is an XOR with the same
        // key: decoding the same buffer again re-masks it. So every call
        // does the full work on the same bytes, with no copy in the loop.
        g.bench_with_input(BenchmarkId::new("decode", name), &wire, |b, wire| {
            let mut buf = wire.clone();
            let mut needed = 0;
            b.iter(|| {
                let f = frame::decode(black_box(&mut buf), MAX_FRAME, &mut needed);
                black_box(f.unwrap().unwrap().len)
            })
        });

        // `parse_command` clobbers its input: each call gets a fresh copy,
        // made outside the timed region.
        g.bench_with_input(BenchmarkId::new("parse_command", name), &payload, |b, payload| {
            b.iter_batched_ref(
                || payload.clone(),
                |buf| match protocol::parse_command(buf, MAX_CHARS) {
                    Ok(Command::Send { text }) => black_box(text.len()),
                    Ok(Command::Edit { id, content }) => black_box(id.unwrap_or(0) as usize + content.len()),
                    Ok(Command::Delete { id }) => black_box(id.unwrap_or(0) as usize),
                    Err(_) => unreachable!(),
                },
                BatchSize::SmallInput,
            )
        });

        // What a chat socket does per inbound frame.
        g.bench_with_input(BenchmarkId::new("decode+parse", name), &wire, |b, wire| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let mut needed = 0;
                    let f = frame::decode(buf, MAX_FRAME, &mut needed).unwrap().unwrap();
                    let cmd = protocol::parse_command(&mut buf[f.payload], MAX_CHARS);
                    black_box(cmd.is_ok())
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn outbound(c: &mut Criterion) {
    let long = long_text();
    let short = "hi bob, see you at 5?";
    let mut g = c.benchmark_group("outbound");
    g.throughput(Throughput::Elements(1));
    let cases: [(&str, ChatEvent<'_>); 4] = [
        (
            "message.created/short",
            ChatEvent::Created(MessageView {
                id: 123_456,
                sender: "alice",
                content: short,
                timestamp: Micros(1_767_225_600_123_456),
                edited: None,
            }),
        ),
        (
            "message.created/1KiB",
            ChatEvent::Created(MessageView {
                id: 123_456,
                sender: "alice",
                content: &long,
                timestamp: Micros(1_767_225_600_123_456),
                edited: None,
            }),
        ),
        (
            "message.edited/short",
            ChatEvent::Edited {
                id: 123_456,
                content: short,
            },
        ),
        ("message.deleted", ChatEvent::Deleted { id: 123_456 }),
    ];
    for (name, event) in &cases {
        // As the sequencer: the JSON into a reused scratch `Vec`, then framed
        // into the group's `BytesMut`, which is frozen and published.
        g.bench_function(BenchmarkId::new("encode_chat_event+put_frame", name), |b| {
            let mut scratch = Vec::with_capacity(4096);
            let mut out = BytesMut::with_capacity(4096);
            b.iter(|| {
                scratch.clear();
                out.clear();
                protocol::encode_chat_event(&mut scratch, black_box(event));
                frame::put_frame(&mut out, OpCode::Text, &scratch);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(800))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = inbound, outbound
}
criterion_main!(benches);
