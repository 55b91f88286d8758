//! A backend in memory only: everything is lost when the process ends.
//!
//! For unit tests of the layers above the store (the sequencer, the
//! outbox) and as the reference the conformance suite is checked against:
//! plain ordered maps under one lock, nothing clever. Never a production
//! backend.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::*;

#[derive(Default)]
struct Inner {
    conversations: BTreeMap<ConversationId, Conversation>,
    messages: BTreeMap<(ConversationId, MessageId), Message>,
    events: BTreeMap<(ConversationId, Seq), LoggedEvent>,
    notifications: BTreeMap<NotificationId, Notification>,
    /// (user, id) of every notification, and of the unread ones.
    by_user: BTreeSet<(String, NotificationId)>,
    unread: BTreeSet<(String, NotificationId)>,
    last: [u64; 4],
    /// Test hook: fail every write from now on, as a broken disk would.
    failing: bool,
}

/// The in-memory backend. Clones share the same data: a "reopen" in the
/// conformance suite is a clone, as if the process had restarted with a
/// disk that keeps everything committed.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes every later write (and commit) fail with an I/O error, or work
    /// again: for testing what the layers above do when the engine fails.
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn broken() -> StoreError {
    StoreError::io(std::io::Error::other("the in-memory store was told to fail"))
}

impl Inner {
    fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Page<Message> {
        let end = before.unwrap_or(MessageId(u64::MAX));
        let items: Vec<Message> = self
            .messages
            .range((conversation, MessageId(0))..(conversation, end))
            .rev()
            .map(|(_, m)| m)
            .filter(|m| !m.deleted)
            .take(limit + 1)
            .cloned()
            .collect();
        Page::cut(items, limit, |m| m.id.0)
    }

    fn events_after(&self, conversation: ConversationId, after: Seq, max: usize) -> Replay<LoggedEvent> {
        let after_range = (conversation, Seq(after.0.saturating_add(1)))..=(conversation, Seq(u64::MAX));
        let all: Vec<&LoggedEvent> = self.events.range(after_range).map(|(_, e)| e).collect();
        if all.len() <= max {
            return Replay {
                truncated_after: None,
                items: all.into_iter().cloned().collect(),
            };
        }
        let cut = all.len() - max;
        // The newest message created before the replayed window, looking
        // back past `after` too (0 when there is none).
        let truncated_after = self
            .events
            .range((conversation, Seq(0))..(conversation, all[cut].seq))
            .rev()
            .map(|(_, e)| e)
            .find(|e| e.kind == EventKind::Created)
            .map_or(0, |e| e.message.0);
        Replay {
            truncated_after: Some(truncated_after),
            items: all[cut..].iter().map(|e| (*e).clone()).collect(),
        }
    }

    fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Page<Notification> {
        let set = if unread_only { &self.unread } else { &self.by_user };
        let end = before.unwrap_or(NotificationId(u64::MAX));
        let items: Vec<Notification> = set
            .range((user.to_string(), NotificationId(0))..(user.to_string(), end))
            .rev()
            .take(limit + 1)
            .map(|(_, id)| self.notifications[id].clone())
            .collect();
        Page::cut(items, limit, |n| n.id.0)
    }

    fn notifications_after(&self, user: &str, after: NotificationId, max: usize) -> Replay<Notification> {
        let from = (user.to_string(), NotificationId(after.0.saturating_add(1)));
        let to = (user.to_string(), NotificationId(u64::MAX));
        let ids: Vec<NotificationId> = self.by_user.range(from..=to).map(|(_, id)| *id).collect();
        let cut = ids.len().saturating_sub(max);
        Replay {
            truncated_after: (cut > 0).then(|| ids[cut - 1].0),
            items: ids[cut..]
                .iter()
                .map(|id| self.notifications[id].clone())
                .collect(),
        }
    }

    fn put_notifications(&mut self, ns: &[Notification]) {
        for n in ns {
            let key = (n.user.clone(), n.id);
            self.by_user.insert(key.clone());
            if n.is_read {
                self.unread.remove(&key);
            } else {
                self.unread.insert(key);
            }
            self.notifications.insert(n.id, n.clone());
        }
    }

    fn apply(&mut self, change: Change<'_>) {
        match change {
            Change::Conversation(c) => {
                self.conversations.insert(c.id, c.clone());
            }
            Change::Chat {
                message,
                kind,
                seq,
                payload,
                notifications,
            } => {
                self.messages
                    .insert((message.conversation, message.id), message.clone());
                self.events.insert(
                    (message.conversation, seq),
                    LoggedEvent {
                        seq,
                        kind,
                        message: message.id,
                        payload: Bytes::copy_from_slice(payload),
                    },
                );
                self.put_notifications(notifications);
            }
            Change::Notifications(ns) => self.put_notifications(ns),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>> {
        Ok(self.lock().conversations.get(&id).cloned())
    }
    async fn conversation_exists(&self, id: ConversationId) -> Result<bool> {
        Ok(self.lock().conversations.contains_key(&id))
    }
    async fn is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool> {
        Ok(self
            .lock()
            .conversations
            .get(&conversation)
            .is_some_and(|c| c.participants.iter().any(|p| p == user)))
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>> {
        Ok(self
            .lock()
            .conversations
            .values()
            .filter(|c| c.participants.iter().any(|p| p == user))
            .cloned()
            .collect())
    }
    async fn message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        Ok(self.lock().messages.get(&(conversation, id)).cloned())
    }
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>> {
        Ok(self.lock().history(conversation, before, limit))
    }
    async fn events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>> {
        Ok(self.lock().events_after(conversation, after, max))
    }
    async fn notification(&self, id: NotificationId) -> Result<Option<Notification>> {
        Ok(self.lock().notifications.get(&id).cloned())
    }
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        Ok(self.lock().notifications(user, unread_only, before, limit))
    }
    async fn unread_count(&self, user: &str) -> Result<u64> {
        let inner = self.lock();
        let from = (user.to_string(), NotificationId(0));
        let to = (user.to_string(), NotificationId(u64::MAX));
        Ok(inner.unread.range(from..=to).count() as u64)
    }
    async fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>> {
        Ok(self.lock().notifications_after(user, after, max))
    }

    fn writable(&self) -> Result<()> {
        if self.lock().failing {
            return Err(broken());
        }
        Ok(())
    }

    fn begin(&self) -> Result<Box<dyn Group + '_>> {
        Ok(Box::new(MemoryGroup { store: self }))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Changes apply at once; the commit has nothing left to make durable.
struct MemoryGroup<'a> {
    store: &'a MemoryStore,
}

impl MemoryGroup<'_> {
    fn bump(&mut self, which: usize) -> Result<u64> {
        let mut inner = self.store.lock();
        if inner.failing {
            return Err(broken());
        }
        inner.last[which] += 1;
        Ok(inner.last[which])
    }
}

impl Group for MemoryGroup<'_> {
    fn conversation(&mut self, id: ConversationId) -> Result<Option<Conversation>> {
        Ok(self.store.lock().conversations.get(&id).cloned())
    }
    fn message(&mut self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>> {
        Ok(self.store.lock().messages.get(&(conversation, id)).cloned())
    }
    fn notification(&mut self, id: NotificationId) -> Result<Option<Notification>> {
        Ok(self.store.lock().notifications.get(&id).cloned())
    }
    fn unread(&mut self, user: &str) -> Result<Vec<NotificationId>> {
        let inner = self.store.lock();
        let from = (user.to_string(), NotificationId(0));
        let to = (user.to_string(), NotificationId(u64::MAX));
        Ok(inner.unread.range(from..=to).map(|(_, id)| *id).collect())
    }
    fn next_conversation(&mut self) -> Result<ConversationId> {
        self.bump(0).map(ConversationId)
    }
    fn next_message(&mut self) -> Result<MessageId> {
        self.bump(1).map(MessageId)
    }
    fn next_notification(&mut self) -> Result<NotificationId> {
        self.bump(2).map(NotificationId)
    }
    fn next_seq(&mut self, _conversation: ConversationId) -> Result<Seq> {
        self.bump(3).map(Seq)
    }
    fn apply(&mut self, change: Change<'_>) -> Result<()> {
        let mut inner = self.store.lock();
        if inner.failing {
            return Err(broken());
        }
        inner.apply(change);
        Ok(())
    }
    fn commit(self: Box<Self>) -> Result<()> {
        if self.store.lock().failing {
            return Err(broken());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_store_conformance_suite() {
        struct Memory(MemoryStore);
        impl crate::store::conformance::Backend for Memory {
            fn open(&self) -> Box<dyn Store> {
                Box::new(self.0.clone())
            }
        }
        crate::store::conformance::run(&Memory(MemoryStore::new()));
    }
}
