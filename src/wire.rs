//! RFC 6455 on the wire: decoding client frames from a socket's read
//! buffer, encoding server frames, and the close codes parley sends.
//!
//! A leaf: it knows bytes and nothing of chat, sockets or the store, so
//! every layer (the socket engine, the hub, the sequencer) may use it.
//!
//! parley decodes frames itself rather than holding a fastwebsockets
//! `WebSocket` per socket: that type keeps an 8 KiB read buffer for the
//! socket's whole life, and parley's density target leaves about 1 KiB per
//! idle socket. Here the read buffer exists only while bytes are in flight.
//! Unmasking uses fastwebsockets' SIMD `unmask`.

use bytes::{BufMut, BytesMut};

/// Opcodes a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(b: u8) -> Option<OpCode> {
        Some(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }
}

/// Close codes parley sends (RFC 6455 §7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// A close frame to send: why an outbox stopped accepting frames. The
/// socket task sends it and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    pub code: u16,
    pub reason: &'static str,
}

/// The close every socket gets when the server shuts down.
pub const GOING_AWAY: Closing = Closing {
    code: close::GOING_AWAY,
    reason: "server shutting down",
};

/// The close a cluster node's sockets get when it drains for a deploy:
/// clients resume on another node.
pub const SERVICE_RESTART: Closing = Closing {
    code: close::SERVICE_RESTART,
    reason: "node restarting, resume elsewhere",
};

/// The close a cluster node's sockets of a stream get when the node fell
/// too far behind it to catch up: clients resume.
pub const FELL_BEHIND: Closing = Closing {
    code: close::TRY_AGAIN_LATER,
    reason: "fell behind, resume",
};

/// Why the connection must be closed, with the close code to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// One decoded frame: its header, and where its (unmasked) payload sits in
/// the buffer that was decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: std::ops::Range<usize>,
    /// Bytes of the buffer this frame used, header included.
    pub len: usize,
}

/// Decodes the first frame in `buf`, unmasking its payload in place.
///
/// `Ok(None)` means more bytes are needed; `needed` then says how many the
/// whole frame takes, so the caller can size its buffer once. A header that
/// announces a payload over `max_payload` is refused before any of it is
/// read (close 1009), however large it claims to be.
pub fn decode(buf: &mut [u8], max_payload: usize, needed: &mut usize) -> Result<Option<Frame>, Violation> {
    if buf.len() < 2 {
        *needed = 2;
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(violation(close::PROTOCOL_ERROR, "reserved bits set"));
    }
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(violation(close::PROTOCOL_ERROR, "unknown opcode"))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(violation(close::PROTOCOL_ERROR, "client frames must be masked"));
    }
    let (len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                *needed = 4;
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                *needed = 10;
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if opcode.is_control() && (len > 125 || !fin) {
        return Err(violation(close::PROTOCOL_ERROR, "invalid control frame"));
    }
    if len > max_payload as u64 {
        return Err(violation(close::TOO_BIG, "frame larger than the limit"));
    }
    let len = len as usize;
    let total = pos + 4 + len;
    if buf.len() < total {
        *needed = total;
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[pos..pos + 4]);
    pos += 4;
    fastwebsockets::unmask(&mut buf[pos..total], mask);
    Ok(Some(Frame {
        fin,
        opcode,
        payload: pos..total,
        len: total,
    }))
}

/// The header of a client frame whose payload has not fully arrived: what
/// the engine needs to check a text payload as it trickles in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialHeader {
    pub opcode: OpCode,
    /// Where the payload starts in the buffer.
    pub payload_start: usize,
    pub mask: [u8; 4],
}

/// The header of the frame at the start of `buf`, once all of it (mask
/// included) is there; `None` before, or when the header is invalid
/// (`decode` reports that).
pub fn peek_header(buf: &[u8]) -> Option<PartialHeader> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let opcode = OpCode::from_bits(b0 & 0x0F)?;
    let start = match b1 & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let mask = buf.get(start..start + 4)?;
    Some(PartialHeader {
        opcode,
        payload_start: start + 4,
        mask: [mask[0], mask[1], mask[2], mask[3]],
    })
}

/// Length of a server frame header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Appends one unmasked, final server frame.
pub fn put_frame(dst: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    dst.reserve(header_len(payload.len()) + payload.len());
    dst.put_u8(0x80 | opcode.bits());
    match payload.len() {
        n @ 0..=125 => dst.put_u8(n as u8),
        n @ 126..=65535 => {
            dst.put_u8(126);
            dst.put_u16(n as u16);
        }
        n => {
            dst.put_u8(127);
            dst.put_u64(n as u64);
        }
    }
    dst.put_slice(payload);
}

/// A close frame's payload: the code, then a short reason.
pub fn put_close(dst: &mut BytesMut, code: u16, reason: &str) {
    let mut payload = [0u8; 125];
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    put_frame(dst, OpCode::Close, &payload[..2 + reason.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut v = vec![b0];
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

    #[test]
    fn decodes_and_unmasks() {
        for size in [0, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let mut buf = client_frame(0x81, &payload);
            let mut needed = 0;
            let f = decode(&mut buf, 1 << 20, &mut needed).unwrap().unwrap();
            assert_eq!((f.fin, f.opcode, f.len), (true, OpCode::Text, buf.len()));
            assert_eq!(&buf[f.payload], &payload[..]);
            // Every strict prefix asks for more.
            let mut short = client_frame(0x81, &payload);
            short.pop();
            assert_eq!(decode(&mut short, 1 << 20, &mut needed), Ok(None));
            assert_eq!(needed, buf.len());
        }
    }

    #[test]
    fn refuses_before_reading_payload() {
        let mut huge = vec![0x81, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        let mut needed = 0;
        assert_eq!(
            decode(&mut huge, 65536, &mut needed).unwrap_err().code,
            close::TOO_BIG
        );
        let mut at_limit = client_frame(0x81, &[b'x'; 16]);
        assert!(decode(&mut at_limit, 16, &mut needed).unwrap().is_some());
        let mut over = client_frame(0x81, &[b'x'; 17]);
        assert_eq!(
            decode(&mut over, 16, &mut needed).unwrap_err().code,
            close::TOO_BIG
        );
        let mut unmasked = vec![0x81, 0x00];
        assert_eq!(
            decode(&mut unmasked, 16, &mut needed).unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        let mut rsv = client_frame(0xC1, b"x");
        assert_eq!(
            decode(&mut rsv, 16, &mut needed).unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        let mut long_ping = client_frame(0x89, &[0; 126]);
        assert_eq!(
            decode(&mut long_ping, 1000, &mut needed).unwrap_err().code,
            close::PROTOCOL_ERROR
        );
    }

    #[test]
    fn encodes_server_frames() {
        for size in [0usize, 125, 126, 65535, 65536] {
            let mut dst = BytesMut::new();
            put_frame(&mut dst, OpCode::Text, &vec![7; size]);
            assert_eq!(dst.len(), header_len(size) + size);
            assert_eq!(dst[0], 0x81);
        }
        let mut dst = BytesMut::new();
        put_close(&mut dst, 1009, "too big");
        assert_eq!(&dst[..], b"\x88\x09\x03\xf1too big");
    }
}
