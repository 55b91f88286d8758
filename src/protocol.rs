//! The wire contract's frames: inbound chat commands parsed in place into
//! borrowed types, and outbound events encoded once into JSON.
//!
//! Pure: no I/O, no store, no clock. This is the module the fuzzer and the
//! benches drive. Part C's check order lives in [`parse_command`] and
//! [`ErrorCode`]; the sequencer adds only the two checks that need the store
//! (`not_found`, `forbidden`).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;
use simd_json::{BorrowedValue, StaticNode};

/// The seven error codes of Part B, in the order Part C checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidJson,
    InvalidField,
    UnknownType,
    TooLarge,
    NotFound,
    Forbidden,
    RateLimited,
    /// Not one of Part B's seven: the store could not take the write (a
    /// full disk); nothing was stored or shown, and retrying may succeed.
    Unavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidField,
        ErrorCode::UnknownType,
        ErrorCode::TooLarge,
        ErrorCode::NotFound,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// A rejected frame: the code, and the text for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub detail: &'static str,
}

const fn reject(code: ErrorCode, detail: &'static str) -> Rejection {
    Rejection { code, detail }
}

/// A message id as the client wrote it. A number that cannot name any
/// message (0, negative, fractional, beyond 64 bits) is kept as `None` so it
/// is answered `not_found` only after the `too_large` check, as Part C orders.
pub type MessageRef = Option<u64>;

/// One valid chat command, borrowing its text from the frame buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Send { text: Cow<'a, str> },
    Edit { id: MessageRef, content: Cow<'a, str> },
    Delete { id: MessageRef },
}

thread_local! {
    /// simd-json's scratch buffers, reused so a parse does not allocate them.
    static BUFFERS: RefCell<simd_json::Buffers> = RefCell::new(simd_json::Buffers::new(512));
}

/// Parses and validates one text frame of a chat socket, in place.
///
/// `frame` is clobbered (simd-json unescapes strings into it); the returned
/// command borrows it.
pub fn parse_command(frame: &mut [u8], max_chars: usize) -> Result<Command<'_>, Rejection> {
    let value = BUFFERS
        .with(|b| simd_json::value::borrowed::to_value_with_buffers(frame, &mut b.borrow_mut()))
        .map_err(|_| reject(ErrorCode::InvalidJson, "the frame is not valid JSON"))?;
    let BorrowedValue::Object(obj) = value else {
        return Err(reject(ErrorCode::InvalidJson, "the frame must be a JSON object"));
    };
    let ty = match obj.get("type") {
        Some(BorrowedValue::String(s)) => s,
        _ => return Err(reject(ErrorCode::InvalidField, "'type' must be a string")),
    };
    let cmd = match ty.as_ref() {
        "chat_message" => Command::Send {
            text: text_field(&obj, "message")?,
        },
        "edit_message" => {
            let id = id_field(&obj)?;
            Command::Edit {
                id,
                content: text_field(&obj, "content")?,
            }
        }
        "delete_message" => Command::Delete { id: id_field(&obj)? },
        _ => return Err(reject(ErrorCode::UnknownType, "unknown 'type'")),
    };
    let text = match &cmd {
        Command::Send { text } | Command::Edit { content: text, .. } => text.as_ref(),
        Command::Delete { .. } => "",
    };
    if text.chars().count() > max_chars {
        return Err(reject(ErrorCode::TooLarge, "the text is longer than the limit"));
    }
    if let Command::Edit { id: None, .. } | Command::Delete { id: None } = cmd {
        return Err(NOT_FOUND);
    }
    Ok(cmd)
}

pub const NOT_FOUND: Rejection = reject(ErrorCode::NotFound, "no such message in this conversation");
pub const FORBIDDEN: Rejection = reject(ErrorCode::Forbidden, "only the sender may change a message");
pub const RATE_LIMITED: Rejection = reject(ErrorCode::RateLimited, "too many frames: this one was dropped");
pub const UNKNOWN_TYPE_NOTIFICATIONS: Rejection = reject(
    ErrorCode::UnknownType,
    "this socket only pushes notifications; mark them read over REST",
);
pub const UNAVAILABLE: Rejection = reject(
    ErrorCode::Unavailable,
    "the store cannot be written right now; nothing was stored",
);
pub const BINARY: Rejection = reject(ErrorCode::InvalidJson, "binary frames are not JSON text");

fn text_field<'a>(
    obj: &simd_json::borrowed::Object<'a>,
    name: &'static str,
) -> Result<Cow<'a, str>, Rejection> {
    match obj.get(name) {
        // A borrowed parse yields `Cow::Borrowed`: the clone copies no text.
        Some(BorrowedValue::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(match name {
            "message" => reject(ErrorCode::InvalidField, "'message' must be a non-empty string"),
            _ => reject(ErrorCode::InvalidField, "'content' must be a non-empty string"),
        }),
    }
}

fn id_field(obj: &simd_json::borrowed::Object<'_>) -> Result<MessageRef, Rejection> {
    match obj.get("message_id") {
        Some(BorrowedValue::Static(n)) => match *n {
            StaticNode::U64(id) if id > 0 => Ok(Some(id)),
            StaticNode::I64(id) if id > 0 => Ok(Some(id as u64)),
            StaticNode::U64(_) | StaticNode::I64(_) | StaticNode::F64(_) => Ok(None),
            _ => Err(reject(ErrorCode::InvalidField, "'message_id' must be a number")),
        },
        _ => Err(reject(ErrorCode::InvalidField, "'message_id' must be a number")),
    }
}

/// A UTC instant in microseconds since the epoch, shown as RFC 3339 with `Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, Serialize)]
#[serde(transparent)]
pub struct Micros(pub u64);

impl Micros {
    pub fn now() -> Micros {
        let d = UNIX_EPOCH.elapsed().unwrap_or_default();
        Micros(d.as_micros() as u64)
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = UNIX_EPOCH + Duration::from_micros(self.0);
        write!(f, "{}", humantime::format_rfc3339_micros(t))
    }
}

/// Serializes a [`Micros`] as its RFC 3339 text.
pub struct Rfc3339(pub Micros);

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A chat message as Part A shows it (and, with `edited`, as history does).
pub struct MessageView<'a> {
    pub id: u64,
    pub sender: &'a str,
    pub content: &'a str,
    pub timestamp: Micros,
    /// `Some` only in history: live frames carry exactly Part A's four fields.
    pub edited: Option<bool>,
}

impl Serialize for MessageView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Message", 5)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("sender", self.sender)?;
        st.serialize_field("content", self.content)?;
        st.serialize_field("timestamp", &Rfc3339(self.timestamp))?;
        if let Some(edited) = self.edited {
            st.serialize_field("edited", &edited)?;
        }
        st.end()
    }
}

/// A notification as Part A shows it (inside `{"message": ...}` on the socket).
#[derive(Serialize)]
pub struct NotificationView<'a> {
    pub id: u64,
    pub message: &'a str,
    pub is_read: bool,
    pub timestamp: Rfc3339,
}

/// An event of a conversation, as it goes out live and is kept in the log.
pub enum ChatEvent<'a> {
    Created(MessageView<'a>),
    Edited { id: u64, content: &'a str },
    Deleted { id: u64 },
}

#[derive(Serialize)]
struct EditedBody<'a> {
    id: u64,
    content: &'a str,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Tagged<'a> {
    #[serde(rename = "message.edited")]
    Edited { message: EditedBody<'a> },
    #[serde(rename = "message.deleted")]
    Deleted { message_id: u64 },
    #[serde(rename = "error")]
    Error { code: &'static str, detail: &'a str },
    #[serde(rename = "resume.truncated")]
    Truncated { after: u64 },
}

/// Appends the JSON of `event` to `out`.
pub fn encode_chat_event(out: &mut Vec<u8>, event: &ChatEvent<'_>) {
    let r = match event {
        ChatEvent::Created(m) => serde_json::to_writer(&mut *out, m),
        ChatEvent::Edited { id, content } => serde_json::to_writer(
            &mut *out,
            &Tagged::Edited {
                message: EditedBody { id: *id, content },
            },
        ),
        ChatEvent::Deleted { id } => serde_json::to_writer(&mut *out, &Tagged::Deleted { message_id: *id }),
    };
    r.expect("serializing to a Vec cannot fail");
}

/// Appends `{"message": {...}}`, the notifications socket's frame.
pub fn encode_notification(out: &mut Vec<u8>, n: &NotificationView<'_>) {
    #[derive(Serialize)]
    struct Envelope<'a, 'b> {
        message: &'b NotificationView<'a>,
    }
    serde_json::to_writer(out, &Envelope { message: n }).expect("serializing to a Vec cannot fail");
}

/// Appends `{"type": "error", ...}`.
pub fn encode_error(out: &mut Vec<u8>, r: &Rejection) {
    serde_json::to_writer(
        out,
        &Tagged::Error {
            code: r.code.as_str(),
            detail: r.detail,
        },
    )
    .expect("serializing to a Vec cannot fail");
}

/// Appends `{"type": "resume.truncated", "after": id}` (Part D).
pub fn encode_truncated(out: &mut Vec<u8>, after: u64) {
    serde_json::to_writer(out, &Tagged::Truncated { after }).expect("serializing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, ErrorCode> {
        let mut b = s.as_bytes().to_vec();
        parse_command(&mut b, 10)
            .map(|c| format!("{c:?}"))
            .map_err(|r| r.code)
    }

    /// One table, long on purpose: every row of Part C's order in one place.
    #[test]
    fn part_c_check_order() {
        use ErrorCode::*;
        let cases: &[(&str, Result<&str, ErrorCode>)] = &[
            (
                r#"{"type":"chat_message","message":"hi"}"#,
                Ok(r#"Send { text: "hi" }"#),
            ),
            (
                r#"{"type":"chat_message","message":"a\u0000\n"}"#,
                Ok("Send { text: \"a\\0\\n\" }"),
            ),
            (r#"[1,2]"#, Err(InvalidJson)),
            (r#""x""#, Err(InvalidJson)),
            (r#"42"#, Err(InvalidJson)),
            (r#"null"#, Err(InvalidJson)),
            (r#"NaN"#, Err(InvalidJson)),
            (r#"{"type":"chat_message","message":"hi"} x"#, Err(InvalidJson)),
            (r#"{"message":"hi"}"#, Err(InvalidField)),
            (r#"{"type":1}"#, Err(InvalidField)),
            (r#"{"type":"CHAT_MESSAGE","message":"hi"}"#, Err(UnknownType)),
            (r#"{"type":"chat_message"}"#, Err(InvalidField)),
            (
                r#"{"type":"chat_message","message":" \u3000\t "}"#,
                Err(InvalidField),
            ),
            (r#"{"type":"chat_message","message":5}"#, Err(InvalidField)),
            (
                r#"{"type":"chat_message","message":"01234567890"}"#,
                Err(TooLarge),
            ),
            (
                r#"{"type":"chat_message","message":"😀😀😀😀😀😀😀😀😀😀"}"#,
                Ok("Send { text: \"😀😀😀😀😀😀😀😀😀😀\" }"),
            ),
            (
                r#"{"type":"edit_message","message_id":"1","content":"x"}"#,
                Err(InvalidField),
            ),
            (
                r#"{"type":"edit_message","message_id":0,"content":"01234567890"}"#,
                Err(TooLarge),
            ),
            (
                r#"{"type":"edit_message","message_id":0,"content":"x"}"#,
                Err(NotFound),
            ),
            (
                r#"{"type":"edit_message","message_id":-3,"content":"x"}"#,
                Err(NotFound),
            ),
            (
                r#"{"type":"edit_message","message_id":1.5,"content":"x"}"#,
                Err(NotFound),
            ),
            (
                r#"{"type":"delete_message","message_id":99999999999999999999999}"#,
                Err(NotFound),
            ),
            (
                r#"{"type":"delete_message","message_id":7}"#,
                Ok("Delete { id: Some(7) }"),
            ),
            (r#"{"type":"delete_message"}"#, Err(InvalidField)),
            (
                r#"{"type":"delete_message","message_id":null}"#,
                Err(InvalidField),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(input).as_deref().map_err(|e| *e),
                want.map(|s| s),
                "{input}"
            );
        }
    }

    #[test]
    fn part_a_shapes() {
        let mut out = Vec::new();
        let m = MessageView {
            id: 1,
            sender: "a",
            content: "x",
            timestamp: Micros(0),
            edited: None,
        };
        encode_chat_event(&mut out, &ChatEvent::Created(m));
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":1,"sender":"a","content":"x","timestamp":"1970-01-01T00:00:00.000000Z"}"#
        );
        out.clear();
        encode_chat_event(&mut out, &ChatEvent::Edited { id: 2, content: "y" });
        assert_eq!(
            out,
            br#"{"type":"message.edited","message":{"id":2,"content":"y"}}"#
        );
        out.clear();
        encode_chat_event(&mut out, &ChatEvent::Deleted { id: 3 });
        assert_eq!(out, br#"{"type":"message.deleted","message_id":3}"#);
    }
}
