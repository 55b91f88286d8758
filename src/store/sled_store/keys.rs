//! The key schema of the sled tree, and the one place a [`Change`] becomes
//! keys and values. Ids are big-endian, so key order is id order and every
//! page is a range scan.
//!
//! | key | value |
//! | --- | --- |
//! | `k` | [`Counters`], 4 × u64: ids issued |
//! | `K` | ids reserved (`interval` mode), 4 × u64 |
//! | `c` conv | [`Conversation`] |
//! | `p` conv user | participant marker |
//! | `u` user 0 conv | the user's conversations |
//! | `m` conv msg | [`Message`] (current state) |
//! | `e` conv seq | event log entry: kind, message id, frame payload |
//! | `n` user 0 id | [`Notification`] |
//! | `r` user 0 id | unread marker |
//! | `o` id | the notification's owner |
//!
//! Usernames never contain a 0 byte (see `auth::valid_username`).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use sled::IVec;

use crate::ids::{MessageId, Seq};
use crate::store::{Change, EventKind, LoggedEvent, Notification, Result, StoreError};

pub(crate) const COUNTERS: &[u8] = b"k";
pub(crate) const RESERVED: &[u8] = b"K";
pub(super) const CONVERSATION: u8 = b'c';
pub(super) const PARTICIPANT: u8 = b'p';
pub(super) const USER_CONVERSATION: u8 = b'u';
pub(super) const MESSAGE: u8 = b'm';
pub(super) const EVENT: u8 = b'e';
pub(super) const NOTIFICATION: u8 = b'n';
pub(super) const UNREAD: u8 = b'r';
pub(super) const OWNER: u8 = b'o';

/// The last id issued of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub conversation: u64,
    pub message: u64,
    pub notification: u64,
    pub event: u64,
}

/// After a replay, counting resumes above every id the log held.
impl From<crate::store::log::IdHighWater> for Counters {
    fn from(h: crate::store::log::IdHighWater) -> Counters {
        Counters {
            conversation: h.conversation,
            message: h.message,
            notification: h.notification,
            event: h.seq,
        }
    }
}

impl Counters {
    pub fn covers(&self, other: &Counters) -> bool {
        other.conversation <= self.conversation
            && other.message <= self.message
            && other.notification <= self.notification
            && other.event <= self.event
    }

    /// Each counter the larger of the two.
    pub fn max(&self, o: &Counters) -> Counters {
        Counters {
            conversation: self.conversation.max(o.conversation),
            message: self.message.max(o.message),
            notification: self.notification.max(o.notification),
            event: self.event.max(o.event),
        }
    }

    pub fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&self.conversation.to_be_bytes());
        b[8..16].copy_from_slice(&self.message.to_be_bytes());
        b[16..24].copy_from_slice(&self.notification.to_be_bytes());
        b[24..].copy_from_slice(&self.event.to_be_bytes());
        b
    }

    pub fn from_bytes(v: Option<&[u8]>) -> Result<Counters> {
        Ok(match v {
            Some(v) if v.len() == 32 => Counters {
                conversation: tail_id(&v[..8]),
                message: tail_id(&v[..16]),
                notification: tail_id(&v[..24]),
                event: tail_id(&v[..32]),
            },
            Some(_) => return Err(StoreError::Corrupt("counters".into())),
            None => Counters::default(),
        })
    }
}

/// Where the keys and values of a change go: a sled batch, or an overlay
/// of keys not yet in sled. `None` removes the key.
pub(crate) trait Sink {
    fn put(&mut self, key: IVec, value: Option<IVec>);
}

impl Sink for sled::Batch {
    fn put(&mut self, key: IVec, value: Option<IVec>) {
        match value {
            Some(v) => self.insert(key, v),
            None => self.remove(key),
        }
    }
}

impl Sink for std::collections::BTreeMap<IVec, Option<IVec>> {
    fn put(&mut self, key: IVec, value: Option<IVec>) {
        self.insert(key, value);
    }
}

/// Writes one change's keys: the whole new state of everything it touches,
/// so that writing it twice (a replay over a state that already has it) is
/// the same as writing it once.
pub(crate) fn write_change(change: &Change<'_>, out: &mut dyn Sink) {
    let empty = || Some(IVec::default());
    match *change {
        Change::Conversation(conv) => {
            let id = conv.id.0;
            out.put(id_key(CONVERSATION, id, 0)[..9].into(), Some(encode(conv).into()));
            for user in &conv.participants {
                out.put(
                    key(PARTICIPANT, &[&id.to_be_bytes(), user.as_bytes()]).into(),
                    empty(),
                );
                out.put(user_key(USER_CONVERSATION, user, id).into(), empty());
            }
        }
        Change::Chat {
            message,
            kind,
            seq,
            payload,
            notifications,
        } => {
            let conversation = message.conversation.0;
            out.put(
                id_key(MESSAGE, conversation, message.id.0)[..].into(),
                Some(encode(message).into()),
            );
            out.put(
                id_key(EVENT, conversation, seq.0)[..].into(),
                Some(event_value(kind, message.id.0, payload).into()),
            );
            write_notifications(out, notifications);
        }
        Change::Notifications(ns) => write_notifications(out, ns),
    }
}

fn write_notifications(out: &mut dyn Sink, ns: &[Notification]) {
    for n in ns {
        out.put(
            user_key(NOTIFICATION, &n.user, n.id.0).into(),
            Some(encode(n).into()),
        );
        out.put(
            id_key(OWNER, n.id.0, 0)[..9].into(),
            Some(n.user.as_bytes().into()),
        );
        let unread = user_key(UNREAD, &n.user, n.id.0).into();
        out.put(unread, (!n.is_read).then(IVec::default));
    }
}

pub(super) fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub(super) fn id_key(prefix: u8, a: u64, b: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..9].copy_from_slice(&a.to_be_bytes());
    k[9..].copy_from_slice(&b.to_be_bytes());
    k
}

pub(super) fn user_key(prefix: u8, user: &str, id: u64) -> Vec<u8> {
    key(prefix, &[user.as_bytes(), &[0], &id.to_be_bytes()])
}

pub(super) fn tail_id(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[k.len() - 8..]);
    u64::from_be_bytes(b)
}

pub(super) fn decode<T: DeserializeOwned>(v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn event_value(kind: EventKind, message: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    v.push(match kind {
        EventKind::Created => b'c',
        EventKind::Edited => b'e',
        EventKind::Deleted => b'd',
    });
    v.extend_from_slice(&message.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub(super) fn event_from(k: &[u8], v: &[u8]) -> Result<LoggedEvent> {
    if v.len() < 9 {
        return Err(StoreError::Corrupt("short event".into()));
    }
    let kind = match v[0] {
        b'c' => EventKind::Created,
        b'e' => EventKind::Edited,
        b'd' => EventKind::Deleted,
        _ => return Err(StoreError::Corrupt("unknown event kind".into())),
    };
    let message = MessageId(tail_id(&v[..9]));
    Ok(LoggedEvent {
        seq: Seq(tail_id(k)),
        kind,
        message,
        payload: Bytes::copy_from_slice(&v[9..]),
    })
}
