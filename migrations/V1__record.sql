-- parley's record in PostgreSQL (cluster mode). Applied once, at the start
-- of the first node, by refinery under an advisory lock (src/store/postgres).
--
-- Text a user wrote (titles, messages, notification texts) is kept as its
-- UTF-8 bytes: PostgreSQL's `text` cannot hold U+0000, which the API allows.
--
-- Order: every write to a conversation locks its row (FOR UPDATE) for the
-- whole transaction, so its event log positions (`last_seq`) and message ids
-- are issued in commit order; notification ids are issued under a
-- transaction-scoped advisory lock per user, for the same reason.

CREATE SEQUENCE conversation_ids;
CREATE SEQUENCE message_ids;
CREATE SEQUENCE notification_ids;

CREATE TABLE conversations (
    id           BIGINT PRIMARY KEY,
    title        BYTEA,
    -- The creator first, then the others in the order given.
    participants TEXT[] NOT NULL,
    -- Microseconds since the Unix epoch, as the API shows them.
    created_at   BIGINT NOT NULL,
    -- The position of the conversation's newest event.
    last_seq     BIGINT NOT NULL DEFAULT 0
);

-- Who is in which conversation: "my conversations", oldest first.
CREATE TABLE participants (
    user_name    TEXT   NOT NULL,
    conversation BIGINT NOT NULL REFERENCES conversations (id),
    PRIMARY KEY (user_name, conversation)
);

CREATE TABLE messages (
    id           BIGINT  PRIMARY KEY,
    -- No foreign key: its conversation row is locked by the same
    -- transaction anyway, and a key check per row would cost a row lock each.
    conversation BIGINT  NOT NULL,
    sender       TEXT    NOT NULL,
    content      BYTEA   NOT NULL,
    created_at   BIGINT  NOT NULL,
    edited       BOOLEAN NOT NULL,
    deleted      BOOLEAN NOT NULL,
    -- The position of the message's creation in its conversation's log.
    seq          BIGINT  NOT NULL
);
-- History: live messages of a conversation, newest first.
CREATE INDEX messages_history ON messages (conversation, id) WHERE NOT deleted;

-- Each conversation's event log: exactly the JSON that went out live.
CREATE TABLE events (
    conversation BIGINT   NOT NULL,
    seq          BIGINT   NOT NULL,
    -- 0 created, 1 edited, 2 deleted.
    kind         SMALLINT NOT NULL,
    message      BIGINT   NOT NULL,
    payload      BYTEA    NOT NULL,
    PRIMARY KEY (conversation, seq)
);

CREATE TABLE notifications (
    id         BIGINT  PRIMARY KEY,
    user_name  TEXT    NOT NULL,
    message    BYTEA   NOT NULL,
    is_read    BOOLEAN NOT NULL,
    created_at BIGINT  NOT NULL
);
CREATE INDEX notifications_of_user ON notifications (user_name, id);
CREATE INDEX notifications_unread ON notifications (user_name, id) WHERE NOT is_read;
