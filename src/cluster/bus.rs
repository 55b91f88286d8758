//! Redis pub/sub between the nodes of a cluster: each node publishes its
//! groups' events and notifications, and hands every other node's to its
//! relay. Redis carries frames and wake-ups only, never the record: a
//! message lost on the way is read from PostgreSQL by the relay.
//!
//! One channel for the whole cluster: every node receives every event, and
//! keeps those some socket of its own listens to. Simple and enough for a
//! few nodes; the README's arithmetic says where it stops.
//!
//! Health is end to end: each node publishes a heartbeat every second and
//! counts itself subscribed only while its own heartbeats come back (a
//! subscription that wedges without closing, as after a failover, shows as
//! silence). When the subscription comes back, the relay reads every
//! stream's gap from PostgreSQL, since messages may have passed meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::relay::{Key, Relay, Unit};
use crate::hub::{Batch, Notes};
use crate::ids::ConversationId;
use crate::store::StoreError;

/// The channel every node publishes to and subscribes to.
const CHANNEL: &str = "parley:events";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// No own heartbeat back for this long: the subscription is lost.
const SILENCE: Duration = Duration::from_secs(3);
/// First wait before connecting again; doubles up to [`BACKOFF_MAX`].
const BACKOFF: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest wait for Redis in one operation.
const TIMEOUT: Duration = Duration::from_secs(2);

const HEARTBEAT: u8 = 0;
const CHAT: u8 = 1;
const NOTES: u8 = 2;

/// This node's end of the bus.
pub struct Bus {
    node: u64,
    out: mpsc::UnboundedSender<Bytes>,
    subscribed: Arc<AtomicBool>,
}

impl Bus {
    /// Starts the publisher and the subscriber; neither waits for Redis
    /// (the node reports itself unhealthy until its own heartbeat is back).
    pub fn start(client: redis::Client, node: u64, relay: Arc<Relay>) -> Arc<Bus> {
        let (out, rx) = mpsc::unbounded_channel();
        let subscribed = Arc::new(AtomicBool::new(false));
        let (heard, beats) = mpsc::unbounded_channel();
        tokio::spawn(publish(client.clone(), node, rx, beats));
        tokio::spawn(subscribe(client, node, relay, subscribed.clone(), heard));
        Arc::new(Bus {
            node,
            out,
            subscribed,
        })
    }

    /// Whether this node hears the bus now: if not, it takes no writes.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.subscribed.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(StoreError::Unreachable("the Redis subscription"))
        }
    }

    pub fn chat(&self, batch: &Batch) {
        let mut m = BytesMut::with_capacity(37 + batch.frames.len());
        m.put_u8(CHAT);
        m.put_u64_le(self.node);
        m.put_u64_le(batch.conversation.0);
        m.put_u64_le(batch.last_seq.0 - u64::from(batch.events));
        m.put_u64_le(batch.last_seq.0);
        m.put_u32_le(batch.events);
        m.extend_from_slice(&batch.frames);
        let _ = self.out.send(m.freeze());
    }

    pub fn notes(&self, notes: &Notes) {
        let user = notes.user.as_bytes();
        let mut m = BytesMut::with_capacity(27 + user.len() + notes.frames.len());
        m.put_u8(NOTES);
        m.put_u64_le(self.node);
        m.put_u64_le(notes.prev);
        m.put_u64_le(notes.last);
        m.put_u16_le(user.len() as u16);
        m.extend_from_slice(user);
        m.extend_from_slice(&notes.frames);
        let _ = self.out.send(m.freeze());
    }
}

/// Publishes what the node's groups produce, in order, everything queued
/// at once in one pipeline; and a heartbeat every second (at once when the
/// subscriber asks, after it subscribed again).
async fn publish(
    client: redis::Client,
    node: u64,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    mut beat_now: mpsc::UnboundedReceiver<()>,
) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    let mut queued: Vec<Bytes> = Vec::new();
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => queued.push(m),
                None => return,
            },
            _ = tick.tick() => queued.push(heartbeat(node)),
            Some(()) = beat_now.recv() => queued.push(heartbeat(node)),
        }
        while let Ok(m) = rx.try_recv() {
            queued.push(m);
        }
        if conn.is_none() {
            match tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection()).await {
                Ok(Ok(c)) => conn = Some(c),
                _ => {
                    // Dropped: the receivers read what they missed from
                    // PostgreSQL when they notice the gap (writes are
                    // refused meanwhile, as no heartbeat comes back).
                    queued.clear();
                    continue;
                }
            }
        }
        let mut pipe = redis::pipe();
        for m in queued.drain(..) {
            pipe.cmd("PUBLISH").arg(CHANNEL).arg(&m[..]).ignore();
        }
        let c = conn.as_mut().expect("connected above");
        match tokio::time::timeout(TIMEOUT, pipe.query_async::<()>(c)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!("publishing to Redis failed: {e}");
                conn = None;
            }
            Err(_) => {
                tracing::warn!("publishing to Redis timed out");
                conn = None;
            }
        }
    }
}

fn heartbeat(node: u64) -> Bytes {
    let mut m = BytesMut::with_capacity(9);
    m.put_u8(HEARTBEAT);
    m.put_u64_le(node);
    m.freeze()
}

/// Subscribes, and subscribes again whenever the subscription is lost or
/// falls silent; hands every other node's units to the relay.
async fn subscribe(
    client: redis::Client,
    node: u64,
    relay: Arc<Relay>,
    subscribed: Arc<AtomicBool>,
    beat_now: mpsc::UnboundedSender<()>,
) {
    let mut backoff = BACKOFF;
    loop {
        let connected = tokio::time::timeout(TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!("cannot subscribe to Redis: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => {
                tracing::warn!("subscribing to Redis timed out");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        // Healthy again only once our own heartbeat comes back through it.
        let _ = beat_now.send(());
        let mut stream = pubsub.into_on_message();
        let mut last_heard = Instant::now();
        loop {
            let next = tokio::time::timeout_at((last_heard + SILENCE).into(), stream.next()).await;
            let msg = match next {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    tracing::error!("the Redis subscription closed; writes are refused until it is back");
                    break;
                }
                Err(_) => {
                    tracing::error!(
                        "the Redis subscription fell silent; writes are refused until it is back"
                    );
                    break;
                }
            };
            let payload = msg.get_payload_bytes();
            match decode(payload) {
                Some((from, Message::Heartbeat)) if from == node => {
                    last_heard = Instant::now();
                    backoff = BACKOFF;
                    if !subscribed.swap(true, Ordering::Relaxed) {
                        tracing::info!("subscribed to Redis; reading whatever passed meanwhile");
                        relay.resync();
                    }
                }
                Some((from, Message::Unit(key, unit))) if from != node => relay.unit(key, unit),
                Some(_) => {}
                None => tracing::warn!(
                    "a bus message parley cannot read ({} bytes); ignored",
                    payload.len()
                ),
            }
        }
        subscribed.store(false, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Message {
    Heartbeat,
    Unit(Key, Unit),
}

/// Reads one bus message: `None` if it is not one of ours.
fn decode(payload: &[u8]) -> Option<(u64, Message)> {
    let mut b = payload;
    if b.remaining() < 9 {
        return None;
    }
    let kind = b.get_u8();
    let node = b.get_u64_le();
    let message = match kind {
        HEARTBEAT => Message::Heartbeat,
        CHAT => {
            if b.remaining() < 28 {
                return None;
            }
            let conversation = ConversationId(b.get_u64_le());
            let prev = b.get_u64_le();
            let last = b.get_u64_le();
            let events = b.get_u32_le();
            let unit = Unit {
                prev,
                last,
                events,
                frames: Bytes::copy_from_slice(b),
            };
            Message::Unit(Key::Chat(conversation), unit)
        }
        NOTES => {
            if b.remaining() < 18 {
                return None;
            }
            let prev = b.get_u64_le();
            let last = b.get_u64_le();
            let len = usize::from(b.get_u16_le());
            if b.remaining() < len {
                return None;
            }
            let user = std::str::from_utf8(&b[..len]).ok()?;
            let key = Key::User(Arc::from(user));
            b.advance(len);
            let unit = Unit {
                prev,
                last,
                events: 1,
                frames: Bytes::copy_from_slice(b),
            };
            Message::Unit(key, unit)
        }
        _ => return None,
    };
    Some((node, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_reads_back_as_it_was_written() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bus = Bus {
            node: 7,
            out: tx,
            subscribed: Arc::new(AtomicBool::new(true)),
        };
        bus.chat(&Batch {
            conversation: ConversationId(3),
            frames: Bytes::from_static(b"abc"),
            events: 2,
            last_seq: crate::ids::Seq(12),
        });
        bus.notes(&Notes {
            user: Arc::from("bob"),
            frames: Bytes::from_static(b"xyz"),
            prev: 4,
            last: 9,
        });
        match decode(&rx.try_recv().unwrap()) {
            Some((7, Message::Unit(Key::Chat(ConversationId(3)), u))) => {
                assert_eq!(
                    (u.prev, u.last, u.events, &u.frames[..]),
                    (10, 12, 2, &b"abc"[..])
                );
            }
            _ => panic!("not the chat unit"),
        }
        match decode(&rx.try_recv().unwrap()) {
            Some((7, Message::Unit(Key::User(user), u))) => {
                assert_eq!(&*user, "bob");
                assert_eq!((u.prev, u.last, &u.frames[..]), (4, 9, &b"xyz"[..]));
            }
            _ => panic!("not the notes unit"),
        }
        assert!(decode(b"\x01short").is_none());
    }
}
