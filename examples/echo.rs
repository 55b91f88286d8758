//! An echo server on parley's own socket engine, for the Autobahn|Testsuite
//! (`.ci/autobahn.sh`).
//!
//! It runs exactly what the chat and notification sockets run after their
//! 101 (`parley::ws::engine`: the frame decoder, `Conn`, the outbox, the
//! close handshake and its timeout), with an echo handler instead of the
//! chat protocol, so Autobahn's verdicts are verdicts on the engine. The
//! HTTP side is the same shape as parley's (hyper 1, fastwebsockets'
//! handshake, the bare `TcpStream` handed to the engine).
//!
//! ```sh
//! cargo run --release --example echo -- 127.0.0.1:9001
//! ```
//!
//! Messages up to 64 MiB are echoed (Autobahn's case 9 sends 16 MiB).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use parley::outbox::Outbox;
use parley::wire::{self, OpCode};
use parley::ws::engine::{self, Ctx, Flow, Handler, Settings};

/// Largest message echoed, and largest queue per socket.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

struct Echo {
    outbox: Arc<Outbox>,
}

impl Handler for Echo {
    type Rare = ();

    fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    fn settings(&self) -> Settings {
        Settings {
            max_message_bytes: MAX_MESSAGE,
            close_timeout: Duration::from_secs(2),
        }
    }

    fn on_message(&mut self, _ctx: &mut Ctx<'_, ()>, opcode: OpCode, payload: &mut [u8]) -> Flow {
        let mut b = BytesMut::with_capacity(wire::header_len(payload.len()) + payload.len());
        wire::put_frame(&mut b, opcode, payload);
        self.outbox.push(b.freeze());
        Flow::Continue
    }
}

type Body = Empty<Bytes>;

async fn serve(mut req: Request<Incoming>) -> Result<Response<Body>, std::convert::Infallible> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut r = Response::new(Body::new());
        *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
        return Ok(r);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let response = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok((response, _unused)) => response,
        Err(_) => {
            let mut r = Response::new(Body::new());
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            eprintln!("echo: upgraded connection is not a TcpStream");
            return;
        };
        let early = parts.read_buf.to_vec();
        let outbox = Outbox::new(Arc::from("echo"), MAX_MESSAGE);
        engine::spawn(parts.io.into_inner(), Echo { outbox }, early);
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, Body::new()))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = parley::server::listen(addr)?;
    println!("echo listening on ws://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(serve))
                .with_upgrades();
            let _ = conn.await;
        });
    }
}
