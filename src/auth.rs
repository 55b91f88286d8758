//! Who is calling: where a token may come from, and whether it is valid.
//!
//! Pure and synchronous: it reads request headers and the query string and
//! answers an [`Identity`] or an [`AuthError`]. It never logs a token.

use std::sync::Arc;

use hyper::header::{HeaderMap, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

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

/// The algorithms parley accepts: one per server, chosen by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
    EdDsa,
}

impl JwtAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
            JwtAlgorithm::EdDsa => "EdDSA",
        }
    }

    fn library(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
            JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// `--jwt-algorithm`'s value; HS256 when absent.
pub fn parse_algorithm(name: Option<&str>) -> Result<JwtAlgorithm, String> {
    Ok(match name {
        None | Some("HS256") => JwtAlgorithm::Hs256,
        Some("RS256") => JwtAlgorithm::Rs256,
        Some("ES256") => JwtAlgorithm::Es256,
        Some("EdDSA") => JwtAlgorithm::EdDsa,
        Some(other) => return Err(format!("'{other}' is not one of HS256, RS256, ES256, EdDSA")),
    })
}

/// Where the verification key comes from.
pub enum KeySource {
    /// HS256's shared secret.
    Secret(Vec<u8>),
    /// The public key (PEM) of RS256, ES256 or EdDSA.
    PublicKeyPem(Vec<u8>),
}

/// How tokens are verified: built here, since this module is the only one
/// that knows the token library.
#[derive(Clone)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    key: DecodingKey,
    /// Present for HS256 only: lets `parley token` and tests sign.
    pub secret: Option<Vec<u8>>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub require_exp: bool,
}

impl JwtConfig {
    /// Parses the key; the error says why it is not a key of `algorithm`.
    pub fn new(
        algorithm: JwtAlgorithm,
        source: KeySource,
        audience: Option<String>,
        issuer: Option<String>,
        require_exp: bool,
    ) -> Result<JwtConfig, String> {
        let (key, secret) = match source {
            KeySource::Secret(s) => (DecodingKey::from_secret(&s), Some(s)),
            KeySource::PublicKeyPem(pem) => {
                let key = match algorithm {
                    JwtAlgorithm::Rs256 => DecodingKey::from_rsa_pem(&pem),
                    JwtAlgorithm::Es256 => DecodingKey::from_ec_pem(&pem),
                    JwtAlgorithm::EdDsa => DecodingKey::from_ed_pem(&pem),
                    JwtAlgorithm::Hs256 => return Err("HS256 takes a secret, not a public key".into()),
                };
                (key.map_err(|e| e.to_string())?, None)
            }
        };
        Ok(JwtConfig {
            algorithm,
            key,
            secret,
            audience,
            issuer,
            require_exp,
        })
    }
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
        let mut validation = Validation::new(cfg.algorithm.library());
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
