//! The checks a WebSocket upgrade passes before any socket exists, in
//! Part B/D's order: token (401), path (404), conversation (404),
//! participant (403), `after` (400); then capacity (503, or 429 past
//! `--max-sockets-per-user`) and the handshake. `--max-upgrades-per-ip`
//! (429) comes before all of them: it guards the checks themselves.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{ApiError, Body, Route};
use crate::auth::{self, AuthError, Identity};
use crate::ids::{ConversationId, MessageId, NotificationId};
use crate::limits::{ClientAddr, Refusal};
use crate::state::Shared;
use crate::ws::{self, Session, Topic};

/// Counts an upgrade refused with `e`'s status.
fn refused(shared: &Shared, e: ApiError) -> ApiError {
    let status = crate::metrics::Status {
        status: e.status.as_u16(),
    };
    shared.metrics.refused.get_or_create(&status).inc();
    e
}

/// 429 for an edge limit, counted under its name.
fn limited(shared: &Shared, limit: &'static str, detail: &'static str) -> ApiError {
    let label = crate::metrics::Limit { limit };
    shared.metrics.limited.get_or_create(&label).inc();
    refused(
        shared,
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", detail),
    )
}

/// An upgrade, in its phases: edge limits, the contract's checks, the
/// handshake, the subscription (before the 101), then the socket's hand-over
/// once hyper lets go of the connection.
pub async fn upgrade(
    req: &mut Request<Incoming>,
    route: Route,
    shared: &Arc<Shared>,
) -> Result<Response<Body>, ApiError> {
    if shared.gate.limits_ips() {
        let ip = req.extensions().get::<ClientAddr>().map(|a| a.0.ip());
        if ip.is_some_and(|ip| !shared.gate.allow_upgrade_from(ip)) {
            return Err(limited(
                shared,
                "upgrades_per_ip",
                "too many upgrades from this address; retry later",
            ));
        }
    }
    let (session, offered_bearer) = check(req, route, shared).await.map_err(|e| refused(shared, e))?;
    let (response, on_upgrade) = handshake(req)?;
    // Subscribed (and replayed) before the 101 goes out: a client that has
    // its 101 sees every event accepted after it.
    let sub = subscribe(session, shared).await?;
    let (mut parts, _) = response.into_parts();
    if offered_bearer {
        parts
            .headers
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("bearer"));
    }
    tokio::spawn(hand_over(on_upgrade, sub));
    Ok(Response::from_parts(parts, Body::default()))
}

/// Checks the WebSocket handshake and builds the 101.
fn handshake(req: &mut Request<Incoming>) -> Result<(Response<Body>, hyper::upgrade::OnUpgrade), ApiError> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this path is a WebSocket endpoint",
        ));
    }
    // Take hyper's upgrade handle first: fastwebsockets then only checks the
    // key and version and builds the 101, and the socket task gets the bare
    // TcpStream back from hyper rather than a boxed, buffered wrapper.
    let on_upgrade = hyper::upgrade::on(&mut *req);
    match fastwebsockets::upgrade::upgrade(&mut *req) {
        Ok((response, _unused)) => {
            let (parts, _) = response.into_parts();
            Ok((Response::from_parts(parts, Body::default()), on_upgrade))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            e.to_string(),
        )),
    }
}

/// Takes the socket's slot and joins it (replaying first when resuming).
async fn subscribe(session: Session, shared: &Arc<Shared>) -> Result<ws::Subscription, ApiError> {
    match ws::Subscription::join(session, shared).await {
        Ok(sub) => Ok(sub),
        Err(ws::JoinError::Refused(Refusal::TooManyForUser)) => Err(limited(
            shared,
            "sockets_per_user",
            "too many open sockets for this user; close one first",
        )),
        Err(ws::JoinError::Refused(r)) => Err(refused(
            shared,
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", r.to_string()),
        )),
        Err(ws::JoinError::Store(e)) => Err(e.into()),
    }
}

/// Waits for hyper to hand over the connection, then runs the socket.
/// Until `open`, frames for it queue in its outbox; if the upgrade fails,
/// dropping `sub` leaves the hub again.
async fn hand_over(on_upgrade: hyper::upgrade::OnUpgrade, sub: ws::Subscription) {
    match on_upgrade.await {
        Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(p) => {
                let early = p.read_buf.to_vec();
                // `read_buf` points into hyper's connection buffer: drop it
                // now or it keeps that buffer alive for the socket's life.
                drop(p.read_buf);
                ws::open(p.io.into_inner(), early, sub);
            }
            Err(_) => tracing::error!("upgraded connection is not a TcpStream"),
        },
        Err(e) => tracing::debug!("upgrade did not complete: {e}"),
    }
}

/// Part B/D's checks, in order: token (401), path (404), then the topic's
/// own checks; answers the session and whether `bearer` was offered.
async fn check(req: &Request<Incoming>, route: Route, shared: &Shared) -> Result<(Session, bool), ApiError> {
    let query = req.uri().query();
    let presented = auth::presented(req.headers(), query, true);
    let token = presented
        .token
        .ok_or(ApiError::unauthorized(AuthError::Missing))?;
    let who = shared.verifier.verify(token).map_err(ApiError::unauthorized)?;
    let after = auth::query_param(query, "after");
    let (topic, resume) = match route {
        Route::Chat(id) => {
            let id = ConversationId(id.ok_or(ApiError::not_found("no such conversation"))?);
            (Topic::Chat(id), chat_resume(id, &who, after, shared).await?)
        }
        Route::Notifications => (
            Topic::Notifications,
            notifications_resume(&who, after, shared).await?,
        ),
        _ => return Err(ApiError::not_found("no such WebSocket endpoint")),
    };
    Ok((
        Session {
            topic,
            user: who.user,
            resume,
        },
        presented.offered_bearer,
    ))
}

/// `after=0` or an id in canonical form.
fn parse_after(s: &str) -> Option<u64> {
    if s == "0" {
        Some(0)
    } else {
        super::parse_id(s)
    }
}

/// A chat socket: the conversation exists (404), the caller takes part
/// (403), and `after`, if given, is 0 or a message of it (400); answers
/// the log position to replay after.
async fn chat_resume(
    id: ConversationId,
    who: &Identity,
    after: Option<&str>,
    shared: &Shared,
) -> Result<Option<u64>, ApiError> {
    if !shared.store.conversation_exists(id).await? {
        return Err(ApiError::not_found("no such conversation"));
    }
    if who.service || !shared.store.is_participant(id, &who.user).await? {
        return Err(ApiError::forbidden("not a participant of this conversation"));
    }
    let Some(s) = after else {
        return Ok(None);
    };
    match parse_after(s).ok_or(ApiError::invalid_field("'after' must be 0 or a message id"))? {
        0 => Ok(Some(0)),
        after => {
            let m = shared
                .store
                .message(id, MessageId(after))
                .await?
                .ok_or(ApiError::invalid_field(
                    "'after' is not a message of this conversation",
                ))?;
            Ok(Some(m.seq.0))
        }
    }
}

/// A notifications socket: `after`, if given, is 0 or one of the caller's
/// notifications (400).
async fn notifications_resume(
    who: &Identity,
    after: Option<&str>,
    shared: &Shared,
) -> Result<Option<u64>, ApiError> {
    let Some(s) = after else {
        return Ok(None);
    };
    let after = parse_after(s).ok_or(ApiError::invalid_field("'after' must be 0 or a notification id"))?;
    if after != 0 {
        match shared.store.notification(NotificationId(after)).await? {
            Some(n) if *n.user == *who.user => {}
            _ => {
                return Err(ApiError::invalid_field(
                    "'after' is not one of your notifications",
                ))
            }
        }
    }
    Ok(Some(after))
}
