//! Where a token comes from and whether it is valid, on arbitrary input:
//! header values and query strings into `auth::presented` and
//! `auth::query_param`, and strings into `Verifier::verify` — both raw, and
//! as well-formed HS256 tokens signed with the right secret around an
//! arbitrary header and claims payload, so the claim checks are reached.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use parley::auth::{self, Verifier};
use parley::config::Config;

const SECRET: &str = "fuzz-secret-0123456789abcdef";

struct Verifiers {
    /// The test configuration: HS256, `exp` required, no audience or issuer.
    plain: Verifier,
    /// With an audience and an issuer required as well.
    strict: Verifier,
}

static VERIFIERS: LazyLock<Verifiers> = LazyLock::new(|| {
    let jwt = Config::for_tests(Path::new("/nonexistent/parley-fuzz"), SECRET).jwt;
    assert_eq!(jwt.algorithm, Algorithm::HS256);
    let mut strict = jwt.clone();
    strict.audience = Some("parley".into());
    strict.issuer = Some("https://issuer.example".into());
    Verifiers {
        plain: Verifier::new(&jwt),
        strict: Verifier::new(&strict),
    }
});

static KEY: LazyLock<EncodingKey> = LazyLock::new(|| EncodingKey::from_secret(SECRET.as_bytes()));

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    socket: bool,
    strict: bool,
    /// `Authorization` values, raw bytes (invalid ones are not headers).
    authorization: Vec<&'a [u8]>,
    /// `Sec-WebSocket-Protocol` values, raw bytes.
    protocol: Vec<&'a [u8]>,
    query: Option<&'a str>,
    param: &'a str,
    /// Verified as is.
    token: &'a str,
    /// Base64url-encoded and signed into a token; `None`: a valid HS256 header.
    jwt_header: Option<&'a [u8]>,
    jwt_claims: &'a [u8],
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fuzz_target!(|input: Input<'_>| {
    let mut headers = HeaderMap::new();
    for v in &input.authorization {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(AUTHORIZATION, v);
        }
    }
    for v in &input.protocol {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    let verifiers = &*VERIFIERS;
    let verifier = if input.strict {
        &verifiers.strict
    } else {
        &verifiers.plain
    };

    let p = auth::presented(&headers, input.query, input.socket);
    if let Some(t) = p.token {
        let _ = verifier.verify(t);
    }
    let _ = auth::query_param(input.query, input.param);
    let _ = auth::query_param(input.query, "token");
    let _ = verifier.verify(input.token);

    let header = input.jwt_header.unwrap_or(br#"{"alg":"HS256","typ":"JWT"}"#);
    let message = format!("{}.{}", b64(header), b64(input.jwt_claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &KEY, Algorithm::HS256)
        .expect("HS256 signing cannot fail");
    let token = format!("{message}.{signature}");
    if let Ok(id) = verifier.verify(&token) {
        assert!(auth::valid_username(&id.user), "accepted a bad subject");
    }
});
