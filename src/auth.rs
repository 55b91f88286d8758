//! Who is calling: where a token may come from, and whether it is valid.
//!
//! Pure and synchronous: it reads request headers and the query string and
//! answers an [`Identity`] or an [`AuthError`]. It never logs a token.

use std::sync::Arc;

use hyper::header::{HeaderMap, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::JwtConfig;

/// The caller, as its token says.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`: what `sender` shows; case-sensitive.
    pub user: Arc<str>,
    /// `role: "service"`: a backend that may post notifications, and a
    /// participant of nothing.
    pub service: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: send 'Authorization: Bearer <jwt>'")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("invalid token: 'sub' must be 1-150 characters of A-Z a-z 0-9 _ . @ + -")]
    BadSubject,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    role: Option<String>,
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
}

/// Verifies tokens with the configured key and algorithm only.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(cfg: &JwtConfig) -> Verifier {
        // `Validation::new` allows exactly one algorithm, so a token signed
        // with any other (or `none`, which does not parse) is refused.
        let mut validation = Validation::new(cfg.algorithm);
        validation.leeway = 60;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.required_spec_claims.clear();
        if cfg.require_exp {
            validation.required_spec_claims.insert("exp".into());
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        Verifier {
            key: cfg.key.clone(),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        if !valid_username(&data.claims.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(Identity {
            user: Arc::from(data.claims.sub),
            service: data.claims.role.as_deref() == Some("service"),
        })
    }
}

/// 1-150 characters of `[A-Za-z0-9_.@+-]`.
pub fn valid_username(s: &str) -> bool {
    (1..=150).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'+' | b'-'))
}

/// Where a request carried its token, and whether it offered the `bearer`
/// subprotocol (which the upgrade must then answer).
#[derive(Debug, Default)]
pub struct Presented<'a> {
    pub token: Option<&'a str>,
    pub offered_bearer: bool,
}

/// Finds the token: `Authorization: Bearer` (any case of the scheme), then
/// `Sec-WebSocket-Protocol: bearer, <jwt>` (sockets only), then `?token=`.
/// First match wins; another scheme such as `Basic` is not a match.
pub fn presented<'a>(headers: &'a HeaderMap, query: Option<&'a str>, socket: bool) -> Presented<'a> {
    let mut out = Presented::default();
    if socket {
        for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
            let Ok(value) = value.to_str() else { continue };
            let mut items = value.split(',').map(str::trim);
            while let Some(item) = items.next() {
                if item == "bearer" {
                    out.offered_bearer = true;
                    if out.token.is_none() {
                        out.token = items.next().filter(|t| !t.is_empty());
                    }
                }
            }
        }
    }
    let from_header = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    if let Some(token) = from_header {
        out.token = Some(token);
    } else if out.token.is_none() {
        out.token = query_param(query, "token");
    }
    out
}

/// The raw value of `name` in a query string. Tokens and ids need no
/// percent-decoding (their alphabets are URL-safe), and a value that does is
/// left as sent, so it fails validation instead of being reinterpreted.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Signs an HS256 token (`parley token`, tests, the load generator).
pub fn issue_hs256(secret: &[u8], user: &str, service: bool, ttl_secs: u64) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = IssuedClaims {
        sub: user,
        exp: now + ttl_secs,
        iat: now,
        role: service.then_some("service"),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn token_sources_in_order() {
        // headers, query, socket?, token found, bearer offered
        type Case<'a> = (
            &'a [(&'a str, &'a str)],
            Option<&'a str>,
            bool,
            Option<&'a str>,
            bool,
        );
        let cases: &[Case] = &[
            (
                &[("authorization", "Bearer a")],
                Some("token=c"),
                true,
                Some("a"),
                false,
            ),
            (&[("authorization", "bEaReR a")], None, true, Some("a"), false),
            (
                &[
                    ("authorization", "Basic x"),
                    ("sec-websocket-protocol", "bearer, b"),
                ],
                Some("token=c"),
                true,
                Some("b"),
                true,
            ),
            (
                &[
                    ("authorization", "Bearer a"),
                    ("sec-websocket-protocol", "bearer"),
                ],
                None,
                true,
                Some("a"),
                true,
            ),
            (
                &[("sec-websocket-protocol", "bearer, b")],
                None,
                false,
                None,
                false,
            ),
            (&[], Some("x=1&token=c"), true, Some("c"), false),
            (&[], None, true, None, false),
        ];
        for (h, q, socket, token, offered) in cases {
            let map = headers(h);
            let p = presented(&map, *q, *socket);
            assert_eq!((p.token, p.offered_bearer), (*token, *offered), "{h:?} {q:?}");
        }
    }

    #[test]
    fn usernames() {
        assert!(valid_username("alice.b+c@d-e_f"));
        assert!(!valid_username(""));
        assert!(!valid_username("a b"));
        assert!(!valid_username(&"a".repeat(151)));
        assert!(valid_username(&"a".repeat(150)));
    }
}
