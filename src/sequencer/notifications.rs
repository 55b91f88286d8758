//! Notifications: sent by a service (Part B), marked read one by one or
//! all at once, and queued for the user's notification sockets.

use super::{WriteError, Writer};
use crate::ids::NotificationId;
use crate::protocol::{self, Micros, NotificationView, Rfc3339};
use crate::store::{Change, Group, Notification};

/// A stored notification as Part A shows it.
pub fn notification_view(n: &Notification) -> NotificationView<'_> {
    NotificationView {
        id: n.id.0,
        message: &n.message,
        is_read: n.is_read,
        timestamp: Rfc3339(n.timestamp),
    }
}

impl Writer {
    /// Queues `n`'s frame for the user's notification sockets.
    pub(super) fn queue_notification(&mut self, g: &mut dyn Group, n: &Notification) {
        self.scratch.clear();
        protocol::encode_notification(&mut self.scratch, &notification_view(n));
        self.out
            .notification(&n.user, n.id, || g.notification_before(&n.user), &self.scratch);
    }

    pub(super) fn notify(
        &mut self,
        g: &mut dyn Group,
        user: String,
        text: String,
    ) -> Result<Notification, WriteError> {
        let n = Notification {
            id: g.next_notification()?,
            user,
            message: text,
            is_read: false,
            timestamp: Micros::now(),
        };
        self.apply(g, Change::Notifications(std::slice::from_ref(&n)), "notification")?;
        self.queue_notification(g, &n);
        Ok(n)
    }

    /// Idempotent: marking a read notification read again changes nothing.
    pub(super) fn mark_read(
        &mut self,
        g: &mut dyn Group,
        user: &str,
        id: NotificationId,
    ) -> Result<Notification, WriteError> {
        let mut n = match g.notification(id)? {
            Some(n) if n.user == user => n,
            _ => return Err(WriteError::NotFound),
        };
        if !n.is_read {
            n.is_read = true;
            self.apply(g, Change::Notifications(std::slice::from_ref(&n)), "read")?;
        }
        Ok(n)
    }

    /// Marks every unread notification of `user` read, in one change.
    pub(super) fn read_all(&mut self, g: &mut dyn Group, user: &str) -> Result<u64, WriteError> {
        let mut changed = Vec::new();
        for id in g.unread(user)? {
            if let Some(mut n) = g.notification(id)? {
                n.is_read = true;
                changed.push(n);
            }
        }
        if !changed.is_empty() {
            self.apply(g, Change::Notifications(&changed), "read_all")?;
        }
        Ok(changed.len() as u64)
    }
}
