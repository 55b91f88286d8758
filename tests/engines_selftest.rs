//! The test-support engines (tests/support/engines.rs) themselves: a real
//! PostgreSQL and a real Redis start, answer, stop, and come back on the same
//! port, Postgres with its data. Checked with tools independent of the
//! module: `psql`, and a PING of our own.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/engines.rs"]
mod engines;

/// `psql -X -Atc <sql> <url>`'s output, trimmed; panics on failure.
fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-At", "-c", sql, url])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {url} -c {sql:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("psql output is UTF-8")
        .trim()
        .to_owned()
}

/// The reply to an inline `PING`, up to its CRLF.
fn ping(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 64];
    while !reply.ends_with(b"\r\n") {
        let n = stream.read(&mut buf).expect("read the PING reply");
        assert!(n > 0, "redis closed the connection after PING");
        reply.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&reply).trim_end().to_owned()
}

#[test]
fn postgres_and_redis_start_stop_and_start_again() {
    let started = Instant::now();
    let mut pg = engines::Postgres::start();
    eprintln!("Postgres::start took {:?}", started.elapsed());
    assert_eq!(
        pg.admin_url(),
        format!("postgres://parley@127.0.0.1:{}/postgres", pg.port())
    );
    assert_eq!(psql(&pg.admin_url(), "select 1"), "1");

    let db = pg.new_database();
    assert!(
        db.starts_with(&format!("postgres://parley@127.0.0.1:{}/parley_", pg.port())),
        "{db}"
    );
    assert_eq!(psql(&db, "select 1"), "1");
    assert_eq!(psql(&db, "show server_encoding"), "UTF8");
    assert_eq!(psql(&db, "show max_connections"), "400");
    psql(&db, "create table t (x int); insert into t values (42)");
    assert_ne!(pg.new_database(), db, "each database gets its own name");

    let port = pg.port();
    pg.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "postgres still listens after stop"
    );
    let restarted = Instant::now();
    pg.start_again();
    eprintln!("Postgres::start_again took {:?}", restarted.elapsed());
    assert_eq!(pg.port(), port);
    assert_eq!(psql(&db, "select 1"), "1");
    assert_eq!(psql(&db, "select x from t"), "42", "the data outlives a restart");
    drop(pg);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "postgres still listens after drop"
    );

    let mut redis = engines::Redis::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(ping(port), "+PONG");
    redis.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "redis still listens after stop"
    );
    redis.start_again();
    assert_eq!(redis.port(), port);
    assert_eq!(ping(port), "+PONG");
    drop(redis);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "redis still listens after drop"
    );
}
