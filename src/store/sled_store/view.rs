//! Every read of the sled schema, over the tree merged with layers of keys
//! not yet in it.
//!
//! The log + sled backend ([`crate::store::WalStore`]) applies durable
//! groups to sled in the background; until a group is in the tree, its keys
//! are in an overlay layer, and a reader must see them, or it would see
//! less than what was acknowledged. So reads are written once, against a
//! [`View`]: the tree plus zero or more layers, newest first, whose entries
//! win over the tree's (a `None` value is a removed key). The plain
//! [`super::SledStore`] reads through a view with no layers.
//!
//! A reader takes its layers before it reads the tree: a layer is dropped
//! from the overlay only after the tree holds it, so whichever moment the
//! reader looks, each key is found in one or the other.

use std::collections::BTreeMap;
use std::ops::Bound;

use sled::IVec;

use super::keys::*;
use crate::ids::{ConversationId, MessageId, NotificationId, Seq};
use crate::store::{
    Conversation, EventKind, LoggedEvent, Message, Notification, Page, Replay, Result, StoreError,
};

/// Keys not yet in the tree: `None` removes one.
pub(crate) type Layer = BTreeMap<IVec, Option<IVec>>;

pub(crate) fn io(e: sled::Error) -> StoreError {
    StoreError::io(e)
}

/// The tree as the layers above it change it.
pub(crate) struct View<'a> {
    pub tree: &'a sled::Tree,
    /// Newest first.
    pub layers: &'a [&'a Layer],
}

type Entry = (IVec, IVec);

/// A range of the tree merged with the layers' entries in it, in key order
/// (or reverse).
struct Merged {
    over: std::iter::Peekable<std::vec::IntoIter<(IVec, Option<IVec>)>>,
    tree: std::iter::Peekable<Box<dyn Iterator<Item = sled::Result<Entry>> + Send>>,
    rev: bool,
}

impl Iterator for Merged {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            let from_layer = match (self.over.peek(), self.tree.peek()) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) | (Some(_), Some(Err(_))) => false,
                (Some((lk, _)), Some(Ok((tk, _)))) => {
                    let order = lk.as_ref().cmp(tk.as_ref());
                    let order = if self.rev { order.reverse() } else { order };
                    match order {
                        std::cmp::Ordering::Less => true,
                        std::cmp::Ordering::Greater => false,
                        std::cmp::Ordering::Equal => {
                            // The layer's entry replaces the tree's.
                            self.tree.next();
                            true
                        }
                    }
                }
            };
            if !from_layer {
                return self.tree.next().map(|r| r.map_err(io));
            }
            match self.over.next() {
                Some((k, Some(v))) => return Some(Ok((k, v))),
                Some((_, None)) => continue,
                None => return None,
            }
        }
    }
}

/// The first key after every key starting with `prefix` (`None`: no end).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl<'a> View<'a> {
    pub fn new(tree: &'a sled::Tree, layers: &'a [&'a Layer]) -> View<'a> {
        View { tree, layers }
    }

    fn raw(&self, k: &[u8]) -> Result<Option<IVec>> {
        for layer in self.layers {
            if let Some(v) = layer.get(k) {
                return Ok(v.clone());
            }
        }
        self.tree.get(k).map_err(io)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>> {
        match self.raw(k)? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    fn contains(&self, k: &[u8]) -> Result<bool> {
        Ok(self.raw(k)?.is_some())
    }

    /// Keys in `start..end` (`end` `None`: to the last key).
    fn range(&self, start: &[u8], end: Option<&[u8]>, rev: bool) -> Merged {
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let empty = end.is_some_and(|e| e <= start);
        let mut over = Layer::new();
        if !empty {
            // Oldest layer first, so that newer entries overwrite.
            for layer in self.layers.iter().rev() {
                for (k, v) in layer.range::<[u8], _>((Bound::Included(start), upper)) {
                    over.insert(k.clone(), v.clone());
                }
            }
        }
        let mut over: Vec<_> = over.into_iter().collect();
        let tree: Box<dyn Iterator<Item = sled::Result<Entry>> + Send> = if empty {
            Box::new(std::iter::empty())
        } else {
            let r = self.tree.range::<&[u8], _>((Bound::Included(start), upper));
            if rev {
                over.reverse();
                Box::new(r.rev())
            } else {
                Box::new(r)
            }
        };
        Merged {
            over: over.into_iter().peekable(),
            tree: tree.peekable(),
            rev,
        }
    }

    fn prefix(&self, prefix: &[u8]) -> Merged {
        let end = prefix_end(prefix);
        self.range(prefix, end.as_deref(), false)
    }

    pub fn counters(&self, key: &[u8]) -> Result<Counters> {
        Counters::from_bytes(self.raw(key)?.as_deref())
    }

    pub fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        self.get(&id_key(CONVERSATION, id.0, 0)[..9])
    }

    pub fn conversation_exists(&self, id: ConversationId) -> Result<bool> {
        self.contains(&id_key(CONVERSATION, id.0, 0)[..9])
    }

    pub fn is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool> {
        self.contains(&key(
            PARTICIPANT,
            &[&conversation.0.to_be_bytes(), user.as_bytes()],
        ))
    }

    pub fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>> {
        let prefix = key(USER_CONVERSATION, &[user.as_bytes(), &[0]]);
        let mut out = Vec::new();
        for kv in self.prefix(&prefix) {
            let (k, _) = kv?;
            if let Some(c) = self.conversation(ConversationId(tail_id(&k)))? {
                out.push(c);
            }
        }
        Ok(out)
    }

    pub fn message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        self.get(&id_key(MESSAGE, conversation.0, id.0))
    }

    pub fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>> {
        let start = id_key(MESSAGE, conversation.0, 0);
        let end = id_key(MESSAGE, conversation.0, before.map_or(u64::MAX, |b| b.0));
        let mut items = Vec::with_capacity(limit + 1);
        for kv in self.range(&start, Some(&end), true) {
            let (_, v) = kv?;
            let m: Message = decode(&v)?;
            if m.deleted {
                continue;
            }
            items.push(m);
            if items.len() > limit {
                break;
            }
        }
        Ok(Page::cut(items, limit, |m| m.id.0))
    }

    pub fn events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>> {
        let (conversation, after_seq) = (conversation.0, after.0);
        let start = id_key(EVENT, conversation, after_seq.saturating_add(1));
        let end = id_key(EVENT, conversation, u64::MAX);
        let mut newest_first = Vec::with_capacity(max.min(1024) + 1);
        let mut truncated_after = None;
        let mut range = self.range(&start, Some(&end), true);
        while let Some(kv) = range.next() {
            let (k, v) = kv?;
            if newest_first.len() == max {
                // More were missed than the bound: name the newest message
                // created before the replay (0 when there is none).
                let mut e = event_from(&k, &v)?;
                loop {
                    if e.kind == EventKind::Created {
                        truncated_after = Some(e.message.0);
                        break;
                    }
                    match range.next() {
                        Some(kv) => {
                            let (k, v) = kv?;
                            e = event_from(&k, &v)?;
                        }
                        None => {
                            truncated_after =
                                Some(self.message_created_at_or_before(conversation, after_seq)?);
                            break;
                        }
                    }
                }
                break;
            }
            newest_first.push(event_from(&k, &v)?);
        }
        newest_first.reverse();
        Ok(Replay {
            truncated_after,
            items: newest_first,
        })
    }

    /// The newest message created at or before `seq` (0: none), for a
    /// truncated replay whose window starts right after the resume point.
    fn message_created_at_or_before(&self, conversation: u64, seq: u64) -> Result<u64> {
        let start = id_key(EVENT, conversation, 0);
        let end = id_key(EVENT, conversation, seq.saturating_add(1));
        for kv in self.range(&start, Some(&end), true) {
            let (k, v) = kv?;
            let e = event_from(&k, &v)?;
            if e.kind == EventKind::Created {
                return Ok(e.message.0);
            }
        }
        Ok(0)
    }

    pub fn notification(&self, id: NotificationId) -> Result<Option<Notification>> {
        let id = id.0;
        let Some(owner) = self.raw(&id_key(OWNER, id, 0)[..9])? else {
            return Ok(None);
        };
        let owner = std::str::from_utf8(&owner).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.get(&user_key(NOTIFICATION, owner, id))
    }

    pub fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        let prefix = if unread_only { UNREAD } else { NOTIFICATION };
        let start = user_key(prefix, user, 0);
        let end = user_key(prefix, user, before.map_or(u64::MAX, |b| b.0));
        let mut items = Vec::with_capacity(limit + 1);
        for kv in self.range(&start, Some(&end), true).take(limit + 1) {
            let (k, v) = kv?;
            let n = if unread_only {
                self.get(&user_key(NOTIFICATION, user, tail_id(&k)))?
                    .ok_or_else(|| StoreError::Corrupt("unread marker without notification".into()))?
            } else {
                decode(&v)?
            };
            items.push(n);
        }
        Ok(Page::cut(items, limit, |n| n.id.0))
    }

    pub fn unread(&self, user: &str) -> Result<Vec<NotificationId>> {
        let prefix = key(UNREAD, &[user.as_bytes(), &[0]]);
        self.prefix(&prefix)
            .map(|kv| kv.map(|(k, _)| NotificationId(tail_id(&k))))
            .collect()
    }

    pub fn unread_count(&self, user: &str) -> Result<u64> {
        let prefix = key(UNREAD, &[user.as_bytes(), &[0]]);
        let mut n = 0;
        for kv in self.prefix(&prefix) {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    pub fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>> {
        let start = user_key(NOTIFICATION, user, after.0.saturating_add(1));
        let end = user_key(NOTIFICATION, user, u64::MAX);
        let mut newest_first: Vec<Notification> = Vec::new();
        let mut truncated_after = None;
        for kv in self.range(&start, Some(&end), true) {
            let (k, v) = kv?;
            if newest_first.len() == max {
                truncated_after = Some(tail_id(&k));
                break;
            }
            newest_first.push(decode(&v)?);
        }
        newest_first.reverse();
        Ok(Replay {
            truncated_after,
            items: newest_first,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&[u8], Option<&[u8]>)]) -> Layer {
        entries
            .iter()
            .map(|(k, v)| (IVec::from(*k), v.map(IVec::from)))
            .collect()
    }

    fn keys(m: Merged) -> Vec<(Vec<u8>, Vec<u8>)> {
        m.map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_>>()
            .unwrap()
    }

    #[test]
    fn layers_win_over_the_tree_newest_first_and_none_removes() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        for k in [b"a1", b"a2", b"a3", b"b1"] {
            tree.insert(k, &b"tree"[..]).unwrap();
        }
        let old = layer(&[
            (b"a2", Some(b"old")),
            (b"a4", Some(b"old")),
            (b"a5", Some(b"old")),
        ]);
        let new = layer(&[(b"a2", Some(b"new")), (b"a3", None), (b"a5", None)]);
        let layers = [&new, &old];
        let v = View::new(&tree, &layers);
        let s = |x: &[u8]| x.to_vec();
        assert_eq!(
            keys(v.prefix(b"a")),
            vec![
                (s(b"a1"), s(b"tree")),
                (s(b"a2"), s(b"new")),
                (s(b"a4"), s(b"old"))
            ]
        );
        assert_eq!(
            keys(v.range(b"a2", Some(b"b"), true)),
            vec![(s(b"a4"), s(b"old")), (s(b"a2"), s(b"new"))]
        );
        assert_eq!(v.raw(b"a3").unwrap(), None);
        assert_eq!(v.raw(b"a1").unwrap().as_deref(), Some(&b"tree"[..]));
        assert!(keys(v.range(b"b", Some(b"a"), false)).is_empty());
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
    }
}
