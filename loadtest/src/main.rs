//! parley-load: a load generator for any server speaking the parley wire
//! contract (shared/PROTOCOL.md). See loadtest/README.md.

mod coord;
mod net;
mod proto;
mod sys;
mod worker;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "parley-load",
    version,
    about = "Density, fan-out and chat load against a server speaking the parley wire contract (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Idle authenticated sockets: server RSS per socket, idle CPU, connect rate.
    Density(DensityArgs),
    /// One conversation, many subscriber sockets, one publisher.
    Fanout(FanoutArgs),
    /// Many small conversations, open-loop message rate, latency.
    Chat(ChatArgs),
    /// Internal: a worker process driven over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Server base URL, loopback only, e.g. http://127.0.0.1:8301; several
    /// separated by commas (a cluster's nodes) spread the sockets over them
    #[arg(long)]
    pub url: String,
    /// HS256 secret the server verifies tokens with
    #[arg(long)]
    pub secret: String,
    /// Server process id: RSS and CPU are read for it and all its
    /// descendants; several separated by commas are summed (and CPU is
    /// reported per pid too)
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<i32>,
    /// Worker processes (0 = max(2, sockets / --max-per-worker))
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Sockets per worker process when --workers is 0
    #[arg(long, default_value_t = 15_000)]
    pub max_per_worker: u32,
    /// Overall limit in seconds; the tool stops itself and its workers then
    #[arg(long, default_value_t = 900.0)]
    pub timeout: f64,
    /// Client sockets per source address (127.0.0.N); kept under the
    /// ~14,000 even ports connect() prefers in the default ephemeral range
    #[arg(long, default_value_t = 12_000)]
    pub per_source: u32,
    /// First source address's last octet: 127.0.0.<N>
    #[arg(long, default_value_t = 2)]
    pub source_first: u8,
    /// Limit for one TCP connect + WebSocket handshake, seconds
    #[arg(long, default_value_t = 15.0)]
    pub connect_timeout: f64,
    /// Concurrent REST connections for set-up
    #[arg(long, default_value_t = 8)]
    pub rest_concurrency: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum SocketKind {
    Chat,
    Notifications,
}

#[derive(Args, Clone, Debug)]
pub struct DensityArgs {
    #[command(flatten)]
    pub common: Common,
    /// Socket counts to measure at, ascending
    #[arg(long, value_delimiter = ',', default_value = "5000,10000,18000")]
    pub counts: Vec<u32>,
    /// Chat sockets (one conversation per --per-conversation users) or notification sockets
    #[arg(long, value_enum, default_value_t = SocketKind::Chat)]
    pub kind: SocketKind,
    /// Users per conversation for --kind chat
    #[arg(long, default_value_t = 5)]
    pub per_conversation: u32,
    /// Concurrent handshakes, over all workers
    #[arg(long, default_value_t = 256)]
    pub in_flight: u32,
    /// Seconds to let the server settle before reading RSS
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Seconds of idle CPU measurement at the highest count (0 = skip)
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,
}

#[derive(Args, Clone, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscriber sockets in the one conversation
    #[arg(long, default_value_t = 5000)]
    pub subscribers: u32,
    /// Distinct subscriber users (sockets are spread over them)
    #[arg(long, default_value_t = 50)]
    pub users: u32,
    /// Messages the publisher sends
    #[arg(long, default_value_t = 300)]
    pub messages: u32,
    /// Messages not yet echoed back to the publisher, at most
    #[arg(long, default_value_t = 16)]
    pub in_flight: u32,
    /// Concurrent handshakes while connecting
    #[arg(long, default_value_t = 256)]
    pub connect_in_flight: u32,
    /// Seconds between connecting and publishing
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Limit for the publishing phase, seconds
    #[arg(long, default_value_t = 120.0)]
    pub publish_timeout: f64,
    /// Seconds to wait for outstanding deliveries after publishing
    #[arg(long, default_value_t = 15.0)]
    pub drain: f64,
}

#[derive(Args, Clone, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: Common,
    /// Conversations
    #[arg(long, default_value_t = 1000)]
    pub conversations: u32,
    /// Members per conversation, one socket each
    #[arg(long, default_value_t = 5)]
    pub members: u32,
    /// Messages per second, over all conversations (open loop)
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds of sending
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Concurrent handshakes while connecting
    #[arg(long, default_value_t = 256)]
    pub connect_in_flight: u32,
    /// Seconds between connecting and sending
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Seconds to wait for outstanding deliveries after sending
    #[arg(long, default_value_t = 15.0)]
    pub drain: f64,
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::Worker = cli.cmd {
        worker::main();
        return;
    }
    let limit = sys::raise_nofile();
    eprintln!("open files limit: {limit}");
    let (name, timeout) = match &cli.cmd {
        Cmd::Density(a) => ("density", a.common.timeout),
        Cmd::Fanout(a) => ("fanout", a.common.timeout),
        Cmd::Chat(a) => ("chat", a.common.timeout),
        Cmd::Worker => unreachable!(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async move {
        let fut = async move {
            match cli.cmd {
                Cmd::Density(a) => coord::density(a).await,
                Cmd::Fanout(a) => coord::fanout(a).await,
                Cmd::Chat(a) => coord::chat(a).await,
                Cmd::Worker => unreachable!(),
            }
        };
        // Dropping the scenario on timeout kills its workers (kill_on_drop).
        match tokio::time::timeout(Duration::from_secs_f64(timeout.max(1.0)), fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("overall --timeout of {timeout} s reached")),
        }
    });
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("parley-load {name}: {e}");
            println!("{}", serde_json::json!({"scenario": name, "error": e}));
            std::process::exit(1);
        }
    }
}
