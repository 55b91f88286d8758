//! Flags and `PARLEY_*` environment variables, turned into one validated [`Config`].
//!
//! Every limit the server enforces is named here, with its default, so the
//! README's configuration table and the code cannot drift apart. This module
//! never opens a socket or the store (the secret file aside, which is part of
//! resolving what the operator asked for).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::{self, JwtAlgorithm, JwtConfig, KeySource};

/// `parley` with no subcommand runs the server.
#[derive(Debug, Parser)]
#[command(name = "parley", version, about = "Real-time chat and notification server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a token for a user, signed with the server's secret.
    Token(TokenArgs),
    /// Print the effective configuration (secrets redacted) and exit 0, or
    /// the one-line error and exit 2. Creates nothing.
    CheckConfig(Box<ServeArgs>),
}

/// Where the HS256 secret comes from; shared by the server and `parley token`.
#[derive(Debug, Args, Clone)]
pub struct SecretArgs {
    /// Directory holding the store (and the generated secret).
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "parley-data")]
    pub data_dir: PathBuf,
    /// HS256 secret. Default: a random secret generated in the data dir on first start.
    #[arg(
        long,
        env = "PARLEY_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_secret_file"
    )]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 secret.
    #[arg(long, env = "PARLEY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "PARLEY_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// PEM public key for RS256 / ES256 / EdDSA tokens (instead of a secret).
    #[arg(long, env = "PARLEY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Token algorithm: HS256 (default), or RS256 / ES256 / EdDSA with --jwt-public-key.
    #[arg(long, env = "PARLEY_JWT_ALGORITHM")]
    pub jwt_algorithm: Option<String>,
    /// Required `aud` claim (checked only when set).
    #[arg(long, env = "PARLEY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim (checked only when set).
    #[arg(long, env = "PARLEY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Refuse tokens without `exp` (`false` accepts them).
    #[arg(long, env = "PARLEY_JWT_REQUIRE_EXP", default_value_t = true, action = clap::ArgAction::Set)]
    pub jwt_require_exp: bool,
    /// Longest message text, in Unicode code points.
    #[arg(long, env = "PARLEY_MAX_MESSAGE_CHARS", default_value_t = 4000)]
    pub max_message_chars: usize,
    /// Largest inbound WebSocket frame (and whole fragmented message), in payload bytes.
    #[arg(long, env = "PARLEY_MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,
    /// Most WebSocket connections open at once; beyond it upgrades get 503.
    #[arg(long, env = "PARLEY_MAX_CONNECTIONS", default_value_t = 1_000_000)]
    pub max_connections: usize,
    /// `sync` (the commit log is fdatasync'ed before anyone sees a write:
    /// survives kill -9 and power loss; `fsync` is the same), or
    /// `interval:<ms>` (sled alone, flushed on that period).
    #[arg(long, env = "PARLEY_DURABILITY", default_value = "sync")]
    pub durability: String,
    /// Size of each commit-log segment, preallocated, in MiB (`sync` mode).
    #[arg(long, env = "PARLEY_WAL_SEGMENT_MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub wal_segment_mib: u64,
    /// Cluster mode: PostgreSQL holds the record (with --redis-url; the two
    /// go together). Nothing of the record is then kept in --data-dir.
    #[arg(long, env = "PARLEY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Cluster mode: Redis pub/sub carries events between nodes (with
    /// --database-url).
    #[arg(long, env = "PARLEY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Cluster mode: on SIGTERM, how long to spread closing the node's
    /// sockets (1012) over, so clients resume on other nodes without a stampede.
    #[arg(long, env = "PARLEY_DRAIN_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_period: Duration,
    /// Bytes queued for one socket before it is closed as a slow consumer (1013).
    #[arg(long, env = "PARLEY_MAX_OUTBOUND_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_outbound_bytes: usize,
    /// Largest REST request body, in bytes (413 beyond).
    #[arg(long, env = "PARLEY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Refuse writes (503 / `unavailable`) while the data dir's disk has less
    /// free space than this, in bytes; they resume by themselves when space
    /// returns. Keeps the store from ever hitting a full disk.
    #[arg(long, env = "PARLEY_MIN_FREE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub min_free_bytes: u64,
    /// Events replayed at most on a resuming socket (Part D).
    #[arg(long, env = "PARLEY_MAX_REPLAY_EVENTS", default_value_t = 1000)]
    pub max_replay_events: usize,
    /// Chat frames one socket may send per second (0 = unlimited).
    #[arg(long, env = "PARLEY_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,
    /// Time allowed for the HTTP request head, upgrade included (e.g. 10s).
    #[arg(long, env = "PARLEY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Ping a socket that has sent nothing for this long (0s = never).
    #[arg(long, env = "PARLEY_PING_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// Close a pinged socket that stays silent this much longer.
    #[arg(long, env = "PARLEY_PING_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_timeout: Duration,
    /// Time a peer has to take our close frame and answer it; then the
    /// connection is reset.
    #[arg(long, env = "PARLEY_CLOSE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub close_timeout: Duration,
    /// Open sockets one user may have (0 = unlimited); the oldest are kept
    /// and a new upgrade beyond is answered 429.
    #[arg(long, env = "PARLEY_MAX_SOCKETS_PER_USER", default_value_t = 0)]
    pub max_sockets_per_user: u32,
    /// WebSocket upgrades one client IP may attempt per second (0 =
    /// unlimited); 429 beyond.
    #[arg(long, env = "PARLEY_MAX_UPGRADES_PER_IP", default_value_t = 0)]
    pub max_upgrades_per_ip: u32,
    /// Serve `/metrics` (on by default).
    #[arg(long, env = "PARLEY_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,
    /// Origins allowed to call the REST API from a browser (CORS), comma
    /// separated, e.g. `https://app.example,http://localhost:3000`; `*` for
    /// any. None by default.
    #[arg(long, env = "PARLEY_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,
    /// Log lines as `pretty` text or one `json` object per line.
    #[arg(long, env = "PARLEY_LOG_FORMAT", default_value = "pretty", value_parser = ["pretty", "json"])]
    pub log_format: String,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The username (`sub`).
    pub username: String,
    /// Mark the token `role: "service"` (may post notifications).
    #[arg(long)]
    pub service: bool,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    #[command(flatten)]
    pub secret: SecretArgs,
}

/// When a write becomes durable relative to when clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every group of writes is appended to the commit log and
    /// `fdatasync`ed before it is broadcast or answered: survives a process
    /// crash (`kill -9`) and a power loss.
    Sync,
    /// The name this mode had when `sync` was only crash-safe; now the same
    /// as `Sync`.
    Fsync,
    /// Writes are broadcast once in sled; sled flushes on this period.
    Interval(Duration),
}

/// Everything the server needs, validated.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// How tokens are verified; built (and its key parsed) by `auth`, the
    /// one module that knows the token library.
    pub jwt: JwtConfig,
    pub max_message_chars: usize,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub durability: Durability,
    pub max_outbound_bytes: usize,
    pub max_body_bytes: usize,
    pub max_replay_events: usize,
    pub min_free_bytes: u64,
    /// Commit-log segment size, bytes.
    pub wal_segment_bytes: u64,
    pub rate_limit: u32,
    pub handshake_timeout: Duration,
    /// `None`: never ping.
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    pub close_timeout: Duration,
    /// 0: unlimited.
    pub max_sockets_per_user: u32,
    /// 0: unlimited.
    pub max_upgrades_per_ip: u32,
    pub metrics: bool,
    /// `--cors-origins`, each without a trailing slash; empty: no CORS.
    pub cors_origins: Vec<String>,
    /// The HS256 secret is the one parley keeps in the data dir (no secret
    /// configured): the zero-configuration case, where the console may mint
    /// tokens when listening on loopback.
    pub secret_in_data_dir: bool,
    /// `pretty` or `json`.
    pub log_format: String,
    /// Both engines of cluster mode; `None`: one node on its own store.
    pub cluster: Option<ClusterConfig>,
}

/// Where a cluster node finds its engines.
#[derive(Clone)]
pub struct ClusterConfig {
    pub database_url: String,
    pub redis_url: String,
    pub drain_period: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    /// URLs may carry passwords: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("drain_period", &self.drain_period)
            .finish_non_exhaustive()
    }
}

/// A configuration the operator must fix; the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Config {
    pub fn from_args(a: ServeArgs) -> Result<Config, ConfigError> {
        Config::build(a, true)
    }

    /// As [`Config::from_args`]; `create_secret: false` (for `parley
    /// check-config`) does not generate a missing secret.
    ///
    /// Validates every flag, in flag order, so each error names its flag.
    /// Long because it is one flat list of checks; nothing in it branches
    /// on anything but the flag it checks.
    pub fn build(a: ServeArgs, create_secret: bool) -> Result<Config, ConfigError> {
        let durability = parse_durability(&a.durability)?;
        if a.max_message_chars == 0 {
            return Err(bad("--max-message-chars must be at least 1"));
        }
        if a.max_frame_bytes < 128 {
            return Err(bad("--max-frame-bytes must be at least 128"));
        }
        if a.max_connections == 0 {
            return Err(bad("--max-connections must be at least 1"));
        }
        if a.max_outbound_bytes < 4096 {
            return Err(bad("--max-outbound-bytes must be at least 4096"));
        }
        if a.max_body_bytes < 256 {
            return Err(bad("--max-body-bytes must be at least 256"));
        }
        if !a.ping_interval.is_zero() && a.ping_timeout < Duration::from_secs(1) {
            return Err(bad("--ping-timeout must be at least 1s"));
        }
        if a.handshake_timeout.is_zero() {
            return Err(bad("--handshake-timeout must be more than 0s"));
        }
        if a.close_timeout < Duration::from_millis(100) {
            return Err(bad("--close-timeout must be at least 100ms"));
        }
        if a.max_replay_events == 0 {
            return Err(bad("--max-replay-events must be at least 1"));
        }
        let algorithm = auth::parse_algorithm(a.jwt_algorithm.as_deref())
            .map_err(|e| bad(format!("--jwt-algorithm: {e}")))?;
        let key = if algorithm == JwtAlgorithm::Hs256 {
            if a.jwt_public_key.is_some() {
                return Err(bad(
                    "--jwt-public-key needs --jwt-algorithm RS256, ES256 or EdDSA",
                ));
            }
            let secret = match resolve_secret(&a.secret, create_secret) {
                // Not generated yet (check-config): the first start will.
                Err(_)
                    if !create_secret
                        && a.secret.jwt_secret_file.is_none()
                        && !a.secret.data_dir.join("jwt-secret").exists() =>
                {
                    Vec::new()
                }
                r => r?,
            };
            KeySource::Secret(secret)
        } else {
            let path = a.jwt_public_key.as_ref().ok_or_else(|| {
                bad(format!(
                    "--jwt-algorithm {} needs --jwt-public-key <pem>",
                    algorithm.name()
                ))
            })?;
            let pem =
                std::fs::read(path).map_err(|e| bad(format!("--jwt-public-key {}: {e}", path.display())))?;
            KeySource::PublicKeyPem(pem)
        };
        let jwt =
            JwtConfig::new(algorithm, key, a.jwt_audience, a.jwt_issuer, a.jwt_require_exp).map_err(|e| {
                let path = a
                    .jwt_public_key
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                bad(format!("--jwt-public-key {path}: {e}"))
            })?;
        let cors_origins = parse_origins(&a.cors_origins)?;
        let secret_in_data_dir = algorithm == JwtAlgorithm::Hs256
            && a.secret.jwt_secret.is_none()
            && a.secret.jwt_secret_file.is_none();
        let cluster = match (a.database_url, a.redis_url) {
            (None, None) => None,
            (Some(_), None) => return Err(bad("--database-url needs --redis-url too (a cluster uses both)")),
            (None, Some(_)) => return Err(bad("--redis-url needs --database-url too (a cluster uses both)")),
            (Some(database_url), Some(redis_url)) => {
                if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
                    return Err(bad("--database-url must be a postgres:// URL"));
                }
                if !(redis_url.starts_with("redis://") || redis_url.starts_with("rediss://")) {
                    return Err(bad("--redis-url must be a redis:// URL"));
                }
                if secret_in_data_dir {
                    return Err(bad(
                        "--database-url: every node of a cluster must verify the same tokens; \
                         set --jwt-secret, --jwt-secret-file or --jwt-public-key",
                    ));
                }
                Some(ClusterConfig {
                    database_url,
                    redis_url,
                    drain_period: a.drain_period,
                })
            }
        };
        Ok(Config {
            cluster,
            cors_origins,
            secret_in_data_dir,
            log_format: a.log_format,
            listen: a.listen,
            data_dir: a.secret.data_dir,
            jwt,
            max_message_chars: a.max_message_chars,
            max_frame_bytes: a.max_frame_bytes,
            max_connections: a.max_connections,
            durability,
            max_outbound_bytes: a.max_outbound_bytes,
            max_body_bytes: a.max_body_bytes,
            max_replay_events: a.max_replay_events,
            min_free_bytes: a.min_free_bytes,
            wal_segment_bytes: a.wal_segment_mib << 20,
            rate_limit: a.rate_limit,
            handshake_timeout: a.handshake_timeout,
            ping_interval: (!a.ping_interval.is_zero()).then_some(a.ping_interval),
            ping_timeout: a.ping_timeout,
            close_timeout: a.close_timeout,
            max_sockets_per_user: a.max_sockets_per_user,
            max_upgrades_per_ip: a.max_upgrades_per_ip,
            metrics: a.metrics,
        })
    }

    /// Whether the console may mint tokens: no secret was configured (parley
    /// uses the one it generated in its data dir) and only this machine can
    /// reach the server.
    pub fn console_may_mint(&self) -> bool {
        self.secret_in_data_dir && self.listen.ip().is_loopback()
    }

    /// A configuration for tests and benches: everything default, data in `dir`.
    pub fn for_tests(dir: &Path, secret: &str) -> Config {
        let cli = Cli::parse_from([
            "parley",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.to_str().expect("utf-8 temp dir"),
            "--jwt-secret",
            secret,
        ]);
        Config::from_args(cli.serve).expect("test config is valid")
    }
}

/// `--cors-origins`: `*`, or `scheme://host[:port]` items separated by commas.
pub fn parse_origins(s: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let item = item.trim_end_matches('/');
        let ok = item == "*"
            || item.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains(['/', ' ', '?', '#'])
            });
        if !ok {
            return Err(bad(format!(
                "--cors-origins: '{item}' is not an origin like https://app.example or http://localhost:3000 (or *)"
            )));
        }
        out.push(item.to_string());
    }
    Ok(out)
}

pub fn parse_durability(s: &str) -> Result<Durability, ConfigError> {
    match s {
        "sync" => return Ok(Durability::Sync),
        "fsync" => return Ok(Durability::Fsync),
        _ => {}
    }
    if let Some(ms) = s.strip_prefix("interval:") {
        if let Ok(ms) = ms.parse::<u64>() {
            if ms > 0 {
                return Ok(Durability::Interval(Duration::from_millis(ms)));
            }
        }
    }
    Err(bad(format!(
        "--durability: '{s}' is not 'sync', 'fsync' or 'interval:<milliseconds>' (e.g. interval:100)"
    )))
}

/// The HS256 secret: the flag, the file, or one generated into the data dir
/// on first start (mode 0600) and reused after.
pub fn resolve_secret(a: &SecretArgs, create: bool) -> Result<Vec<u8>, ConfigError> {
    if let Some(s) = &a.jwt_secret {
        if s.is_empty() {
            return Err(bad("--jwt-secret must not be empty"));
        }
        return Ok(s.as_bytes().to_vec());
    }
    let (path, flag) = match &a.jwt_secret_file {
        Some(p) => (p.clone(), "--jwt-secret-file"),
        None => (a.data_dir.join("jwt-secret"), "--data-dir"),
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() {
                return Err(bad(format!("{flag}: {} is empty", path.display())));
            }
            Ok(trimmed.to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && a.jwt_secret_file.is_none() && create => {
            generate_secret(&a.data_dir, &path)
                .map_err(|e| bad(format!("{flag}: cannot create {}: {e}", path.display())))
        }
        Err(e) => Err(bad(format!("{flag}: cannot read {}: {e}", path.display()))),
    }
}

fn generate_secret(dir: &Path, path: &Path) -> std::io::Result<Vec<u8>> {
    use rand::RngCore;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(hex.as_bytes())?;
    f.sync_all()?;
    Ok(hex.into_bytes())
}
