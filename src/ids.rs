//! Typed ids: a conversation id can't be passed where a message id is meant.
//!
//! Each is a `u64` on the wire and in the store (`serde(transparent)`), so
//! their JSON is the bare number the contract shows. Ids are assigned by the
//! store backend (see [`crate::store::Group`]); nothing else makes them up.

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A conversation (`/ws/chat/<id>/`).
    ConversationId
);
id!(
    /// A chat message; ids increase over the whole server.
    MessageId
);
id!(
    /// A notification; ids increase over the whole server.
    NotificationId
);
id!(
    /// A position in a conversation's event log: events of one conversation
    /// are delivered in increasing `Seq` order, and `?after=` resumes by it.
    Seq
);
