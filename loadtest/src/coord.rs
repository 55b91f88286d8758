//! The coordinator: REST set-up, worker processes, the three scenarios and
//! their summaries.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::spawn_local;

use crate::net::{parse_urls, token, Http, Target};
use crate::proto::{Cmd, ConnectResult, Ev, Job, Report, SockSpec};
use crate::sys;
use crate::worker::new_hist;
use crate::{ChatArgs, Common, DensityArgs, FanoutArgs, SocketKind};

type Res<T> = Result<T, String>;

/// Worker processes (this binary re-executed with the hidden `worker`
/// subcommand), each with a line channel for its events.
struct Workers {
    kids: Vec<Child>,
    stdin: Vec<ChildStdin>,
    rx: Vec<mpsc::UnboundedReceiver<Ev>>,
}

impl Workers {
    async fn spawn(jobs: Vec<Job>) -> Res<Self> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut w = Workers {
            kids: Vec::new(),
            stdin: Vec::new(),
            rx: Vec::new(),
        };
        for job in jobs {
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("spawning worker: {e}"))?;
            let mut stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let line = serde_json::to_string(&job).expect("job serializes") + "\n";
            stdin
                .write_all(line.as_bytes())
                .await
                .map_err(|e| format!("writing job: {e}"))?;
            let (tx, rx) = mpsc::unbounded_channel();
            let id = job.worker;
            spawn_local(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    match serde_json::from_str::<Ev>(&l) {
                        Ok(ev) => {
                            if tx.send(ev).is_err() {
                                break;
                            }
                        }
                        Err(_) => eprintln!("worker {id}: {l}"),
                    }
                }
            });
            w.kids.push(child);
            w.stdin.push(stdin);
            w.rx.push(rx);
        }
        Ok(w)
    }

    fn len(&self) -> usize {
        self.kids.len()
    }

    async fn send(&mut self, i: usize, cmd: &Cmd) -> Res<()> {
        let line = serde_json::to_string(cmd).expect("command serializes") + "\n";
        self.stdin[i]
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("worker {i} is gone: {e}"))
    }

    async fn recv(&mut self, i: usize) -> Res<Ev> {
        match self.rx[i].recv().await {
            Some(Ev::Fatal { msg }) => Err(format!("worker {i}: {msg}")),
            Some(ev) => Ok(ev),
            None => Err(format!("worker {i} exited")),
        }
    }

    async fn ask(&mut self, i: usize, cmd: &Cmd) -> Res<Ev> {
        self.send(i, cmd).await?;
        self.recv(i).await
    }

    /// Send each worker its command, then collect one answer from each.
    async fn ask_all(&mut self, cmd: impl Fn(usize) -> Cmd) -> Res<Vec<Ev>> {
        for i in 0..self.len() {
            self.send(i, &cmd(i)).await?;
        }
        let mut out = Vec::new();
        for i in 0..self.len() {
            out.push(self.recv(i).await?);
        }
        Ok(out)
    }

    async fn status(&mut self) -> Res<(u64, u64, u64)> {
        let evs = self.ask_all(|_| Cmd::Status).await?;
        let (mut open, mut unique, mut last) = (0, 0, 0);
        for ev in evs {
            if let Ev::Status(s) = ev {
                open += s.open;
                unique += s.unique;
                last = last.max(s.last_recv_ns);
            }
        }
        Ok((open, unique, last))
    }

    async fn reports(&mut self) -> Res<Vec<Report>> {
        Ok(self
            .ask_all(|_| Cmd::Report)
            .await?
            .into_iter()
            .filter_map(|e| match e {
                Ev::Report(r) => Some(*r),
                _ => None,
            })
            .collect())
    }

    async fn shutdown(mut self) {
        for i in 0..self.len() {
            let _ = self.send(i, &Cmd::Exit).await;
        }
        for k in self.kids.iter_mut() {
            if tokio::time::timeout(Duration::from_secs(10), k.wait())
                .await
                .is_err()
            {
                let _ = k.start_kill();
            }
        }
    }
}

fn worker_count(c: &Common, sockets: usize) -> usize {
    if c.workers > 0 {
        return c.workers;
    }
    let need = sockets.div_ceil(c.max_per_worker.max(1) as usize);
    need.max(2)
}

fn run_tag() -> String {
    format!("plt{:x}", sys::mono_ns() % 0xff_ffff)
}

struct Ctx {
    common: Common,
    /// `--url`: one server, or a cluster's nodes.
    targets: Vec<Target>,
    tag: String,
    started: Instant,
}

impl Ctx {
    fn new(common: &Common) -> Res<Self> {
        Ok(Ctx {
            targets: parse_urls(&common.url)?,
            common: common.clone(),
            tag: run_tag(),
            started: Instant::now(),
        })
    }

    fn multi_pid(&self) -> bool {
        self.common.pid.len() > 1
    }

    /// The pids as the single-server output always showed them.
    fn pid_label(&self) -> String {
        match self.common.pid.as_slice() {
            [] => "None".into(),
            [p] => format!("Some({p})"),
            ps => format!("{ps:?}"),
        }
    }

    /// Index of the target for a socket `i` spread round-robin.
    fn spread(&self, i: usize) -> u32 {
        (i % self.targets.len()) as u32
    }

    fn job(&self, worker: usize, sockets: Vec<SockSpec>) -> Job {
        Job {
            worker,
            targets: self.targets.clone(),
            secret: self.common.secret.clone(),
            src_first: self.common.source_first,
            per_source: self.common.per_source,
            tag: self.tag.clone(),
            sockets,
            groups: Vec::new(),
            publisher: None,
            deadline_s: (self.common.timeout - self.started.elapsed().as_secs_f64()).max(1.0) + 5.0,
            connect_timeout_s: self.common.connect_timeout,
        }
    }

    /// RSS of each `--pid`'s tree; None without `--pid` or if one is gone.
    fn rss_per_pid(&self) -> Option<Vec<u64>> {
        if self.common.pid.is_empty() {
            return None;
        }
        sys::trees_rss_bytes(&self.common.pid)
    }

    /// CPU seconds of each `--pid`'s tree; None without `--pid` or if one is gone.
    fn cpu_per_pid(&self) -> Option<Vec<f64>> {
        if self.common.pid.is_empty() {
            return None;
        }
        sys::trees_cpu_secs(&self.common.pid)
    }

    /// With several `--url`s or `--pid`s: the extra JSON fields naming them
    /// (the single-server output is unchanged).
    fn add_cluster_fields(&self, v: &mut Value, sockets_per_url: &[u64]) {
        let Some(o) = v.as_object_mut() else { return };
        if self.targets.len() > 1 {
            let urls: Vec<&str> = self.common.url.split(',').map(str::trim).collect();
            o.insert("urls".into(), json!(urls));
            o.insert("sockets_per_url".into(), json!(sockets_per_url));
        }
        if self.multi_pid() {
            o.insert("pids".into(), json!(self.common.pid));
        }
    }

    /// CPU seconds of this tool: the coordinator and its live workers.
    fn client_cpu(&self) -> f64 {
        sys::tree_cpu_secs(std::process::id() as i32).unwrap_or(0.0)
    }

    /// `GET /healthz` must answer 200 on every target.
    async fn check_health(&self) -> Res<()> {
        let many = self.targets.len() > 1;
        for t in &self.targets {
            let mut http = Http::new(t.clone());
            let (on, name) = if many {
                (format!(" on {}", t.host), t.host.clone())
            } else {
                (String::new(), self.common.url.clone())
            };
            match http.request("GET", "/healthz", None, None).await {
                Ok((200, _)) => {}
                Ok((s, b)) => {
                    return Err(format!(
                        "GET /healthz{on} answered {s}: {}",
                        String::from_utf8_lossy(&b)
                    ))
                }
                Err(e) => return Err(format!("cannot reach {name}: {e}")),
            }
        }
        Ok(())
    }

    /// Create conversations over REST: (creator, other participants) each.
    /// The connections are spread round-robin over the targets.
    async fn create_conversations(&self, specs: Vec<(String, Vec<String>)>) -> Res<Vec<u64>> {
        let n = specs.len();
        let t0 = Instant::now();
        let specs = Rc::new(specs);
        let next = Rc::new(std::cell::Cell::new(0usize));
        let ids = Rc::new(std::cell::RefCell::new(vec![0u64; n]));
        let err: Rc<std::cell::RefCell<Option<String>>> = Rc::default();
        let mut handles = Vec::new();
        for k in 0..self.common.rest_concurrency.max(1) {
            let (specs, next, ids, err) = (specs.clone(), next.clone(), ids.clone(), err.clone());
            let target = self.targets[k % self.targets.len()].clone();
            let secret = self.common.secret.clone();
            handles.push(spawn_local(async move {
                let mut http = Http::new(target);
                let mut tokens: BTreeMap<String, String> = BTreeMap::new();
                loop {
                    let i = next.get();
                    if i >= specs.len() || err.borrow().is_some() {
                        break;
                    }
                    next.set(i + 1);
                    let (creator, others) = &specs[i];
                    let tok = tokens
                        .entry(creator.clone())
                        .or_insert_with(|| token(&secret, creator))
                        .clone();
                    let body = json!({"participants": others, "title": format!("load {i}")}).to_string();
                    match http
                        .request("POST", "/api/conversations/", Some(&tok), Some(&body))
                        .await
                    {
                        Ok((201, b)) | Ok((200, b)) => {
                            let id = serde_json::from_slice::<Value>(&b)
                                .ok()
                                .and_then(|v| v.get("id").and_then(Value::as_u64));
                            match id {
                                Some(id) => ids.borrow_mut()[i] = id,
                                None => {
                                    *err.borrow_mut() = Some(format!(
                                        "conversation answer without id: {}",
                                        String::from_utf8_lossy(&b)
                                    ))
                                }
                            }
                        }
                        Ok((s, b)) => {
                            *err.borrow_mut() = Some(format!(
                                "POST /api/conversations/ answered {s}: {}",
                                String::from_utf8_lossy(&b)
                            ))
                        }
                        Err(e) => *err.borrow_mut() = Some(format!("POST /api/conversations/: {e}")),
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
        if let Some(e) = err.borrow_mut().take() {
            return Err(e);
        }
        eprintln!("created {n} conversations in {:.1} s", t0.elapsed().as_secs_f64());
        let v = ids.borrow().clone();
        Ok(v)
    }
}

fn merge_connect(rs: &[ConnectResult]) -> ConnectResult {
    let mut out = ConnectResult::default();
    for r in rs {
        out.attempted += r.attempted;
        out.opened += r.opened;
        out.failed += r.failed;
        out.slow += r.slow;
        out.hs_p50_ms = out.hs_p50_ms.max(r.hs_p50_ms);
        out.hs_p99_ms = out.hs_p99_ms.max(r.hs_p99_ms);
        out.hs_max_ms = out.hs_max_ms.max(r.hs_max_ms);
        out.elapsed_s = out.elapsed_s.max(r.elapsed_s);
        for (k, v) in &r.errors {
            *out.errors.entry(k.clone()).or_default() += v;
        }
    }
    out
}

fn connect_results(evs: Vec<Ev>) -> Vec<ConnectResult> {
    evs.into_iter()
        .filter_map(|e| match e {
            Ev::Connected(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// Open every worker's sockets (all of them), `in_flight` handshakes at once
/// in total. Returns the merged result and the wall time.
/// Opens every worker's sockets, prints how it went, then lets the server
/// settle; fails (after stopping the workers) when not one socket opened.
async fn connect_and_settle(
    mut w: Workers,
    counts: &[u32],
    in_flight: u32,
    settle: f64,
) -> Res<(Workers, ConnectResult, f64)> {
    let (cr, wall) = connect_all(&mut w, counts, in_flight).await?;
    println!(
        "  connected {} of {} in {:.2} s ({:.0}/s), {} failed {:?}",
        cr.opened,
        cr.attempted,
        wall,
        cr.opened as f64 / wall.max(1e-9),
        cr.failed,
        cr.errors
    );
    if cr.opened == 0 {
        w.shutdown().await;
        return Err("no socket could be opened".into());
    }
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    Ok((w, cr, wall))
}

async fn connect_all(w: &mut Workers, counts: &[u32], in_flight: u32) -> Res<(ConnectResult, f64)> {
    let per = (in_flight as usize).div_ceil(w.len()).max(1) as u32;
    let t0 = Instant::now();
    let evs = w
        .ask_all(|i| Cmd::Connect {
            upto: counts[i],
            in_flight: per,
        })
        .await?;
    let wall = t0.elapsed().as_secs_f64();
    let r = merge_connect(&connect_results(evs));
    Ok((r, wall))
}

fn connect_json(r: &ConnectResult, wall: f64) -> Value {
    json!({
        "attempted": r.attempted,
        "opened": r.opened,
        "failed": r.failed,
        "errors": r.errors,
        "seconds": round3(wall),
        "rate_per_s": round1(if wall > 0.0 { r.opened as f64 / wall } else { 0.0 }),
        "slow_handshakes_over_1s": r.slow,
        "handshake_ms": {"p50_max_over_workers": r.hs_p50_ms, "p99_max_over_workers": r.hs_p99_ms, "max": r.hs_max_ms},
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Totals {
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
    last_recv_ns: u64,
}

fn merge_reports(rs: &[Report]) -> Totals {
    let mut t = Totals {
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
        last_recv_ns: 0,
    };
    for r in rs {
        for &(v, c) in &r.hist {
            let _ = t.hist.record_n(v, c);
        }
        t.received += r.received;
        t.unique += r.unique;
        t.dups += r.dups;
        t.out_of_order += r.out_of_order;
        t.foreign += r.foreign;
        t.server_errors += r.server_errors;
        t.parse_errors += r.parse_errors;
        t.open += r.open;
        t.closed += r.closed;
        t.last_recv_ns = t.last_recv_ns.max(r.last_recv_ns);
        for (k, v) in &r.close_reasons {
            *t.close_reasons.entry(k.clone()).or_default() += v;
        }
    }
    t
}

fn latency_json(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
    if h.is_empty() {
        return json!({"samples": 0});
    }
    json!({
        "samples": h.len(),
        "p50_ms": ms(0.5),
        "p90_ms": ms(0.9),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": round3(h.max() as f64 / 1000.0),
        "mean_ms": round3(h.mean() / 1000.0),
    })
}

fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    )
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Per-pid CPU seconds between two readings.
fn cpu_delta(a: &Option<Vec<f64>>, b: &Option<Vec<f64>>) -> Option<Vec<f64>> {
    match (a, b) {
        (Some(a), Some(b)) if a.len() == b.len() => Some(a.iter().zip(b).map(|(x, y)| y - x).collect()),
        _ => None,
    }
}

/// Sockets going to each target.
fn per_target(shares: &[Vec<SockSpec>], n: usize) -> Vec<u64> {
    let mut v = vec![0u64; n];
    for s in shares.iter().flatten() {
        v[s.target as usize % n] += 1;
    }
    v
}

/// `  server CPU per pid: 123 1.20 s, 456 0.80 s`
fn per_pid_line(pids: &[i32], cpu: &[f64], window: f64) -> String {
    let parts: Vec<String> = pids
        .iter()
        .zip(cpu)
        .map(|(p, c)| format!("{p} {c:.2} s ({:.2} cores)", c / window.max(1e-9)))
        .collect();
    format!("  server CPU per pid: {}", parts.join(", "))
}

/// Poll the workers until `expected` unique deliveries arrived or `drain`
/// seconds passed. Returns (unique, last receive ns, timed out).
async fn wait_deliveries(w: &mut Workers, expected: u64, drain: f64) -> Res<(u64, u64, bool)> {
    let end = Instant::now() + Duration::from_secs_f64(drain);
    loop {
        let (_, unique, last) = w.status().await?;
        if unique >= expected {
            return Ok((unique, last, false));
        }
        if Instant::now() >= end {
            return Ok((unique, last, true));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- density

pub async fn density(a: DensityArgs) -> Res<Value> {
    let ctx = Ctx::new(&a.common)?;
    let mut counts = a.counts.clone();
    counts.sort_unstable();
    counts.dedup();
    let max = *counts.last().ok_or("--counts is empty")? as usize;
    ctx.check_health().await?;
    let per = a.per_conversation.max(1) as usize;
    let users: Vec<String> = (0..max).map(|i| format!("ld{i}")).collect();
    let paths: Vec<String> = match a.kind {
        SocketKind::Chat => {
            let specs: Vec<(String, Vec<String>)> = users
                .chunks(per)
                .map(|c| (c[0].clone(), c[1..].to_vec()))
                .collect();
            let ids = ctx.create_conversations(specs).await?;
            (0..max).map(|i| format!("/ws/chat/{}/", ids[i / per])).collect()
        }
        SocketKind::Notifications => (0..max).map(|_| "/ws/notifications/".to_owned()).collect(),
    };
    let nw = worker_count(&a.common, max);
    let mut shares: Vec<Vec<SockSpec>> = vec![Vec::new(); nw];
    for i in 0..max {
        shares[i % nw].push(SockSpec {
            gid: i as u32,
            user: users[i].clone(),
            path: paths[i].clone(),
            target: ctx.spread(i),
        });
    }
    let spu = per_target(&shares, ctx.targets.len());
    let jobs = shares
        .into_iter()
        .enumerate()
        .map(|(i, s)| ctx.job(i, s))
        .collect();
    let mut w = Workers::spawn(jobs).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline_per_pid = ctx.rss_per_pid();
    let baseline = baseline_per_pid.as_ref().map(|v| v.iter().sum::<u64>());
    println!(
        "density: {} {:?} sockets via {nw} workers, {} handshakes in flight; server pid {}",
        max,
        a.kind,
        a.in_flight,
        ctx.pid_label()
    );
    if ctx.targets.len() > 1 {
        println!("  sockets per url: {spu:?} over {}", a.common.url);
    }
    if let Some(b) = baseline {
        println!("  baseline RSS {:.1} MiB", mib(b));
    }
    let mut points = Vec::new();
    let mut fit = Vec::new();
    let (mut total_opened, mut total_wall, mut total_slow) = (0u64, 0f64, 0u64);
    let mut client_connect_cpu = 0f64;
    for &c in &counts {
        let c = c as usize;
        let upto: Vec<u32> = (0..nw).map(|k| ((c + nw - 1 - k) / nw) as u32).collect();
        let lo0 = sys::listen_overflows();
        let cc0 = ctx.client_cpu();
        let (r, wall) = connect_all(&mut w, &upto, a.in_flight).await?;
        client_connect_cpu += ctx.client_cpu() - cc0;
        let lo1 = sys::listen_overflows();
        total_opened += r.opened;
        total_wall += wall;
        total_slow += r.slow;
        tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
        let (open, _, _) = w.status().await?;
        let rss_per_pid = ctx.rss_per_pid();
        let rss = rss_per_pid.as_ref().map(|v| v.iter().sum::<u64>());
        let overflow = match (lo0, lo1) {
            (Some(x), Some(y)) => Some(json!({"listen_overflows": y.0 - x.0, "listen_drops": y.1 - x.1})),
            _ => None,
        };
        println!(
            "  {c:>6} sockets: {open} open, step opened {} ({} failed) in {:.2} s = {:.0}/s, {} handshakes > 1 s{}; RSS {}",
            r.opened,
            r.failed,
            wall,
            r.opened as f64 / wall.max(1e-9),
            r.slow,
            overflow
                .as_ref()
                .map(|o| format!(", ListenOverflows +{}", o["listen_overflows"]))
                .unwrap_or_default(),
            rss.map(|b| format!("{:.1} MiB", mib(b)))
                .unwrap_or_else(|| "n/a".into())
        );
        if !r.errors.is_empty() {
            println!("         errors: {:?}", r.errors);
        }
        if let Some(b) = rss {
            fit.push((open as f64, b as f64));
        }
        let mut point = json!({
            "count": c,
            "open": open,
            "rss_bytes": rss,
            "connect": connect_json(&r, wall),
            "netstat": overflow,
        });
        if ctx.multi_pid() {
            point["rss_bytes_per_pid"] = json!(rss_per_pid);
        }
        points.push(point);
    }
    let slope = sys::slope(&fit);
    let idle_per_pid = if let (Some(c0), true) = (ctx.cpu_per_pid(), a.idle_secs > 0.0) {
        tokio::time::sleep(Duration::from_secs_f64(a.idle_secs)).await;
        cpu_delta(&Some(c0), &ctx.cpu_per_pid())
            .map(|d| d.iter().map(|c| c / a.idle_secs).collect::<Vec<f64>>())
    } else {
        None
    };
    let idle = idle_per_pid.as_ref().map(|v| v.iter().sum::<f64>());
    let (open_end, _, _) = w.status().await?;
    let rep = merge_reports(&w.reports().await?);
    w.shutdown().await;
    let rate = total_opened as f64 / total_wall.max(1e-9);
    if let Some(s) = slope {
        println!(
            "  RSS slope: {:.0} bytes per socket (least squares over {} points)",
            s,
            fit.len()
        );
    }
    if let Some(c) = idle {
        println!(
            "  idle server CPU at {max} sockets: {:.4} cores over {} s",
            c, a.idle_secs
        );
    }
    if let (Some(v), true) = (&idle_per_pid, ctx.multi_pid()) {
        println!("  idle server CPU per pid (cores): {:?} {v:.4?}", a.common.pid);
    }
    println!(
        "  connect rate {:.0} sockets/s overall (client CPU {:.2} s), {} handshakes > 1 s; {} still open at the end; closed by server {:?}",
        rate, client_connect_cpu, total_slow, open_end, rep.close_reasons
    );
    let round4 = |c: f64| (c * 10000.0).round() / 10000.0;
    let mut out = json!({
        "scenario": "density",
        "url": a.common.url,
        "kind": format!("{:?}", a.kind).to_lowercase(),
        "workers": nw,
        "in_flight": a.in_flight,
        "baseline_rss_bytes": baseline,
        "points": points,
        "rss_slope_bytes_per_socket": slope.map(|s| s.round()),
        "idle_cpu_cores": idle.map(round4),
        "idle_secs": a.idle_secs,
        "connect_rate_per_s": round1(rate),
        "client_cpu_s_connecting": round3(client_connect_cpu),
        "slow_handshakes_over_1s": total_slow,
        "open_at_end": open_end,
        "closed_by_server": rep.closed,
        "close_reasons": rep.close_reasons,
        "frames_received": rep.received,
    });
    ctx.add_cluster_fields(&mut out, &spu);
    if ctx.multi_pid() {
        out["baseline_rss_bytes_per_pid"] = json!(baseline_per_pid);
        out["idle_cpu_cores_per_pid"] =
            json!(idle_per_pid.map(|v| v.into_iter().map(round4).collect::<Vec<f64>>()));
    }
    Ok(out)
}

// ---------------------------------------------------------------- fan-out

pub async fn fanout(a: FanoutArgs) -> Res<Value> {
    let ctx = Ctx::new(&a.common)?;
    ctx.check_health().await?;
    let nusers = a.users.max(1) as usize;
    let subs = a.subscribers as usize;
    let users: Vec<String> = (0..nusers).map(|i| format!("fs{i}")).collect();
    let publisher = "fpub".to_owned();
    let ids = ctx
        .create_conversations(vec![(publisher.clone(), users.clone())])
        .await?;
    let path = format!("/ws/chat/{}/", ids[0]);
    let nw = worker_count(&a.common, subs + 1);
    let mut shares: Vec<Vec<SockSpec>> = vec![Vec::new(); nw];
    // The publisher on the first target, subscriber i on target i % n.
    shares[0].push(SockSpec {
        gid: 0,
        user: publisher,
        path: path.clone(),
        target: 0,
    });
    for i in 0..subs {
        shares[i % nw].push(SockSpec {
            gid: i as u32 + 1,
            user: users[i % nusers].clone(),
            path: path.clone(),
            target: ctx.spread(i),
        });
    }
    let counts: Vec<u32> = shares.iter().map(|s| s.len() as u32).collect();
    let spu = per_target(&shares, ctx.targets.len());
    let jobs = shares
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let mut j = ctx.job(i, s);
            if i == 0 {
                j.publisher = Some(0);
            }
            j
        })
        .collect();
    let w = Workers::spawn(jobs).await?;
    println!(
        "fanout: 1 conversation, {subs} subscriber sockets of {nusers} users + 1 publisher, {} messages, {} in flight, {nw} workers",
        a.messages, a.in_flight
    );
    if ctx.targets.len() > 1 {
        println!(
            "  sockets per url: {spu:?} over {} (publisher on the first)",
            a.common.url
        );
    }
    let (mut w, cr, wall) = connect_and_settle(w, &counts, a.connect_in_flight, a.settle).await?;
    let (open, _, _) = w.status().await?;
    let cpu0 = ctx.cpu_per_pid();
    let ccpu0 = ctx.client_cpu();
    let pubres = w
        .ask(
            0,
            &Cmd::Publish {
                count: a.messages,
                in_flight: a.in_flight,
                timeout_s: a.publish_timeout,
            },
        )
        .await?;
    let Ev::Published {
        sent,
        echoed,
        first_send_ns,
        elapsed_s,
        write_errors,
    } = pubres
    else {
        return Err("unexpected answer to publish".into());
    };
    let expected = sent * open;
    let (unique, last_ns, drained_out) = wait_deliveries(&mut w, expected, a.drain).await?;
    let cpu_per_pid = cpu_delta(&cpu0, &ctx.cpu_per_pid());
    let ccpu = ctx.client_cpu() - ccpu0;
    let rep = merge_reports(&w.reports().await?);
    w.shutdown().await;
    let span = (last_ns.saturating_sub(first_send_ns)) as f64 / 1e9;
    let cpu = cpu_per_pid.as_ref().map(|v| v.iter().sum::<f64>());
    let per_million = cpu.map(|c| c / (unique.max(1) as f64 / 1e6));
    let dps = unique as f64 / span.max(1e-9);
    let loss = expected.saturating_sub(unique);
    println!(
        "  published {sent} (echoed {echoed}) in {elapsed_s:.2} s; {unique} of {expected} deliveries in {span:.2} s = {dps:.0}/s{}",
        if drained_out { " (drain timed out)" } else { "" }
    );
    println!(
        "  loss {loss}, duplicates {}, out of order {}, server errors {}, sockets closed {} {:?}",
        rep.dups, rep.out_of_order, rep.server_errors, rep.closed, rep.close_reasons
    );
    println!("  latency publisher -> subscriber: {}", latency_line(&rep.hist));
    if let (Some(c), Some(p)) = (cpu, per_million) {
        println!(
            "  server CPU {:.2} s = {:.3} CPU-s per million deliveries ({:.2} cores)",
            c,
            p,
            c / span.max(1e-9)
        );
    }
    if let (Some(v), true) = (&cpu_per_pid, ctx.multi_pid()) {
        println!("{}", per_pid_line(&a.common.pid, v, span));
    }
    println!("  client CPU {ccpu:.2} s (all workers)");
    let mut out = json!({
        "scenario": "fanout",
        "url": a.common.url,
        "workers": nw,
        "subscribers": subs,
        "users": nusers,
        "sockets_open": open,
        "messages": a.messages,
        "in_flight": a.in_flight,
        "connect": connect_json(&cr, wall),
        "sent": sent,
        "echoed": echoed,
        "publish_seconds": round3(elapsed_s),
        "write_errors": write_errors,
        "expected_deliveries": expected,
        "deliveries": unique,
        "loss": loss,
        "duplicates": rep.dups,
        "out_of_order": rep.out_of_order,
        "server_errors": rep.server_errors,
        "foreign_frames": rep.foreign,
        "parse_errors": rep.parse_errors,
        "drain_timed_out": drained_out,
        "seconds": round3(span),
        "deliveries_per_s": dps.round(),
        "latency": latency_json(&rep.hist),
        "server_cpu_s": cpu.map(round3),
        "server_cpu_s_per_million_deliveries": per_million.map(round3),
        "server_cpu_cores": cpu.map(|c| round3(c / span.max(1e-9))),
        "client_cpu_s": round3(ccpu),
        "closed_by_server": rep.closed,
        "close_reasons": rep.close_reasons,
    });
    ctx.add_cluster_fields(&mut out, &spu);
    if ctx.multi_pid() {
        out["server_cpu_s_per_pid"] =
            json!(cpu_per_pid.map(|v| v.into_iter().map(round3).collect::<Vec<f64>>()));
    }
    Ok(out)
}

// ---------------------------------------------------------------- chat

pub async fn chat(a: ChatArgs) -> Res<Value> {
    let ctx = Ctx::new(&a.common)?;
    ctx.check_health().await?;
    let nconv = a.conversations as usize;
    let members = a.members.max(1) as usize;
    let name = |c: usize, m: usize| format!("cc{c}_{m}");
    let specs = (0..nconv)
        .map(|c| (name(c, 0), (1..members).map(|m| name(c, m)).collect()))
        .collect();
    let ids = ctx.create_conversations(specs).await?;
    let total = nconv * members;
    let nw = worker_count(&a.common, total);
    let mut shares: Vec<Vec<SockSpec>> = vec![Vec::new(); nw];
    let mut groups: Vec<Vec<Vec<u32>>> = vec![Vec::new(); nw];
    for (c, id) in ids.iter().enumerate() {
        let k = c % nw;
        let mut g = Vec::new();
        for m in 0..members {
            g.push(shares[k].len() as u32);
            shares[k].push(SockSpec {
                gid: (c * members + m) as u32,
                user: name(c, m),
                path: format!("/ws/chat/{id}/"),
                // Member m of conversation c on target (c + m) % n: every
                // conversation has members on different targets.
                target: ctx.spread(c + m),
            });
        }
        groups[k].push(g);
    }
    let counts: Vec<u32> = shares.iter().map(|s| s.len() as u32).collect();
    let spu = per_target(&shares, ctx.targets.len());
    let conv_share: Vec<usize> = groups.iter().map(Vec::len).collect();
    let jobs = shares
        .into_iter()
        .zip(groups)
        .enumerate()
        .map(|(i, (s, g))| {
            let mut j = ctx.job(i, s);
            j.groups = g;
            j
        })
        .collect();
    let w = Workers::spawn(jobs).await?;
    println!(
        "chat: {nconv} conversations x {members} members = {total} sockets, {} msg/s for {} s (open loop), {nw} workers",
        a.rate, a.duration
    );
    if ctx.targets.len() > 1 {
        println!("  sockets per url: {spu:?} over {}", a.common.url);
    }
    let (mut w, cr, wall) = connect_and_settle(w, &counts, a.connect_in_flight, a.settle).await?;
    let cpu0 = ctx.cpu_per_pid();
    let ccpu0 = ctx.client_cpu();
    let t0 = Instant::now();
    let evs = w
        .ask_all(|i| Cmd::Chat {
            rate: a.rate * conv_share[i] as f64 / nconv.max(1) as f64,
            duration_s: a.duration,
        })
        .await?;
    let (mut sent, mut expected, mut max_lag_us, mut lag_p99_us, mut write_errors, mut first_ns) =
        (0u64, 0u64, 0u64, 0u64, 0u64, u64::MAX);
    for ev in evs {
        if let Ev::ChatSent {
            sent: s,
            expected: e,
            first_send_ns,
            max_lag_us: l,
            lag_p99_us: l99,
            write_errors: we,
        } = ev
        {
            lag_p99_us = lag_p99_us.max(l99);
            sent += s;
            expected += e;
            max_lag_us = max_lag_us.max(l);
            write_errors += we;
            if s > 0 {
                first_ns = first_ns.min(first_send_ns);
            }
        }
    }
    let (unique, last_ns, drained_out) = wait_deliveries(&mut w, expected, a.drain).await?;
    let cpu_per_pid = cpu_delta(&cpu0, &ctx.cpu_per_pid());
    let ccpu = ctx.client_cpu() - ccpu0;
    let window = t0.elapsed().as_secs_f64();
    let rep = merge_reports(&w.reports().await?);
    w.shutdown().await;
    let cpu = cpu_per_pid.as_ref().map(|v| v.iter().sum::<f64>());
    let span = if first_ns == u64::MAX {
        0.0
    } else {
        last_ns.saturating_sub(first_ns) as f64 / 1e9
    };
    let loss = expected.saturating_sub(unique);
    println!(
        "  sent {sent} messages ({:.1}/s achieved, send lag behind schedule p99 {:.2} ms max {:.2} ms, {write_errors} write errors); {unique} of {expected} deliveries{}",
        sent as f64 / a.duration.max(1e-9),
        lag_p99_us as f64 / 1000.0,
        max_lag_us as f64 / 1000.0,
        if drained_out { " (drain timed out)" } else { "" }
    );
    println!(
        "  loss {loss}, duplicates {}, out of order {}, server errors {}, sockets closed {} {:?}",
        rep.dups, rep.out_of_order, rep.server_errors, rep.closed, rep.close_reasons
    );
    println!("  latency sender -> other members: {}", latency_line(&rep.hist));
    if let Some(c) = cpu {
        println!(
            "  server CPU {:.2} s over {:.1} s = {:.3} cores",
            c,
            window,
            c / window.max(1e-9)
        );
    }
    if let (Some(v), true) = (&cpu_per_pid, ctx.multi_pid()) {
        println!("{}", per_pid_line(&a.common.pid, v, window));
    }
    println!(
        "  client CPU {ccpu:.2} s = {:.3} cores (all workers)",
        ccpu / window.max(1e-9)
    );
    let mut out = json!({
        "scenario": "chat",
        "url": a.common.url,
        "workers": nw,
        "conversations": nconv,
        "members": members,
        "rate": a.rate,
        "duration_s": a.duration,
        "connect": connect_json(&cr, wall),
        "sent": sent,
        "achieved_rate": round1(sent as f64 / a.duration.max(1e-9)),
        "send_lag_ms": {"p99_max_over_workers": round3(lag_p99_us as f64 / 1000.0), "max": round3(max_lag_us as f64 / 1000.0)},
        "write_errors": write_errors,
        "expected_deliveries": expected,
        "deliveries": unique,
        "loss": loss,
        "duplicates": rep.dups,
        "out_of_order": rep.out_of_order,
        "server_errors": rep.server_errors,
        "foreign_frames": rep.foreign,
        "parse_errors": rep.parse_errors,
        "drain_timed_out": drained_out,
        "delivery_span_s": round3(span),
        "latency": latency_json(&rep.hist),
        "server_cpu_s": cpu.map(round3),
        "server_cpu_cores": cpu.map(|c| round3(c / window.max(1e-9))),
        "cpu_window_s": round3(window),
        "client_cpu_cores": round3(ccpu / window.max(1e-9)),
        "closed_by_server": rep.closed,
        "close_reasons": rep.close_reasons,
    });
    ctx.add_cluster_fields(&mut out, &spu);
    if ctx.multi_pid() {
        out["server_cpu_s_per_pid"] =
            json!(cpu_per_pid.map(|v| v.into_iter().map(round3).collect::<Vec<f64>>()));
    }
    Ok(out)
}
