//! A worker process: holds a share of the sockets on one single-threaded
//! tokio runtime, sends and checks messages, answers the coordinator.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::{spawn_local, LocalSet};

use crate::net::{open_ws, token, WsRead, WsWrite};
use crate::proto::{Cmd, ConnectResult, Ev, Job, Report, StatusResult};
use crate::sys::mono_ns;

/// Latency histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// What one receiving socket has seen from one sender.
struct Track {
    sender: u32,
    max: i64,
    bits: Vec<u64>,
}

#[derive(Default)]
struct Sock {
    tracks: Vec<Track>,
}

struct State {
    tag: String,
    hist: Histogram<u64>,
    received: u64,
    unique: u64,
    dups: u64,
    out_of_order: u64,
    foreign: u64,
    server_errors: u64,
    parse_errors: u64,
    open: u64,
    closed: u64,
    close_reasons: BTreeMap<String, u64>,
    first_recv_ns: u64,
    last_recv_ns: u64,
    socks: Vec<Sock>,
    echo: Option<Rc<Semaphore>>,
    echoed: u64,
    publisher: Option<u32>,
}

impl State {
    /// Fresh counters for `sockets` sockets.
    fn new(tag: String, sockets: usize, publisher: Option<u32>) -> State {
        State {
            tag,
            hist: new_hist(),
            received: 0,
            unique: 0,
            dups: 0,
            out_of_order: 0,
            foreign: 0,
            server_errors: 0,
            parse_errors: 0,
            open: 0,
            closed: 0,
            close_reasons: BTreeMap::new(),
            first_recv_ns: 0,
            last_recv_ns: 0,
            socks: (0..sockets).map(|_| Sock::default()).collect(),
            echo: None,
            echoed: 0,
            publisher,
        }
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
}

/// Largest sequence number accepted (bounds the per-sender bitmaps).
const MAX_SEQ: u64 = 1 << 26;

impl State {
    fn on_text(&mut self, local: u32, own_gid: u32, payload: &[u8], now: u64) {
        self.received += 1;
        let msg: Incoming = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(_) => {
                self.parse_errors += 1;
                return;
            }
        };
        if msg.ty.as_deref() == Some("error") {
            self.server_errors += 1;
            return;
        }
        let Some(content) = msg.content else {
            self.foreign += 1;
            return;
        };
        let mut it = content.split_ascii_whitespace();
        if it.next() != Some(self.tag.as_str()) {
            self.foreign += 1;
            return;
        }
        let parsed = (|| {
            let sender: u32 = it.next()?.parse().ok()?;
            let seq: u64 = it.next()?.parse().ok()?;
            let sent: u64 = it.next()?.parse().ok()?;
            Some((sender, seq, sent))
        })();
        let Some((sender, seq, sent)) = parsed else {
            self.parse_errors += 1;
            return;
        };
        if seq >= MAX_SEQ {
            self.parse_errors += 1;
            return;
        }
        if self.first_recv_ns == 0 {
            self.first_recv_ns = now;
        }
        self.last_recv_ns = now;
        let sock = &mut self.socks[local as usize];
        let pos = match sock.tracks.iter().position(|t| t.sender == sender) {
            Some(p) => p,
            None => {
                sock.tracks.push(Track {
                    sender,
                    max: -1,
                    bits: Vec::new(),
                });
                sock.tracks.len() - 1
            }
        };
        let t = &mut sock.tracks[pos];
        let word = (seq / 64) as usize;
        if t.bits.len() <= word {
            t.bits.resize(word + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        if t.bits[word] & bit != 0 {
            self.dups += 1;
            return;
        }
        t.bits[word] |= bit;
        self.unique += 1;
        if (seq as i64) < t.max {
            self.out_of_order += 1;
        } else {
            t.max = seq as i64;
        }
        if sender == own_gid {
            if self.publisher == Some(local) {
                self.echoed += 1;
                if let Some(s) = &self.echo {
                    s.add_permits(1);
                }
            }
        } else {
            let us = (now.saturating_sub(sent) / 1000).max(1);
            self.hist.saturating_record(us);
        }
    }
}

type Writer = Rc<Mutex<WsWrite>>;

struct Worker {
    job: Rc<Job>,
    st: Rc<RefCell<State>>,
    writers: Rc<RefCell<Vec<Option<Writer>>>>,
    next_local: u32,
    tokens: Rc<RefCell<HashMap<String, Rc<str>>>>,
}

fn short_reason(e: &fastwebsockets::WebSocketError) -> String {
    let s = e.to_string();
    let s = s.split(':').next().unwrap_or("").trim().to_owned();
    if s.is_empty() {
        "error".into()
    } else {
        s
    }
}

/// Reads one socket until it closes; `at` is appended to the close reason.
async fn reader(local: u32, gid: u32, mut rd: WsRead, wr: Writer, st: Rc<RefCell<State>>, at: String) {
    let mut send_fn = |f: Frame<'static>| {
        let w = wr.clone();
        async move { w.lock().await.write_frame(f).await }
    };
    let reason = loop {
        match rd.read_frame(&mut send_fn).await {
            Ok(frame) => match frame.opcode {
                OpCode::Text if frame.fin => {
                    let now = mono_ns();
                    st.borrow_mut().on_text(local, gid, &frame.payload, now);
                }
                OpCode::Close => {
                    let code = if frame.payload.len() >= 2 {
                        u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                    } else {
                        1005
                    };
                    break format!("close {code}");
                }
                OpCode::Ping | OpCode::Pong => {}
                _ => {
                    let mut s = st.borrow_mut();
                    s.received += 1;
                    s.foreign += 1;
                }
            },
            Err(e) => break short_reason(&e),
        }
    };
    let mut s = st.borrow_mut();
    s.open = s.open.saturating_sub(1);
    s.closed += 1;
    *s.close_reasons.entry(reason + &at).or_default() += 1;
}

fn chat_frame(tag: &str, gid: u32, seq: u64, t: u64) -> Frame<'static> {
    let text = format!(r#"{{"type":"chat_message","message":"{tag} {gid} {seq} {t}"}}"#);
    Frame::text(Payload::Owned(text.into_bytes()))
}

impl Worker {
    async fn connect(&mut self, upto: u32, in_flight: u32) -> ConnectResult {
        let upto = upto.min(self.job.sockets.len() as u32);
        let next = Rc::new(Cell::new(self.next_local));
        self.next_local = self.next_local.max(upto);
        let res = Rc::new(RefCell::new(ConnectResult::default()));
        let hs = Rc::new(RefCell::new(new_hist()));
        let t0 = Instant::now();
        let limit = Duration::from_secs_f64(self.job.connect_timeout_s.max(0.1));
        let mut handles = Vec::new();
        for _ in 0..in_flight.max(1) {
            let (next, res, hs) = (next.clone(), res.clone(), hs.clone());
            let (job, st, writers, tokens) = (
                self.job.clone(),
                self.st.clone(),
                self.writers.clone(),
                self.tokens.clone(),
            );
            handles.push(spawn_local(async move {
                loop {
                    let i = next.get();
                    if i >= upto {
                        break;
                    }
                    next.set(i + 1);
                    let spec = &job.sockets[i as usize];
                    let jwt = {
                        let mut tk = tokens.borrow_mut();
                        tk.entry(spec.user.clone())
                            .or_insert_with(|| token(&job.secret, &spec.user).into())
                            .clone()
                    };
                    let start = Instant::now();
                    let target = &job.targets[spec.target as usize % job.targets.len()];
                    let r = open_ws(
                        target,
                        job.source_of(spec.gid),
                        &spec.path,
                        &jwt,
                        spec.gid as u64,
                        limit,
                    )
                    .await;
                    // With several servers, failures and closes name the node.
                    let at = if job.targets.len() > 1 {
                        format!(" @{}", target.host)
                    } else {
                        String::new()
                    };
                    let ms = start.elapsed().as_secs_f64() * 1000.0;
                    let mut r2 = res.borrow_mut();
                    r2.attempted += 1;
                    if ms > 1000.0 {
                        r2.slow += 1;
                    }
                    match r {
                        Ok((rd, wr)) => {
                            r2.opened += 1;
                            hs.borrow_mut().saturating_record((ms * 1000.0) as u64);
                            let wr = Rc::new(Mutex::new(wr));
                            writers.borrow_mut()[i as usize] = Some(wr.clone());
                            st.borrow_mut().open += 1;
                            spawn_local(reader(i, spec.gid, rd, wr, st.clone(), at));
                        }
                        Err(e) => {
                            r2.failed += 1;
                            *r2.errors.entry(e.0 + &at).or_default() += 1;
                        }
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
        let mut r = res.borrow().clone();
        let h = hs.borrow();
        if !h.is_empty() {
            r.hs_p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
            r.hs_p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
            r.hs_max_ms = h.max() as f64 / 1000.0;
        }
        r.elapsed_s = t0.elapsed().as_secs_f64();
        r
    }

    async fn publish(&mut self, count: u32, in_flight: u32, timeout_s: f64) -> Ev {
        let Some(p) = self.job.publisher else {
            return Ev::Fatal {
                msg: "this worker has no publisher".into(),
            };
        };
        let Some(w) = self.writers.borrow()[p as usize].clone() else {
            return Ev::Fatal {
                msg: "publisher socket is not open".into(),
            };
        };
        let in_flight = in_flight.max(1);
        let sem = Rc::new(Semaphore::new(in_flight as usize));
        {
            let mut s = self.st.borrow_mut();
            s.echo = Some(sem.clone());
            s.echoed = 0;
        }
        let gid = self.job.sockets[p as usize].gid;
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout_s);
        let (mut sent, mut write_errors, mut first_send_ns) = (0u64, 0u64, 0u64);
        for seq in 0..count as u64 {
            match tokio::time::timeout_at(deadline, sem.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                _ => break,
            }
            let now = mono_ns();
            if seq == 0 {
                first_send_ns = now;
            }
            let r = w
                .lock()
                .await
                .write_frame(chat_frame(&self.job.tag, gid, seq, now))
                .await;
            if r.is_err() {
                write_errors += 1;
                break;
            }
            sent += 1;
        }
        // Wait until every message has come back to the publisher.
        if let Ok(Ok(p)) = tokio::time::timeout_at(deadline, sem.acquire_many(in_flight)).await {
            p.forget();
        }
        let elapsed_s = t0.elapsed().as_secs_f64();
        let mut s = self.st.borrow_mut();
        s.echo = None;
        Ev::Published {
            sent,
            echoed: s.echoed,
            first_send_ns,
            elapsed_s,
            write_errors,
        }
    }

    async fn chat(&mut self, rate: f64, duration_s: f64) -> Ev {
        let groups = &self.job.groups;
        let ng = groups.len() as u64;
        let total = (rate * duration_s).round().max(0.0) as u64;
        let (mut sent, mut first_send_ns) = (0u64, 0u64);
        let write_errors = Rc::new(Cell::new(0u64));
        let lag = Rc::new(RefCell::new(new_hist()));
        let mut sent_per_group = vec![0u64; groups.len()];
        if ng == 0 || rate <= 0.0 {
            return Ev::ChatSent {
                sent: 0,
                expected: 0,
                first_send_ns: 0,
                lag_p99_us: 0,
                max_lag_us: 0,
                write_errors: 0,
            };
        }
        let mut seqs = vec![0u64; self.job.sockets.len()];
        let interval = 1e9 / rate;
        let t0 = mono_ns() + 20_000_000;
        for k in 0..total {
            let sched = t0 + (k as f64 * interval) as u64;
            let now = mono_ns();
            if sched > now {
                tokio::time::sleep(Duration::from_nanos(sched - now)).await;
            }
            let g = (k % ng) as usize;
            let members = &groups[g];
            if members.is_empty() {
                continue;
            }
            let m = members[((k / ng) % members.len() as u64) as usize] as usize;
            let Some(w) = self.writers.borrow()[m].clone() else {
                continue;
            };
            let seq = seqs[m];
            seqs[m] += 1;
            let gid = self.job.sockets[m].gid;
            let (we, lag, tag) = (write_errors.clone(), lag.clone(), self.job.tag.clone());
            spawn_local(async move {
                let mut w = w.lock().await;
                // The text carries the moment of the write; how late that
                // is against the schedule is reported as send lag.
                let t = mono_ns();
                lag.borrow_mut()
                    .saturating_record((t.saturating_sub(sched) / 1000).max(1));
                if w.write_frame(chat_frame(&tag, gid, seq, t)).await.is_err() {
                    we.set(we.get() + 1);
                }
            });
            if sent == 0 {
                first_send_ns = sched;
            }
            sent += 1;
            sent_per_group[g] += 1;
        }
        // Let the spawned writes run.
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if Rc::strong_count(&lag) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lag = lag.borrow();
        let writers = self.writers.borrow();
        let expected = groups
            .iter()
            .zip(&sent_per_group)
            .map(|(members, n)| {
                let open = members.iter().filter(|&&m| writers[m as usize].is_some()).count() as u64;
                n * open
            })
            .sum();
        Ev::ChatSent {
            sent,
            expected,
            first_send_ns,
            lag_p99_us: lag.value_at_quantile(0.99),
            max_lag_us: lag.max(),
            write_errors: write_errors.get(),
        }
    }

    fn status(&self) -> StatusResult {
        let s = self.st.borrow();
        StatusResult {
            open: s.open,
            received: s.received,
            unique: s.unique,
            last_recv_ns: s.last_recv_ns,
        }
    }

    fn report(&self) -> Report {
        let s = self.st.borrow();
        Report {
            hist: s
                .hist
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
            received: s.received,
            unique: s.unique,
            dups: s.dups,
            out_of_order: s.out_of_order,
            foreign: s.foreign,
            server_errors: s.server_errors,
            parse_errors: s.parse_errors,
            open: s.open,
            closed: s.closed,
            close_reasons: s.close_reasons.clone(),
            first_recv_ns: s.first_recv_ns,
            last_recv_ns: s.last_recv_ns,
        }
    }
}

fn emit(ev: &Ev) {
    use std::io::Write;
    let line = serde_json::to_string(ev).expect("events serialize");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Entry point of `parley-load worker`.
pub fn main() {
    crate::sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    LocalSet::new().block_on(&rt, run());
}

async fn run() {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let job: Job = match lines.next_line().await {
        Ok(Some(l)) => match serde_json::from_str(&l) {
            Ok(j) => j,
            Err(e) => {
                emit(&Ev::Fatal {
                    msg: format!("bad job: {e}"),
                });
                return;
            }
        },
        _ => return,
    };
    if job.targets.is_empty() {
        emit(&Ev::Fatal {
            msg: "bad job: no targets".into(),
        });
        return;
    }
    let deadline = Duration::from_secs_f64(job.deadline_s.max(1.0));
    let wid = job.worker;
    spawn_local(async move {
        tokio::time::sleep(deadline).await;
        eprintln!("worker {wid}: deadline reached, exiting");
        std::process::exit(3);
    });
    let n = job.sockets.len();
    let st = State::new(job.tag.clone(), n, job.publisher);
    let mut w = Worker {
        job: Rc::new(job),
        st: Rc::new(RefCell::new(st)),
        writers: Rc::new(RefCell::new(vec![None; n])),
        next_local: 0,
        tokens: Rc::new(RefCell::new(HashMap::new())),
    };
    // Commands are handled one at a time; the sockets' reader tasks run
    // meanwhile on the same thread.
    while let Ok(Some(line)) = lines.next_line().await {
        let cmd: Cmd = match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                emit(&Ev::Fatal {
                    msg: format!("bad command: {e}"),
                });
                continue;
            }
        };
        let ev = match cmd {
            Cmd::Connect { upto, in_flight } => Ev::Connected(w.connect(upto, in_flight).await),
            Cmd::Publish {
                count,
                in_flight,
                timeout_s,
            } => w.publish(count, in_flight, timeout_s).await,
            Cmd::Chat { rate, duration_s } => w.chat(rate, duration_s).await,
            Cmd::Status => Ev::Status(w.status()),
            Cmd::Report => Ev::Report(Box::new(w.report())),
            Cmd::Exit => break,
        };
        emit(&ev);
    }
    // Exiting closes every socket at once.
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new("T".into(), 2, None)
    }

    fn msg(sender: u32, seq: u64, t: u64) -> Vec<u8> {
        format!(
            r#"{{"id":1,"sender":"u","content":"T {sender} {seq} {t}","timestamp":"2026-11-25T00:00:00Z"}}"#
        )
        .into_bytes()
    }

    #[test]
    fn counts_loss_duplicates_and_order() {
        let mut s = state();
        s.on_text(0, 9, &msg(5, 0, 1_000), 2_000_000);
        s.on_text(0, 9, &msg(5, 2, 1_000), 2_000_000);
        s.on_text(0, 9, &msg(5, 1, 1_000), 2_000_000); // late
        s.on_text(0, 9, &msg(5, 1, 1_000), 2_000_000); // dup
        s.on_text(1, 9, &msg(5, 0, 1_000), 2_000_000); // other socket
        s.on_text(0, 9, br#"{"type":"error","code":"x"}"#, 1);
        s.on_text(0, 9, br#"{"id":1,"content":"other 1 2 3"}"#, 1);
        s.on_text(0, 9, b"not json", 1);
        assert_eq!(s.unique, 4);
        assert_eq!(s.dups, 1);
        assert_eq!(s.out_of_order, 1);
        assert_eq!(s.server_errors, 1);
        assert_eq!(s.foreign, 1);
        assert_eq!(s.parse_errors, 1);
        assert_eq!(s.hist.len(), 4);
        assert_eq!(s.hist.max(), s.hist.highest_equivalent(1999));
    }

    #[test]
    fn own_messages_are_not_latency_samples() {
        let mut s = state();
        s.on_text(0, 5, &msg(5, 0, 1_000), 2_000_000);
        assert_eq!(s.unique, 1);
        assert_eq!(s.hist.len(), 0);
    }
}
