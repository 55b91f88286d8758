//! Real PostgreSQL and Redis servers for integration tests.
//!
//! Each `start()` gives a private instance: its own temp dir (data, unix
//! socket, log) and its own free port on 127.0.0.1, so tests run in parallel
//! without sharing state, and a test may `stop()` and `start_again()` a server
//! to see what the code under test does while it is gone and once it is back.
//! They are real servers rather than fakes because what these tests check
//! (reconnects, durability, connection limits) is exactly where fakes differ.
//!
//! Include it with `#[path = "../support/engines.rs"] mod engines;` (or
//! `"support/engines.rs"` from a top-level test file).
//!
//! Needs Debian-style installs: PostgreSQL under `/usr/lib/postgresql/<v>/bin`
//! (the highest version is used) and `redis-server` on `PATH` (`.ci/run`
//! installs both). Any failure to start panics with the tail of the server's
//! log, which lives in the instance's temp dir.
//!
//! Servers never outlive the test process: `Drop` kills and reaps them, and
//! each server child also gets `PR_SET_PDEATHSIG(SIGKILL)`, so a test that
//! aborts, or a process killed by a timeout, leaves no server behind (its
//! temp dir does stay then: ~40 MB per Postgres in `$TMPDIR/parley-pg-*`).

// Every test crate that includes this file uses a different part of it.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to accept connections after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean stop (Postgres: fast shutdown, with its checkpoint) may take
/// before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `Drop` waits after its first signal before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long `initdb` and `createdb` may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts that fail because the port was taken meanwhile are retried this many times.
const BIND_ATTEMPTS: usize = 5;
/// Lines of the server log quoted in a panic message.
const LOG_TAIL_LINES: usize = 60;

/// A private PostgreSQL server (trust auth, superuser `parley`), killed and
/// its data dir removed on drop.
pub struct Postgres {
    bin: PathBuf,
    /// Holds `data/` (the cluster), the unix socket and `postgres.log`.
    dir: TempDir,
    log: PathBuf,
    /// Who initdb and postgres run as: `Some((uid, gid))` of the `postgres`
    /// user when we are root, since both refuse to run as root.
    owner: Option<(u32, u32)>,
    port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// initdb (trust auth, superuser `parley`, UTF8, C locale so sorting does
    /// not depend on the machine, `--no-sync` since a lost temp cluster costs
    /// nothing) into a temp dir, then starts `postgres` as a child process on
    /// a free port, listening on 127.0.0.1 and on a unix socket in the temp
    /// dir. The server itself keeps `fsync=on` and `synchronous_commit=on`,
    /// so durability tests see production behaviour; `max_connections=400`
    /// leaves room for pools of many parley instances in one test. Returns
    /// once `pg_isready` says it accepts connections (at most ~30 s).
    pub fn start() -> Postgres {
        let bin = pg_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("parley-pg-")
            .tempdir()
            .expect("engines: create a temp dir for postgres");
        let owner = postgres_owner();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("engines: chown the postgres temp dir to the postgres user");
        }
        let log = dir.path().join("postgres.log");
        File::create(&log).expect("engines: create postgres.log");

        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(dir.path().join("data"));
        initdb.args(["-U", "parley", "--auth=trust", "-E", "UTF8"]);
        initdb.args(["--no-locale", "--no-sync"]);
        run_as(&mut initdb, owner);
        run_logged(initdb, &log, "initdb");

        let mut pg = Postgres {
            bin,
            dir,
            log,
            owner,
            port: 0,
            child: None,
        };
        pg.launch(true);
        pg
    }

    /// `postgres://parley@127.0.0.1:<port>/postgres`: the maintenance
    /// database, for tests that create or drop things themselves.
    pub fn admin_url(&self) -> String {
        format!("postgres://parley@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a new empty database with `createdb` and returns its URL,
    /// `postgres://parley@127.0.0.1:<port>/<name>`. Names are unique within
    /// the process (`parley_<counter>_<pid>`), so tests sharing one server
    /// each get their own schema space.
    pub fn new_database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "parley_{}_{}",
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        );
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb
            .args(["-h", "127.0.0.1", "-U", "parley", "-p"])
            .arg(self.port.to_string())
            .arg(&name);
        run_logged(createdb, &self.log, "createdb");
        format!("postgres://parley@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server with SIGINT (fast shutdown: clients are disconnected,
    /// a checkpoint is written) and waits for it to exit; SIGKILL if it takes
    /// longer than ~30 s. The data dir stays for `start_again`. No-op when
    /// already stopped.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, libc::SIGINT, STOP_TIMEOUT);
        }
    }

    /// Starts the server again on the same port and data dir (stopping it
    /// first if it is running), so URLs handed out earlier stay valid. Waits
    /// until it accepts connections.
    pub fn start_again(&mut self) {
        self.stop();
        self.launch(false);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Spawns postgres and waits until it is ready. With `new_port`, each
    /// attempt takes a fresh free port (first start); otherwise it keeps
    /// `self.port` and only retries after a pause, in case something held
    /// the port for a moment.
    fn launch(&mut self, new_port: bool) {
        let (bin, data, socket_dir, owner) = (
            self.bin.clone(),
            self.dir.path().join("data"),
            self.dir.path().to_owned(),
            self.owner,
        );
        let spawn = move |port: u16| {
            let mut cmd = Command::new(bin.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string()])
                .arg("-k")
                .arg(&socket_dir)
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "max_connections=400"])
                .args(["-c", "fsync=on"])
                .args(["-c", "synchronous_commit=on"]);
            run_as(&mut cmd, owner);
            cmd
        };
        let bin = self.bin.clone();
        let ready = move |port: u16| pg_isready(&bin, port);
        self.child = Some(launch(
            "postgres",
            &self.log,
            &mut self.port,
            new_port,
            spawn,
            ready,
        ));
    }
}

impl Drop for Postgres {
    /// SIGQUIT (immediate shutdown, no checkpoint: the data is about to be
    /// deleted anyway), SIGKILL if that takes more than ~5 s, then reap; the
    /// temp dir goes after.
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, libc::SIGQUIT, KILL_GRACE);
        }
    }
}

/// A private Redis server without persistence, killed on drop.
pub struct Redis {
    /// Its `--dir` (nothing is written there) and `redis.log`.
    dir: TempDir,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// `redis-server --port <free port> --bind 127.0.0.1 --save "" --appendonly
    /// no --dir <tempdir>` as a child process (not daemonized, so it is ours
    /// to stop and reap), returning once it answers PING (at most ~30 s).
    /// Persistence is off, so a restart starts empty, like a Redis that lost
    /// its memory.
    pub fn start() -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("parley-redis-")
            .tempdir()
            .expect("engines: create a temp dir for redis");
        let log = dir.path().join("redis.log");
        File::create(&log).expect("engines: create redis.log");
        let mut redis = Redis {
            dir,
            log,
            port: 0,
            child: None,
        };
        redis.launch(true);
        redis
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGTERM (Redis exits at once, nothing to save), SIGKILL if it is not
    /// gone within ~30 s, and reap. No-op when already stopped.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, libc::SIGTERM, STOP_TIMEOUT);
        }
    }

    /// Starts it again, empty, on the same port (stopping it first if it is
    /// running), so URLs handed out earlier stay valid. Waits for PONG.
    pub fn start_again(&mut self) {
        self.stop();
        self.launch(false);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn launch(&mut self, new_port: bool) {
        let dir = self.dir.path().to_owned();
        let spawn = move |port: u16| {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--daemonize", "no"])
                .arg("--dir")
                .arg(&dir);
            cmd
        };
        self.child = Some(launch(
            "redis-server",
            &self.log,
            &mut self.port,
            new_port,
            spawn,
            redis_ping,
        ));
    }
}

impl Drop for Redis {
    /// SIGKILL straight away (nothing to flush) and reap.
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, libc::SIGKILL, KILL_GRACE);
        }
    }
}

/// Spawns a server (`spawn(port)` builds its command) with stdout and stderr
/// appended to `log`, and waits until `ready(port)`. A server that exits
/// saying its address is in use is retried, up to `BIND_ATTEMPTS` times: on a
/// fresh free port if `new_port`, else on the same port after a pause. Any
/// other failure panics with the log's tail.
fn launch(
    name: &str,
    log: &Path,
    port: &mut u16,
    new_port: bool,
    spawn: impl Fn(u16) -> Command,
    ready: impl Fn(u16) -> bool,
) -> Child {
    for attempt in 1..=BIND_ATTEMPTS {
        if new_port || *port == 0 {
            *port = free_port();
        } else if attempt > 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
        note(
            log,
            &format!("starting {name} on port {} (attempt {attempt})", *port),
        );
        let log_start = fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = spawn(*port);
        cmd.stdin(Stdio::null())
            .stdout(append_to(log))
            .stderr(append_to(log));
        die_with_parent(&mut cmd);
        let mut child = spawn_server(cmd)
            .unwrap_or_else(|e| panic!("engines: cannot run {name} ({e}); is it installed?"));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if address_in_use(log, log_start) {
                        note(log, &format!("{name} could not bind port {} ({status})", *port));
                        break; // next attempt
                    }
                    panic!(
                        "engines: {name} exited during start-up ({status}){}",
                        log_tail(log)
                    );
                }
                Ok(None) => {}
                Err(e) => panic!("engines: waiting for {name}: {e}"),
            }
            if ready(*port) {
                return child;
            }
            if Instant::now() > deadline {
                stop_child(child, libc::SIGKILL, KILL_GRACE);
                panic!(
                    "engines: {name} did not accept connections on port {} within {READY_TIMEOUT:?}{}",
                    *port,
                    log_tail(log)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    panic!(
        "engines: {name} could not bind a port in {BIND_ATTEMPTS} attempts{}",
        log_tail(log)
    )
}

/// A port nobody listens on right now: bind 127.0.0.1:0 and let go. Racy by
/// nature (someone else may take it before the server binds); `launch`
/// retries when that happens.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("engines: bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Whether the log, from `from` on, shows a failed bind (both Postgres and
/// Redis print the strerror).
fn address_in_use(log: &Path, from: u64) -> bool {
    let mut text = String::new();
    if let Ok(mut f) = File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    text.contains("Address already in use")
}

/// Sends `sig`, waits up to `timeout` for the exit, then SIGKILL and waits
/// for good. Never panics: it runs in `Drop`.
fn stop_child(mut child: Child, sig: libc::c_int, timeout: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // SAFETY: kill(2) has no memory effects; the pid is our unreaped child, so
    // it cannot have been reused by another process.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Runs a short-lived tool (initdb, createdb) with its output appended to
/// the log; panics with the log's tail if it fails or takes too long.
fn run_logged(mut cmd: Command, log: &Path, what: &str) {
    note(log, &format!("running {what}"));
    cmd.stdin(Stdio::null())
        .stdout(append_to(log))
        .stderr(append_to(log));
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("engines: cannot run {what}: {e}"));
    let deadline = Instant::now() + TOOL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => panic!("engines: {what} failed ({status}){}", log_tail(log)),
            Ok(None) if Instant::now() > deadline => {
                stop_child(child, libc::SIGKILL, KILL_GRACE);
                panic!("engines: {what} took more than {TOOL_TIMEOUT:?}{}", log_tail(log));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("engines: waiting for {what}: {e}"),
        }
    }
}

/// `pg_isready` exits 0 only once the server accepts connections (1 while it
/// is still starting up), which a bare TCP connect cannot tell.
fn pg_isready(bin: &Path, port: u16) -> bool {
    let mut cmd = Command::new(bin.join("pg_isready"));
    cmd.args(["-q", "-h", "127.0.0.1", "-U", "parley"]);
    cmd.args(["-d", "postgres", "-t", "1"]);
    cmd.arg("-p").arg(port.to_string());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// Whether a Redis on `port` answers `PING` with `+PONG`, in plain RESP
/// (an inline command) over a std TcpStream.
fn redis_ping(port: u16) -> bool {
    let attempt = || -> io::Result<bool> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.set_write_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 64];
        while !reply.ends_with(b"\r\n") {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Ok(reply.starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}

/// The highest-versioned `/usr/lib/postgresql/<v>/bin` that has a `postgres`
/// binary (Debian's layout; several versions may be installed side by side).
fn pg_bin_dir() -> PathBuf {
    const ROOT: &str = "/usr/lib/postgresql";
    let version = |name: &str| -> Option<Vec<u32>> { name.split('.').map(|p| p.parse().ok()).collect() };
    fs::read_dir(ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let v = version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| {
            panic!(
                "engines: no PostgreSQL under {ROOT}/*/bin; install the `postgresql` package (.ci/run does)"
            )
        })
}

/// `Some((uid, gid))` of the `postgres` user when we run as root (initdb and
/// postgres refuse root), `None` to run them as ourselves.
fn postgres_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // SAFETY: an all-zero passwd is a valid value of this plain C struct; it
    // is only read after getpwnam_r filled it in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is its size;
    // the strings it writes into `buf` are not used.
    let rc = unsafe {
        libc::getpwnam_r(
            c"postgres".as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        panic!(
            "engines: running as root, but there is no `postgres` user to run initdb/postgres as \
             (they refuse to run as root); install the postgresql package or run the tests as another user"
        );
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}

fn run_as(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
}

/// Makes the kernel SIGKILL the child when the thread that spawned it dies,
/// so a test process that aborts leaves no server behind (`Drop` does not run
/// then). The setting survives exec, and is set here after the uid switch,
/// which would clear it.
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe calls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: nobody would send the signal then.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Spawns a long-lived server from one thread that lives as long as the
/// process. PR_SET_PDEATHSIG fires when the spawning *thread* exits, not the
/// process: spawned from a test's own thread, a server shared beyond that
/// test (a `static`, another thread, a tokio blocking-pool thread that exits
/// when idle) would be killed under its users.
fn spawn_server(cmd: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let jobs = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("engines-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in queue {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("engines: start the spawner thread");
        jobs
    });
    let (reply, answer) = mpsc::channel();
    jobs.send((cmd, reply))
        .expect("engines: the spawner thread is gone");
    answer.recv().expect("engines: the spawner thread is gone")
}

/// A handle that appends to the log, for a child's stdout or stderr.
fn append_to(log: &Path) -> File {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .unwrap_or_else(|e| panic!("engines: open {}: {e}", log.display()))
}

/// A line of our own in the log, so its reader can tell starts and attempts apart.
fn note(log: &Path, line: &str) {
    let _ = writeln!(append_to(log), "--- engines: {line}");
}

/// The last lines of the log, formatted for the end of a panic message.
fn log_tail(log: &Path) -> String {
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("\n--- last lines of {}:\n{tail}", log.display())
}
