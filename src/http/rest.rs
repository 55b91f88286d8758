//! The REST API of Part B: conversations, history, notifications.
//!
//! Reads go straight to the store (any thread may read); writes go through
//! the sequencer and are answered only once durable.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::{json, ApiError, Body, Route};
use crate::auth::{self, Identity};
use crate::ids::{ConversationId, MessageId, NotificationId};
use crate::protocol::{MessageView, Rfc3339};
use crate::sequencer::{notification_view, Request as Write};
use crate::state::Shared;
use crate::store::{Conversation, Page};

pub fn healthz(shared: &Shared) -> Response<Body> {
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    }
    match shared.store.writable() {
        Ok(()) => json(
            StatusCode::OK,
            &Health {
                status: "ok",
                detail: None,
            },
        ),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Health {
                status: "store not writable",
                detail: Some(e.to_string()),
            },
        ),
    }
}

pub fn metrics(shared: &Shared) -> Response<Body> {
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(shared.metrics.encode())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

#[derive(Serialize)]
struct ConversationView<'a> {
    id: u64,
    title: &'a Option<String>,
    participants: &'a [String],
    created_at: Rfc3339,
}

fn conversation_view(c: &Conversation) -> ConversationView<'_> {
    ConversationView {
        id: c.id.0,
        title: &c.title,
        participants: &c.participants,
        created_at: Rfc3339(c.created_at),
    }
}

#[derive(Serialize)]
struct Results<T> {
    results: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<Option<u64>>,
}

/// Answers one REST request whose route and method were checked (405
/// before this) and whose caller is known.
pub async fn handle(
    req: Request<Incoming>,
    route: Route,
    who: Identity,
    shared: &Arc<Shared>,
) -> Result<Response<Body>, ApiError> {
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    match (route, req.method().clone()) {
        (Route::Conversations, Method::GET) => list_conversations(&who, shared).await,
        (Route::Conversations, _) => create_conversation(req, &who, shared).await,
        (Route::Conversation(id), _) => {
            let c = conversation_for(shared, id, &who).await?;
            Ok(json(StatusCode::OK, &conversation_view(&c)))
        }
        (Route::Messages(id), _) => history(id, query, &who, shared).await,
        (Route::NotificationList, Method::GET) => list_notifications(query, &who, shared).await,
        (Route::NotificationList, _) => create_notification(req, &who, shared).await,
        (Route::UnreadCount, _) => {
            #[derive(Serialize)]
            struct Count {
                count: u64,
            }
            let count = shared.store.unread_count(&who.user).await?;
            Ok(json(StatusCode::OK, &Count { count }))
        }
        (Route::ReadAll, _) => {
            #[derive(Serialize)]
            struct Updated {
                updated: u64,
            }
            let user = who.user.clone();
            let updated = shared
                .sequencer
                .ask(|reply| Write::ReadAll { user, reply })
                .await?;
            Ok(json(StatusCode::OK, &Updated { updated }))
        }
        (Route::MarkRead(id), _) => {
            let id = NotificationId(id.ok_or(ApiError::not_found("no such notification"))?);
            let user = who.user.clone();
            let n = shared
                .sequencer
                .ask(|reply| Write::MarkRead { user, id, reply })
                .await?;
            Ok(json(StatusCode::OK, &notification_view(&n)))
        }
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}

async fn list_conversations(who: &Identity, shared: &Shared) -> Result<Response<Body>, ApiError> {
    // A service token is a participant of nothing, whatever its name.
    let list = if who.service {
        Vec::new()
    } else {
        shared.store.conversations_of(&who.user).await?
    };
    Ok(json(
        StatusCode::OK,
        &Results {
            results: list.iter().map(conversation_view).collect(),
            next: None,
        },
    ))
}

async fn create_conversation(
    req: Request<Incoming>,
    who: &Identity,
    shared: &Shared,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(req, shared.config.max_body_bytes).await?;
    if who.service {
        return Err(ApiError::forbidden("a service token is a participant of nothing"));
    }
    let not_usernames = || ApiError::invalid_field("'participants' must be a list of usernames");
    let participants = match body.get("participants") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) if auth::valid_username(s) => Ok(s.clone()),
                _ => Err(not_usernames()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(not_usernames()),
    };
    let title = match body.get("title") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= 200 => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "'title' must be a string of at most 200 characters",
            ))
        }
    };
    let creator = who.user.clone();
    let c = shared
        .sequencer
        .ask(|reply| Write::CreateConversation {
            creator,
            title,
            participants,
            reply,
        })
        .await?;
    Ok(json(StatusCode::CREATED, &conversation_view(&c)))
}

async fn history(
    id: Option<u64>,
    query: Option<&str>,
    who: &Identity,
    shared: &Shared,
) -> Result<Response<Body>, ApiError> {
    let c = conversation_for(shared, id, who).await?;
    let (before, limit) = page_params(query)?;
    let Page { items, next } = shared.store.history(c.id, before.map(MessageId), limit).await?;
    let results = items
        .iter()
        .map(|m| MessageView {
            id: m.id.0,
            sender: &m.sender,
            content: &m.content,
            timestamp: m.timestamp,
            edited: Some(m.edited),
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &Results {
            results,
            next: Some(next),
        },
    ))
}

async fn list_notifications(
    query: Option<&str>,
    who: &Identity,
    shared: &Shared,
) -> Result<Response<Body>, ApiError> {
    let (before, limit) = page_params(query)?;
    let unread = match auth::query_param(query, "unread") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid_field("'unread' must be true or false")),
    };
    let before = before.map(NotificationId);
    let Page { items, next } = shared
        .store
        .notifications(&who.user, unread, before, limit)
        .await?;
    let results = items.iter().map(notification_view).collect();
    Ok(json(
        StatusCode::OK,
        &Results {
            results,
            next: Some(next),
        },
    ))
}

/// A service posts a notification for a user.
async fn create_notification(
    req: Request<Incoming>,
    who: &Identity,
    shared: &Shared,
) -> Result<Response<Body>, ApiError> {
    if !who.service {
        return Err(ApiError::forbidden(
            "only a service token may create notifications",
        ));
    }
    let body = read_json(req, shared.config.max_body_bytes).await?;
    let user = match body.get("user") {
        Some(Value::String(s)) if auth::valid_username(s) => s.clone(),
        _ => return Err(ApiError::invalid_field("'user' must be a username")),
    };
    let text = match body.get("message") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err(ApiError::invalid_field("'message' must be a non-empty string")),
    };
    if text.chars().count() > shared.config.max_message_chars {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_large",
            "'message' is longer than the limit",
        ));
    }
    let n = shared
        .sequencer
        .ask(|reply| Write::Notify { user, text, reply })
        .await?;
    Ok(json(StatusCode::CREATED, &notification_view(&n)))
}

/// The conversation, if it exists (404) and the caller takes part (403).
async fn conversation_for(
    shared: &Shared,
    id: Option<u64>,
    who: &Identity,
) -> Result<Conversation, ApiError> {
    let Some(id) = id else {
        return Err(ApiError::not_found("no such conversation"));
    };
    let c = shared
        .store
        .conversation(ConversationId(id))
        .await?
        .ok_or(ApiError::not_found("no such conversation"))?;
    if who.service || !c.participants.iter().any(|p| **p == *who.user) {
        return Err(ApiError::forbidden("not a participant of this conversation"));
    }
    Ok(c)
}

/// `before` (a positive integer) and `limit` (1-100, default 50); nothing is clamped.
fn page_params(query: Option<&str>) -> Result<(Option<u64>, usize), ApiError> {
    let before = match auth::query_param(query, "before") {
        None => None,
        Some(s) => {
            Some(super::parse_id(s).ok_or(ApiError::invalid_field("'before' must be a positive integer"))?)
        }
    };
    let limit = match auth::query_param(query, "limit") {
        None => 50,
        Some(s) => super::parse_id(s)
            .filter(|&n| n <= 100)
            .ok_or(ApiError::invalid_field(
                "'limit' must be an integer from 1 to 100",
            ))? as usize,
    };
    Ok((before, limit))
}

/// The body as a JSON object: 413 over the limit, 400 `invalid_json` when
/// empty, not JSON, or not an object.
async fn read_json(req: Request<Incoming>, limit: usize) -> Result<serde_json::Map<String, Value>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body over {limit} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                too_large()
            } else {
                ApiError::invalid_json("the body could not be read")
            }
        })?
        .to_bytes();
    if bytes.trim_ascii().is_empty() {
        return Err(ApiError::invalid_json("a JSON body is required"));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid_json("the body must be a JSON object")),
        Err(_) => Err(ApiError::invalid_json("the body is not valid JSON")),
    }
}
