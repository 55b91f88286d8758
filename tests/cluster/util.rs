//! A cluster of parley nodes on private engines, and what the tests ask of
//! Redis and of a node's sockets.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::engines::{Postgres, Redis};
use crate::harness::{user, Server, Ws};

pub struct Cluster {
    #[allow(dead_code)] // kept running for the cluster's life
    pub pg: Postgres,
    pub redis: Redis,
    pub database: String,
    pub nodes: Vec<Server>,
}

impl Cluster {
    /// `n` nodes on a fresh database of a private PostgreSQL and a private
    /// Redis.
    pub fn start(n: usize) -> Cluster {
        let pg = Postgres::start();
        let redis = Redis::start();
        let database = pg.new_database();
        let mut c = Cluster {
            pg,
            redis,
            database,
            nodes: Vec::new(),
        };
        for _ in 0..n {
            let node = c.node(&[]);
            c.nodes.push(node);
        }
        c
    }

    /// Another node of this cluster, with `extra` flags.
    pub fn node(&self, extra: &[&str]) -> Server {
        let url = self.redis.url();
        let mut args = vec!["--database-url", &self.database, "--redis-url", &url];
        args.extend_from_slice(extra);
        let node = Server::own(&args);
        // A node takes writes once it hears the bus (its own heartbeat
        // back), a moment after it listens.
        ready(&node.addr);
        node
    }
}

/// Alice and Bob in a new conversation, each with a chat socket open on
/// another node.
pub struct Two {
    pub conv: u64,
    pub bob: String,
    pub wa: Ws,
    pub wb: Ws,
}

/// [`Two`], Alice's socket on node `a`, Bob's on node `b`.
pub async fn two(c: &Cluster, a: usize, b: usize) -> Two {
    let alice = user("alice");
    let bob = user("bob");
    let conv = c.nodes[a].create_conversation(&alice, &[&bob]).await;
    let wa = c.nodes[a].ws_chat(conv, &alice).await;
    let wb = c.nodes[b].ws_chat(conv, &bob).await;
    Two { conv, bob, wa, wb }
}

/// Waits (bounded) until `/healthz` at `addr` answers 200, without a runtime.
fn ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = std::net::TcpStream::connect(addr).ok().and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(
                format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .ok()?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).ok()?;
            Some(head.ends_with(b"200"))
        });
        if ok == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "node {addr} never became healthy");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the node's `/healthz` answers `status` (bounded).
pub async fn wait_health(node: &Server, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (s, _) = node.get("/healthz", "").await;
        if s == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz of {} stayed {s}, not {status}",
            node.addr
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One Redis command over RESP; the raw answer.
pub fn redis(port: u16, args: &[&str]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Cuts every connection process `pid` has to Redis on `port` (as a
/// failover or a network blip would): finds its sockets' local ports from
/// /proc and asks Redis to kill the clients at those addresses.
pub fn cut_from_redis(pid: u32, port: u16) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string)
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let mut killed = 0;

    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, inode) = (f[1], f[2], f[9]);
        let remote_port = u16::from_str_radix(remote.rsplit(':').next().unwrap(), 16).unwrap();
        if remote_port != port || !inodes.iter().any(|i| i == inode) {
            continue;
        }
        let local_port = u16::from_str_radix(local.rsplit(':').next().unwrap(), 16).unwrap();
        let answer = redis(
            port,
            &["CLIENT", "KILL", "ADDR", &format!("127.0.0.1:{local_port}")],
        );
        // The filter form answers how many clients it killed.
        if answer.starts_with(":1") {
            killed += 1;
        }
    }
    killed
}
