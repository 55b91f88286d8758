//! The one place a cluster node hands chat events and notifications to its
//! sockets, in the order PostgreSQL committed them.
//!
//! Events reach a node two ways: its own sequencer's groups (at once) and
//! the other nodes' through the bus, in whatever order the two paths and
//! Redis happen to deliver them. Each [`Unit`] says where it starts (`prev`,
//! the position before its first event) and ends (`last`): a conversation's
//! event log position, or the user's notification id. A stream (one
//! conversation, or one user's notifications, that a socket of this node
//! listens to) delivers a unit only when `prev` is what it delivered last.
//! A unit that starts further on waits, and the gap is read from
//! PostgreSQL, where it is already committed (a later position is issued
//! only after the earlier one's transaction committed: the conversation's
//! row lock, the user's advisory lock); a unit already delivered is
//! dropped. So nothing is lost, doubled or reordered because it crossed
//! nodes, and a node whose bus subscription dropped catches up by reading
//! every stream after what it delivered ([`Relay::resync`]).
//!
//! Sockets join here too, as they join through the sequencer on one node: a
//! fresh socket joins at the stream's current position (read from
//! PostgreSQL when it is the stream's first socket here); a resuming one
//! gets the replay up to a position the stream is first brought to, and
//! joins at it: no gap, no duplicate, whichever node served it before.
//!
//! One task owns every stream (no locks); reads run as tasks of their own
//! and come back as messages, and while a stream reads it delivers nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use crate::hub::{Batch, Hub, Membership, Notes, Topic};
use crate::ids::{ConversationId, NotificationId, Seq};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol;
use crate::sequencer::notification_view;
use crate::store::{Store, StoreError};
use crate::wire::{self, OpCode, FELL_BEHIND};

/// Most events one gap fill reads. A node further behind than this closes
/// the stream's sockets (1013) and they resume, with a truncated replay.
const FILL_MAX: usize = 10_000;
/// A failed read (PostgreSQL did not answer) is tried again after this.
const RETRY: Duration = Duration::from_secs(1);
/// Rooms with at least this many sockets here make this node's sequencer
/// wait for their delivery (see [`Relay::chat`]).
const WAIT_FROM: usize = 256;
/// Most streams' units taken before delivering (bounds the wait of the
/// first behind a flood of others).
const MAX_COALESCED: usize = 256;
/// How often streams nobody here listens to any more are dropped.
const SWEEP: Duration = Duration::from_secs(10);

/// One stream: a conversation, or one user's notifications.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Chat(ConversationId),
    User(Arc<str>),
}

impl Key {
    fn of(topic: Topic, user: &Arc<str>) -> Key {
        match topic {
            Topic::Chat(c) => Key::Chat(c),
            Topic::Notifications => Key::User(user.clone()),
        }
    }

    fn topic(&self) -> Topic {
        match self {
            Key::Chat(c) => Topic::Chat(*c),
            Key::User(_) => Topic::Notifications,
        }
    }

    fn user(&self) -> &str {
        match self {
            Key::Chat(_) => "",
            Key::User(u) => u,
        }
    }
}

/// A run of a stream's events, positions `prev` (exclusive) to `last`,
/// framed.
#[derive(Debug)]
pub(super) struct Unit {
    pub prev: u64,
    pub last: u64,
    pub events: u32,
    pub frames: Bytes,
}

struct Join {
    topic: Topic,
    outbox: Arc<Outbox>,
    /// `Some`: a resume after this position (Part D).
    after: Option<u64>,
    reply: oneshot::Sender<Result<Membership, StoreError>>,
}

enum Input {
    Unit(Key, Unit),
    /// A unit of this node's sequencer, which waits until it is delivered.
    Local(Key, Unit, std::sync::mpsc::SyncSender<()>),
    Join(Join),
    Read(Key, Read, Result<Fetched, StoreError>),
    /// Try a failed fill again.
    Retry(Key),
    /// The bus may have lost messages: read every stream's gap.
    Resync,
    Sweep,
}

/// What a read was for.
enum Read {
    /// The stream's current position, for its first socket here.
    Head,
    /// Everything after what the stream delivered.
    Fill,
    /// A resuming socket's replay.
    Resume(Join),
}

/// What a read found: the frames of the positions in `(from, head]`.
struct Fetched {
    items: Vec<(u64, Bytes)>,
    from: u64,
    head: u64,
    /// A resume that missed more than `--max-replay-events`: the id the
    /// `resume.truncated` frame names.
    truncated_after: Option<u64>,
}

#[derive(Default)]
struct Stream {
    /// The last position handed to this node's sockets; `None` until known.
    delivered: Option<u64>,
    reading: bool,
    /// Units that start after `delivered`, by `prev`.
    pending: BTreeMap<u64, Unit>,
    joins: VecDeque<Join>,
    /// A fill was asked for while a read was in flight.
    behind: bool,
}

/// The handle: units from the sequencer and the bus, joins from upgrades.
pub struct Relay {
    tx: mpsc::UnboundedSender<Input>,
    hub: Arc<Hub>,
}

impl Relay {
    pub fn start(
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        max_replay: usize,
    ) -> Arc<Relay> {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub_handle = hub.clone();
        let task = Task {
            hub,
            store,
            metrics,
            max_replay,
            streams: HashMap::new(),
            tx: tx.clone(),
            waiting: Vec::new(),
            rt: tokio::runtime::Handle::current(),
        };
        // Its own thread, as the sequencer on one node: a fan-out to a big
        // room writes to thousands of sockets in one go, and the runtime's
        // threads stay free for the sockets and the database meanwhile.
        std::thread::Builder::new()
            .name("parley-relay".into())
            .spawn(move || task.run(rx))
            .expect("start the relay thread");
        let sweeper = tx.downgrade();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP).await;
                match sweeper.upgrade() {
                    Some(tx) if tx.send(Input::Sweep).is_ok() => {}
                    _ => return,
                }
            }
        });
        Arc::new(Relay { tx, hub: hub_handle })
    }

    /// A group's events of one conversation, from this node's sequencer.
    /// For a big room, returns once they are handed to this node's
    /// sockets: the sequencer waits, as it does on one node while it writes
    /// to the sockets itself, so that what arrives meanwhile makes its next
    /// group (one write per socket for many messages, here and on every
    /// node the group reaches).
    pub fn chat(&self, batch: &Batch) {
        let unit = Unit {
            prev: batch.last_seq.0 - u64::from(batch.events),
            last: batch.last_seq.0,
            events: batch.events,
            frames: batch.frames.clone(),
        };
        let key = Key::Chat(batch.conversation);
        if self.hub.listeners(batch.conversation) < WAIT_FROM {
            // A small room: nothing to gain from bigger groups, only latency.
            self.unit(key, unit);
            return;
        }
        let (done, delivered) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Input::Local(key, unit, done)).is_ok() {
            let _ = delivered.recv();
        }
    }

    /// A group's notifications of one user, from this node's sequencer.
    pub fn notes(&self, notes: &Notes) {
        let unit = Unit {
            prev: notes.prev,
            last: notes.last,
            events: 1,
            frames: notes.frames.clone(),
        };
        self.unit(Key::User(notes.user.clone()), unit);
    }

    pub(super) fn unit(&self, key: Key, unit: Unit) {
        let _ = self.tx.send(Input::Unit(key, unit));
    }

    pub fn resync(&self) {
        let _ = self.tx.send(Input::Resync);
    }

    /// Joins `outbox` to `topic`, after replaying what followed `after` if
    /// given: returns once the socket is in its stream.
    pub async fn join(
        &self,
        topic: Topic,
        outbox: Arc<Outbox>,
        after: Option<u64>,
    ) -> Result<Membership, StoreError> {
        let (reply, answer) = oneshot::channel();
        let join = Join {
            topic,
            outbox,
            after,
            reply,
        };
        self.tx.send(Input::Join(join)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn gone() -> StoreError {
    StoreError::io(std::io::Error::other("the relay stopped (shutting down)"))
}

struct Task {
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    max_replay: usize,
    streams: HashMap<Key, Stream>,
    tx: mpsc::UnboundedSender<Input>,
    /// Local units' senders, told once their units went out.
    waiting: Vec<std::sync::mpsc::SyncSender<()>>,
    /// Where reads and timers run.
    rt: tokio::runtime::Handle,
}

impl Task {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        // Streams that took units since they last delivered.
        let mut touched: Vec<Key> = Vec::new();
        while let Some(input) = rx.blocking_recv() {
            self.take(input, &mut touched);
            // Whatever else is waiting is taken first, so that a stream's
            // units that queued up meanwhile (a busy room, a burst from the
            // bus) reach each socket in one write.
            while touched.len() < MAX_COALESCED {
                match rx.try_recv() {
                    Ok(input) => self.take(input, &mut touched),
                    Err(_) => break,
                }
            }
            for key in touched.drain(..) {
                self.advance(&key);
            }
            // Delivered, or waiting behind a gap or a read: either way the
            // sequencer need not wait longer.
            for done in self.waiting.drain(..) {
                let _ = done.send(());
            }
        }
    }

    /// Takes one input; a unit only joins its stream's pending ones (the
    /// caller delivers them, see `run`).
    fn take(&mut self, input: Input, touched: &mut Vec<Key>) {
        match input {
            Input::Unit(key, unit) => {
                if self.on_unit(&key, unit) && !touched.contains(&key) {
                    touched.push(key);
                }
            }
            Input::Local(key, unit, done) => {
                self.waiting.push(done);
                if self.on_unit(&key, unit) && !touched.contains(&key) {
                    touched.push(key);
                }
            }
            Input::Join(join) => self.on_join(join),
            Input::Read(key, read, result) => self.on_read(key, read, result),
            Input::Retry(key) => {
                if self
                    .streams
                    .get(&key)
                    .is_some_and(|s| !s.reading && s.delivered.is_some())
                {
                    self.read(&key, Read::Fill);
                }
            }
            Input::Resync => {
                let keys: Vec<Key> = self.streams.keys().cloned().collect();
                for key in keys {
                    let s = self.streams.get_mut(&key).expect("listed");
                    if s.reading {
                        s.behind = true;
                    } else if s.delivered.is_some() {
                        self.read(&key, Read::Fill);
                    }
                }
            }
            Input::Sweep => {
                let hub = &self.hub;
                self.streams.retain(|key, s| {
                    s.reading || !s.joins.is_empty() || hub.is_listened(key.topic(), key.user())
                });
            }
        }
    }

    /// Adds a unit to its stream's pending ones; false if nobody here
    /// listens to the stream.
    fn on_unit(&mut self, key: &Key, unit: Unit) -> bool {
        let Some(stream) = self.streams.get_mut(key) else {
            return false;
        };
        if !stream.reading && stream.joins.is_empty() && !self.hub.is_listened(key.topic(), key.user()) {
            self.streams.remove(key);
            return false;
        }
        // Two units from the same position are the same events (a fill and
        // the bus): one is enough.
        stream.pending.entry(unit.prev).or_insert(unit);
        true
    }

    /// Delivers every pending unit that continues the stream, drops what
    /// it delivered already, and reads the gap if one remains.
    fn advance(&mut self, key: &Key) {
        let Some(stream) = self.streams.get_mut(key) else {
            return;
        };
        if stream.reading {
            return;
        }
        let Some(mut at) = stream.delivered else { return };
        let mut gap = false;
        // Every unit that continues the stream, in one buffer (one write
        // per socket); the first alone is not copied.
        let mut first: Option<Bytes> = None;
        let mut more = BytesMut::new();
        let mut events = 0;
        while let Some((prev, unit)) = stream.pending.pop_first() {
            if unit.last <= at {
                continue;
            }
            if prev != at {
                // Starts further on (or, never with whole groups, inside
                // what was delivered): what lies between is read instead.
                if prev > at {
                    stream.pending.insert(prev, unit);
                }
                gap = true;
                break;
            }
            match &first {
                None => first = Some(unit.frames),
                Some(f) => {
                    if more.is_empty() {
                        more.extend_from_slice(f);
                    }
                    more.extend_from_slice(&unit.frames);
                }
            }
            events += unit.events;
            at = unit.last;
        }
        if let Some(first) = first {
            let frames = if more.is_empty() { first } else { more.freeze() };
            deliver(&self.hub, &self.metrics, key, &frames, events);
        }
        stream.delivered = Some(at);
        if gap || stream.behind {
            self.read(key, Read::Fill);
        }
    }

    fn on_join(&mut self, join: Join) {
        let key = Key::of(join.topic, &join.outbox.user);
        // Units taken before the join go out before it (to the sockets
        // already there), as they would have without coalescing.
        self.advance(&key);
        self.streams.entry(key.clone()).or_default().joins.push_back(join);
        self.serve_joins(&key);
    }

    /// Serves waiting joins in order while the stream is not reading: a
    /// fresh one at once when the position is known, else after a read.
    fn serve_joins(&mut self, key: &Key) {
        loop {
            let Some(stream) = self.streams.get_mut(key) else {
                return;
            };
            if stream.reading {
                return;
            }
            let Some(join) = stream.joins.pop_front() else {
                return;
            };
            match (join.after, stream.delivered) {
                (None, Some(_)) => {
                    let m = self.hub.subscribe(join.topic, &join.outbox);
                    let _ = join.reply.send(Ok(m));
                }
                (None, None) => {
                    stream.joins.push_front(join);
                    self.read(key, Read::Head);
                    return;
                }
                (Some(_), _) => {
                    self.read(key, Read::Resume(join));
                    return;
                }
            }
        }
    }

    fn read(&mut self, key: &Key, read: Read) {
        let Some(stream) = self.streams.get_mut(key) else {
            return;
        };
        stream.reading = true;
        stream.behind = false;
        let from = match &read {
            Read::Head => None,
            Read::Fill => stream.delivered,
            Read::Resume(j) => j.after,
        };
        let max = match read {
            Read::Resume(_) => self.max_replay,
            _ => FILL_MAX,
        };
        let store = self.store.clone();
        let tx = self.tx.clone();
        let key = key.clone();
        self.rt.spawn(async move {
            let result = fetch(&*store, &key, from, max).await;
            let _ = tx.send(Input::Read(key, read, result));
        });
    }

    fn on_read(&mut self, key: Key, read: Read, result: Result<Fetched, StoreError>) {
        let Some(stream) = self.streams.get_mut(&key) else {
            return;
        };
        stream.reading = false;
        let fetched = match result {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("reading {key:?} from the store failed: {}", e.chain());
                match read {
                    Read::Resume(join) => {
                        let _ = join.reply.send(Err(e));
                    }
                    Read::Head => {
                        for join in stream.joins.drain(..) {
                            let _ = join.reply.send(Err(e.clone()));
                        }
                    }
                    Read::Fill => {
                        stream.behind = true;
                        let tx = self.tx.clone();
                        let key = key.clone();
                        self.rt.spawn(async move {
                            tokio::time::sleep(RETRY).await;
                            let _ = tx.send(Input::Retry(key));
                        });
                        return;
                    }
                }
                self.serve_joins(&key);
                return;
            }
        };
        match read {
            Read::Head => {
                stream.delivered.get_or_insert(fetched.head);
            }
            Read::Fill => {
                let at = stream.delivered.unwrap_or(fetched.from);
                if fetched.from > at {
                    // Further behind than a fill reads: its sockets resume.
                    tracing::warn!("{key:?} fell more than {FILL_MAX} events behind; its sockets resume");
                    self.hub.close_topic(key.topic(), key.user(), FELL_BEHIND);
                } else {
                    let (frames, events) = frames_after(&fetched.items, at);
                    if events > 0 {
                        deliver(&self.hub, &self.metrics, &key, &frames, events);
                    }
                }
                stream.delivered = Some(fetched.head.max(at));
            }
            Read::Resume(join) => {
                // The stream's sockets first get what the read saw, so that
                // the joiner can join where the replay ends.
                match stream.delivered {
                    None => stream.delivered = Some(fetched.head),
                    Some(at) if at < fetched.head => {
                        if fetched.from > at {
                            // The replay's window starts past the stream: fill
                            // the stream first, then serve this join again.
                            stream.joins.push_front(join);
                            self.read(&key, Read::Fill);
                            return;
                        }
                        let (frames, events) = frames_after(&fetched.items, at);
                        deliver(&self.hub, &self.metrics, &key, &frames, events);
                        stream.delivered = Some(fetched.head);
                    }
                    Some(_) => {}
                }
                let mut replay = BytesMut::new();
                if let Some(after) = fetched.truncated_after {
                    let mut json = Vec::new();
                    protocol::encode_truncated(&mut json, after);
                    wire::put_frame(&mut replay, OpCode::Text, &json);
                }
                for (_, frame) in &fetched.items {
                    replay.extend_from_slice(frame);
                }
                if !replay.is_empty() {
                    join.outbox.push_unbounded(replay.freeze());
                }
                let m = self.hub.subscribe(join.topic, &join.outbox);
                let _ = join.reply.send(Ok(m));
            }
        }
        self.advance(&key);
        self.serve_joins(&key);
    }
}

/// The frames of the positions after `at`, in one buffer.
fn frames_after(items: &[(u64, Bytes)], at: u64) -> (Bytes, u32) {
    let mut out = BytesMut::new();
    let mut n = 0;
    for (_, frame) in items.iter().filter(|(pos, _)| *pos > at) {
        out.extend_from_slice(frame);
        n += 1;
    }
    (out.freeze(), n)
}

fn deliver(hub: &Hub, metrics: &Metrics, key: &Key, frames: &Bytes, events: u32) {
    let sockets = match key {
        Key::Chat(c) => hub.publish_conversation(*c, frames),
        Key::User(u) => hub.publish_notes(u, frames),
    };
    metrics.deliveries.inc_by(sockets as u64 * u64::from(events));
}

/// Reads a stream from the store: its head (`from` is `None`), or what
/// follows `from`, framed.
async fn fetch(store: &dyn Store, key: &Key, from: Option<u64>, max: usize) -> Result<Fetched, StoreError> {
    let Some(after) = from else {
        let head = match key {
            Key::Chat(c) => store.last_seq(*c).await?.0,
            Key::User(u) => store.last_notification(u).await?.0,
        };
        return Ok(Fetched {
            items: Vec::new(),
            from: head,
            head,
            truncated_after: None,
        });
    };
    let mut json = Vec::new();
    let frame = |json: &[u8]| {
        let mut f = BytesMut::with_capacity(json.len() + 10);
        wire::put_frame(&mut f, OpCode::Text, json);
        f.freeze()
    };
    let (items, truncated_after): (Vec<(u64, Bytes)>, _) = match key {
        Key::Chat(c) => {
            let replay = store.events_after(*c, Seq(after), max).await?;
            let items = replay
                .items
                .iter()
                .map(|e| (e.seq.0, frame(&e.payload)))
                .collect();
            (items, replay.truncated_after)
        }
        Key::User(u) => {
            let replay = store.notifications_after(u, NotificationId(after), max).await?;
            let items = replay
                .items
                .iter()
                .map(|n| {
                    json.clear();
                    protocol::encode_notification(&mut json, &notification_view(n));
                    (n.id.0, frame(&json))
                })
                .collect();
            (items, replay.truncated_after)
        }
    };
    // A truncated read covers what follows the newest position it left
    // out: just before its first event, or the notification it names.
    let from = match (key, truncated_after, items.first()) {
        (Key::Chat(_), Some(_), Some((first, _))) => first - 1,
        (Key::User(_), Some(newest_left_out), _) => newest_left_out,
        _ => after,
    };
    let head = items.last().map_or(after, |(pos, _)| *pos);
    Ok(Fetched {
        items,
        from,
        head,
        truncated_after,
    })
}
