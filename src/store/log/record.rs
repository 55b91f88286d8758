//! The record framing and the change codec: pure code on byte buffers (no
//! I/O), so that the sequencer can encode a group while the log thread
//! writes the previous one.
//!
//! # Record (all integers little-endian; every record starts 8-aligned)
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | `hcrc`: CRC-32 of the record's LSN (8 bytes) then bytes 4..16 |
//! | 4..8 | `len`: payload bytes, padding excluded |
//! | 8 | `kind`: 1 change, 2 commit (0 is never valid: zeroed space) |
//! | 9 | format version (1) |
//! | 10..12 | zero |
//! | 12..16 | `pcrc`: CRC-32 of the payload |
//! | 16.. | payload, then zeros up to the next multiple of 8 |
//!
//! A change's payload is [`encode_change`]'s output. A commit's payload is
//! `synced_upto` (u64: the log position every earlier byte was known to be
//! `fdatasync`ed to when this group was appended), the number of change
//! records of its group (u32) and 4 zero bytes; a group is its change
//! records followed by one commit record.
//!
//! Why two CRCs: the header CRC covers the record's own log position, so a
//! stale record left in a recycled segment, or a record at the wrong place,
//! never passes for a record here; and it is checked on 16 bytes, so that a
//! scan for valid records past a bad one (see the torn-tail rule in
//! [`super`]) costs a few nanoseconds per offset, not a payload's length.
//! The payload CRC is computed when the change is encoded (it does not
//! depend on the position), so the log thread only stamps 12-byte headers.

use crate::ids::{ConversationId, MessageId, NotificationId, Seq};
use crate::protocol::Micros;
use crate::store::{Change, Conversation, EventKind, Message, Notification};

pub(super) const HEADER: usize = 16;
pub(super) const ALIGN: usize = 8;
pub(super) const KIND_CHANGE: u8 = 1;
pub(super) const KIND_COMMIT: u8 = 2;
const VERSION: u8 = 1;
const COMMIT_PAYLOAD: usize = 16;
/// A commit record's whole size: header and payload (already 8-aligned).
pub(super) const COMMIT_RECORD: usize = HEADER + COMMIT_PAYLOAD;

pub(super) fn padded(len: usize) -> usize {
    (len + ALIGN - 1) & !(ALIGN - 1)
}

fn header_crc(lsn: u64, rest: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(rest);
    h.finalize()
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// One group of changes, encoded as records, ready for one append.
///
/// Owned by the caller and reused (`clear`), so that encoding allocates
/// nothing once the buffer has grown to the usual group size. The record
/// headers are stamped with their log positions by [`super::Log::append`],
/// which is the first moment the position is known.
#[derive(Debug, Default)]
pub struct GroupBuf {
    buf: Vec<u8>,
    /// Bytes of change records (the commit record follows, once sealed).
    body: usize,
    changes: u32,
}

impl GroupBuf {
    pub fn new() -> GroupBuf {
        GroupBuf::default()
    }

    pub fn with_capacity(bytes: usize) -> GroupBuf {
        GroupBuf {
            buf: Vec::with_capacity(bytes),
            ..GroupBuf::default()
        }
    }

    /// Adds one change as one record.
    pub fn push(&mut self, change: &Change<'_>) {
        self.buf.truncate(self.body);
        let at = self.buf.len();
        self.buf.resize(at + HEADER, 0);
        encode_change(change, &mut self.buf);
        let len = self.buf.len() - at - HEADER;
        let len32 = u32::try_from(len).expect("a change under 4 GiB");
        let pcrc = crc32fast::hash(&self.buf[at + HEADER..]);
        let h = &mut self.buf[at..at + HEADER];
        h[4..8].copy_from_slice(&len32.to_le_bytes());
        h[8] = KIND_CHANGE;
        h[9] = VERSION;
        h[12..16].copy_from_slice(&pcrc.to_le_bytes());
        self.buf.resize(at + HEADER + padded(len), 0);
        self.body = self.buf.len();
        self.changes += 1;
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.body = 0;
        self.changes = 0;
    }

    /// Number of changes pushed.
    pub fn changes(&self) -> u32 {
        self.changes
    }

    pub fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// Bytes the group takes in the log, commit record included.
    pub fn encoded_len(&self) -> usize {
        self.body + COMMIT_RECORD
    }

    /// Adds the commit record and stamps every header with its position,
    /// the group starting at `start`. Idempotent: a group refused before it
    /// was written can be sealed again at another position.
    pub(super) fn seal(&mut self, start: u64, synced_upto: u64) -> &[u8] {
        self.buf.truncate(self.body);
        let at = self.buf.len();
        self.buf.resize(at + COMMIT_RECORD, 0);
        {
            let r = &mut self.buf[at..];
            r[4..8].copy_from_slice(&(COMMIT_PAYLOAD as u32).to_le_bytes());
            r[8] = KIND_COMMIT;
            r[9] = VERSION;
            r[HEADER..HEADER + 8].copy_from_slice(&synced_upto.to_le_bytes());
            r[HEADER + 8..HEADER + 12].copy_from_slice(&self.changes.to_le_bytes());
            let pcrc = crc32fast::hash(&r[HEADER..]);
            r[12..16].copy_from_slice(&pcrc.to_le_bytes());
        }
        let mut pos = 0;
        while pos < self.buf.len() {
            let len = le32(&self.buf[pos + 4..]) as usize;
            let crc = header_crc(start + pos as u64, &self.buf[pos + 4..pos + HEADER]);
            self.buf[pos..pos + 4].copy_from_slice(&crc.to_le_bytes());
            pos += HEADER + padded(len);
        }
        &self.buf
    }
}

/// A valid record found in a segment.
pub(super) enum Record<'a> {
    Change(&'a [u8]),
    Commit { synced_upto: u64, changes: u32 },
}

/// The record at `pos` of a segment whose first byte is at log position
/// `base`, and where the next record starts; `None` unless every check
/// passes. Cheap tests (kind, version, length) come before the CRCs, so
/// that scanning zeroed or stale space costs little.
pub(super) fn record_at(seg: &[u8], pos: usize, base: u64) -> Option<(Record<'_>, usize)> {
    let h = seg.get(pos..pos.checked_add(HEADER)?)?;
    let kind = h[8];
    if (kind != KIND_CHANGE && kind != KIND_COMMIT) || h[9] != VERSION || h[10] != 0 || h[11] != 0 {
        return None;
    }
    let len = le32(&h[4..]) as usize;
    let end = pos + HEADER + padded(len);
    if end > seg.len() || (kind == KIND_COMMIT && len != COMMIT_PAYLOAD) {
        return None;
    }
    if header_crc(base + pos as u64, &h[4..]) != le32(h) {
        return None;
    }
    let payload = &seg[pos + HEADER..pos + HEADER + len];
    if crc32fast::hash(payload) != le32(&h[12..]) {
        return None;
    }
    let rec = if kind == KIND_CHANGE {
        Record::Change(payload)
    } else {
        Record::Commit {
            synced_upto: le64(payload),
            changes: le32(&payload[8..]),
        }
    };
    Some((rec, end))
}

// ---- the change codec ----

const TAG_CONVERSATION: u8 = 1;
const TAG_CHAT: u8 = 2;
const TAG_NOTIFICATIONS: u8 = 3;

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).expect("under 4 GiB").to_le_bytes());
    out.extend_from_slice(b);
}

fn put_notification(out: &mut Vec<u8>, n: &Notification) {
    put_u64(out, n.id.0);
    put_bytes(out, n.user.as_bytes());
    put_bytes(out, n.message.as_bytes());
    out.push(n.is_read as u8);
    put_u64(out, n.timestamp.0);
}

fn put_notifications(out: &mut Vec<u8>, ns: &[Notification]) {
    out.extend_from_slice(&u32::try_from(ns.len()).expect("count").to_le_bytes());
    for n in ns {
        put_notification(out, n);
    }
}

fn kind_byte(kind: EventKind) -> u8 {
    match kind {
        EventKind::Created => 1,
        EventKind::Edited => 2,
        EventKind::Deleted => 3,
    }
}

/// Appends `change` to `out` in the log's binary form: a tag byte, then
/// the fields in declaration order; integers as 8 little-endian bytes,
/// strings and byte strings as a u32 length and their bytes, booleans as a
/// byte. Hand-written rather than serde: it is a handful of fields, written
/// once per message on the hot path, and its layout is the on-disk format,
/// which a derive would let change silently.
///
/// Everything a replay needs to re-apply the change to sled idempotently is
/// here: whole records (not deltas) keyed by their ids, so applying one
/// twice leaves the same state; the ids it uses tell the replay how far
/// each id counter went ([`IdHighWater`]).
pub fn encode_change(change: &Change<'_>, out: &mut Vec<u8>) {
    match *change {
        Change::Conversation(c) => {
            out.push(TAG_CONVERSATION);
            put_u64(out, c.id.0);
            match &c.title {
                Some(t) => {
                    out.push(1);
                    put_bytes(out, t.as_bytes());
                }
                None => out.push(0),
            }
            out.extend_from_slice(&u32::try_from(c.participants.len()).expect("count").to_le_bytes());
            for p in &c.participants {
                put_bytes(out, p.as_bytes());
            }
            put_u64(out, c.created_at.0);
        }
        Change::Chat {
            message: m,
            kind,
            seq,
            payload,
            notifications,
        } => {
            out.push(TAG_CHAT);
            out.push(kind_byte(kind));
            put_u64(out, seq.0);
            put_u64(out, m.id.0);
            put_u64(out, m.conversation.0);
            put_bytes(out, m.sender.as_bytes());
            put_bytes(out, m.content.as_bytes());
            put_u64(out, m.timestamp.0);
            out.push(m.edited as u8 | (m.deleted as u8) << 1);
            put_u64(out, m.seq.0);
            put_bytes(out, payload);
            put_notifications(out, notifications);
        }
        Change::Notifications(ns) => {
            out.push(TAG_NOTIFICATIONS);
            put_notifications(out, ns);
        }
    }
}

/// A change read back from the log, owning its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedChange {
    Conversation(Conversation),
    Chat {
        message: Message,
        kind: EventKind,
        seq: Seq,
        payload: Vec<u8>,
        notifications: Vec<Notification>,
    },
    Notifications(Vec<Notification>),
}

/// A change payload that passed its CRC but does not decode: written by
/// another format version or a bug, never by a torn write.
#[derive(Debug, Clone, thiserror::Error)]
#[error("undecodable change: {0}")]
pub struct DecodeError(&'static str);

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(le32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(le64(self.take(8)?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError("a string is not UTF-8"))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError("bad boolean")),
        }
    }
    /// A count, bounded by the bytes left (each item takes at least one),
    /// so a bad count cannot make the decoder reserve gigabytes.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return Err(DecodeError("count beyond the record"));
        }
        Ok(n)
    }
    fn notification(&mut self) -> Result<Notification, DecodeError> {
        Ok(Notification {
            id: NotificationId(self.u64()?),
            user: self.string()?,
            message: self.string()?,
            is_read: self.bool()?,
            timestamp: Micros(self.u64()?),
        })
    }
    fn notifications(&mut self) -> Result<Vec<Notification>, DecodeError> {
        let n = self.count()?;
        (0..n).map(|_| self.notification()).collect()
    }
}

impl OwnedChange {
    /// Decodes one change payload (the inverse of [`encode_change`]).
    pub fn decode(bytes: &[u8]) -> Result<OwnedChange, DecodeError> {
        let mut r = Reader(bytes);
        let change = match r.u8()? {
            TAG_CONVERSATION => {
                let id = ConversationId(r.u64()?);
                let title = if r.bool()? { Some(r.string()?) } else { None };
                let n = r.count()?;
                let participants = (0..n).map(|_| r.string()).collect::<Result<_, _>>()?;
                OwnedChange::Conversation(Conversation {
                    id,
                    title,
                    participants,
                    created_at: Micros(r.u64()?),
                })
            }
            TAG_CHAT => {
                let kind = match r.u8()? {
                    1 => EventKind::Created,
                    2 => EventKind::Edited,
                    3 => EventKind::Deleted,
                    _ => return Err(DecodeError("unknown event kind")),
                };
                let seq = Seq(r.u64()?);
                let id = MessageId(r.u64()?);
                let conversation = ConversationId(r.u64()?);
                let sender = r.string()?;
                let content = r.string()?;
                let timestamp = Micros(r.u64()?);
                let flags = r.u8()?;
                if flags > 3 {
                    return Err(DecodeError("bad message flags"));
                }
                let message = Message {
                    id,
                    conversation,
                    sender,
                    content,
                    timestamp,
                    edited: flags & 1 != 0,
                    deleted: flags & 2 != 0,
                    seq: Seq(r.u64()?),
                };
                OwnedChange::Chat {
                    message,
                    kind,
                    seq,
                    payload: r.bytes()?.to_vec(),
                    notifications: r.notifications()?,
                }
            }
            TAG_NOTIFICATIONS => OwnedChange::Notifications(r.notifications()?),
            _ => return Err(DecodeError("unknown change tag")),
        };
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(change)
    }

    /// The change, borrowed, as the store's `apply` takes it.
    pub fn as_change(&self) -> Change<'_> {
        match self {
            OwnedChange::Conversation(c) => Change::Conversation(c),
            OwnedChange::Chat {
                message,
                kind,
                seq,
                payload,
                notifications,
            } => Change::Chat {
                message,
                kind: *kind,
                seq: *seq,
                payload,
                notifications,
            },
            OwnedChange::Notifications(ns) => Change::Notifications(ns),
        }
    }
}

/// The highest id of each kind seen in changes: what the id counters must
/// resume above after a replay (an id is only ever shown inside a change,
/// so ids drawn but never used in one need not survive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdHighWater {
    pub conversation: u64,
    pub message: u64,
    pub notification: u64,
    pub seq: u64,
}

impl IdHighWater {
    pub fn observe(&mut self, change: &Change<'_>) {
        let notes = |h: &mut IdHighWater, ns: &[Notification]| {
            for n in ns {
                h.notification = h.notification.max(n.id.0);
            }
        };
        match *change {
            Change::Conversation(c) => self.conversation = self.conversation.max(c.id.0),
            Change::Chat {
                message,
                seq,
                notifications,
                ..
            } => {
                self.conversation = self.conversation.max(message.conversation.0);
                self.message = self.message.max(message.id.0);
                self.seq = self.seq.max(seq.0).max(message.seq.0);
                notes(self, notifications);
            }
            Change::Notifications(ns) => notes(self, ns),
        }
    }
}
