//! `parley`: run the server, or `parley token <user>` to sign a token.

use clap::Parser;
use mimalloc::MiMalloc;
use tokio_util::sync::CancellationToken;

use parley::config::{self, Cli, Command, Config};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Memory for many small, long-lived per-socket objects: transparent huge
/// pages would back them in 2 MiB steps (mimalloc asks for them), so RSS
/// grows in jumps and idles far above what is used; parley opts out for
/// itself (see README, "Performance").
fn tune_memory() {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        eprintln!("parley: could not opt out of transparent huge pages; continuing");
    }
}

fn main() {
    tune_memory();
    let cli = Cli::parse();
    let filter =
        || tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| "parley=info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    if cli.serve.log_format == "json" {
        // One JSON object per line, fields (such as a socket's `conn`) as keys.
        logs.json().with_current_span(false).init();
    } else {
        logs.init();
    }
    let code = match cli.command {
        Some(Command::Token(t)) => token(t),
        Some(Command::CheckConfig(args)) => check_config(*args),
        None => serve(cli.serve),
    };
    std::process::exit(code);
}

fn token(t: config::TokenArgs) -> i32 {
    if !parley::auth::valid_username(&t.username) {
        eprintln!(
            "parley: '{}' is not a valid username (1-150 of A-Z a-z 0-9 _ . @ + -)",
            t.username
        );
        return 2;
    }
    match config::resolve_secret(&t.secret, true) {
        Ok(secret) => {
            println!(
                "{}",
                parley::auth::issue_hs256(&secret, &t.username, t.service, t.ttl.as_secs())
            );
            0
        }
        Err(e) => {
            eprintln!("parley: {e}");
            2
        }
    }
}

/// `parley check-config`: the configuration the server would run with,
/// secrets redacted; exit 2 with the one-line error otherwise. Long
/// because it is one flat table of every setting, in flag order.
fn check_config(args: config::ServeArgs) -> i32 {
    let data_dir_secret = args.secret.data_dir.join("jwt-secret");
    let secret_source = match (&args.secret.jwt_secret, &args.secret.jwt_secret_file) {
        (Some(_), _) => "--jwt-secret / PARLEY_JWT_SECRET".to_string(),
        (None, Some(f)) => format!("file {}", f.display()),
        (None, None) if data_dir_secret.exists() => format!("file {}", data_dir_secret.display()),
        (None, None) => format!("generated on first start into {}", data_dir_secret.display()),
    };
    let public_key = args.jwt_public_key.clone();
    let c = match Config::build(args, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("parley: {e}");
            return 2;
        }
    };
    let key = match (&c.jwt.secret, public_key) {
        (Some(s), _) if s.is_empty() => format!("<redacted> ({secret_source})"),
        (Some(s), _) => format!("<redacted, {} bytes> ({secret_source})", s.len()),
        (None, Some(p)) => format!("public key {}", p.display()),
        (None, None) => "none".into(),
    };
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "(not checked)".into());
    let durability = match c.durability {
        config::Durability::Sync => "sync".to_string(),
        config::Durability::Fsync => "fsync".to_string(),
        config::Durability::Interval(d) => format!("interval:{}", d.as_millis()),
    };
    let secs = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let lines: [(&str, String); 23] = [
        ("listen", c.listen.to_string()),
        ("data-dir", c.data_dir.display().to_string()),
        ("jwt-algorithm", format!("{:?}", c.jwt.algorithm)),
        ("jwt-key", key),
        ("jwt-audience", opt(&c.jwt.audience)),
        ("jwt-issuer", opt(&c.jwt.issuer)),
        ("jwt-require-exp", c.jwt.require_exp.to_string()),
        ("max-message-chars", c.max_message_chars.to_string()),
        ("max-frame-bytes", c.max_frame_bytes.to_string()),
        ("max-connections", c.max_connections.to_string()),
        ("durability", durability),
        ("max-outbound-bytes", c.max_outbound_bytes.to_string()),
        ("max-body-bytes", c.max_body_bytes.to_string()),
        ("max-replay-events", c.max_replay_events.to_string()),
        ("min-free-bytes", c.min_free_bytes.to_string()),
        ("rate-limit", c.rate_limit.to_string()),
        ("handshake-timeout", secs(c.handshake_timeout)),
        ("ping-interval", c.ping_interval.map_or("0s (never)".into(), secs)),
        ("ping-timeout", secs(c.ping_timeout)),
        ("metrics", c.metrics.to_string()),
        (
            "cors-origins",
            if c.cors_origins.is_empty() {
                "(none)".into()
            } else {
                c.cors_origins.join(",")
            },
        ),
        ("log-format", c.log_format.clone()),
        (
            "console-token-minting",
            if c.console_may_mint() {
                "on (secret in the data dir, loopback address)".into()
            } else {
                "off".into()
            },
        ),
    ];
    for (k, v) in lines {
        println!("{k:<22} {v}");
    }
    0
}

fn serve(args: config::ServeArgs) -> i32 {
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("parley: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("parley: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let listener = match parley::server::listen(config.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("parley: cannot listen on {}: {e}", config.listen);
                return 1;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        match parley::server::run(listener, config, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                eprintln!("parley: {msg}");
                1
            }
        }
    })
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
}
