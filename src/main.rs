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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG")
                .unwrap_or_else(|_| "parley=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match cli.command {
        Some(Command::Token(t)) => token(t),
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
