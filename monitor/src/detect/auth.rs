//! Authentication: credentials missing where required, JWT problems (malformed,
//! unsigned, expired, not yet valid, bad signature when keys are configured),
//! credentials over cleartext, credentials in query strings.

use std::{path::Path, time::SystemTime};

use base64::Engine as _;
use globset::GlobSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;

use super::{
    DetectError,
    catalog::{self, RuleInfo},
    config::AuthDoc,
    glob_set,
    inputs::{Input, Location},
};
use crate::secrets::is_secret_name;

/// Keys that verify JWT signatures.
enum Keys {
    None,
    Secret(DecodingKey),
    Set(JwkSet),
}

pub struct Auth {
    required: GlobSet,
    pub login: GlobSet,
    credential_headers: Vec<String>,
    credential_cookies: Vec<String>,
    keys: Keys,
    leeway_s: u64,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// What a request carries by way of credentials.
#[derive(Default)]
pub struct Credentials<'a> {
    /// Every Authorization header, in order: most servers read the first, some another.
    pub authorizations: Vec<&'a str>,
    /// A configured credential header or cookie.
    pub other: bool,
}

impl<'a> Credentials<'a> {
    pub fn present(&self) -> bool {
        !self.authorizations.is_empty() || self.other
    }
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, DetectError> {
    std::fs::read(path).map_err(|source| DetectError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Auth {
    pub fn new(doc: &AuthDoc) -> Result<Self, DetectError> {
        let keys = match (&doc.jwt_secret_file, &doc.jwks_file) {
            (Some(_), Some(_)) => {
                return Err(DetectError::Invalid(
                    "detections.auth: give jwt_secret_file or jwks_file, not both".into(),
                ));
            }
            (Some(path), None) => {
                let mut secret = read_key_file(path)?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                Keys::Secret(DecodingKey::from_secret(&secret))
            }
            (None, Some(path)) => {
                let text = read_key_file(path)?;
                let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
                    DetectError::Invalid(format!("{}: not a JWKS document: {e}", path.display()))
                })?;
                Keys::Set(set)
            }
            (None, None) => Keys::None,
        };
        Ok(Self {
            required: glob_set("detections.auth.required", &doc.required)?,
            login: glob_set("detections.auth.login", &doc.login)?,
            credential_headers: doc
                .credential_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            credential_cookies: doc.credential_cookies.clone(),
            keys,
            leeway_s: doc.jwt_leeway.0.as_secs(),
        })
    }

    /// Whether checks on a request with this response status read its path.
    pub fn needs_path(&self, status: Option<u16>) -> bool {
        !self.required.is_empty() || matches!(status, Some(401 | 403))
    }

    pub fn credentials<'a>(&self, headers: &[(&'a str, &'a str)]) -> Credentials<'a> {
        let mut found = Credentials::default();
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("authorization") {
                found.authorizations.push(value);
            } else if self
                .credential_headers
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            {
                found.other = true;
            } else if name.eq_ignore_ascii_case("cookie") && !self.credential_cookies.is_empty() {
                found.other |= super::inputs::cookies(value)
                    .any(|(cookie, _)| self.credential_cookies.iter().any(|c| c == cookie));
            }
        }
        found
    }

    /// Checks on the request's credentials; `path` is the normalised path. Returns the
    /// `sub` of the first Authorization's bearer token when the configured keys verify
    /// it and it is in its validity period (None without keys): each token is checked
    /// once, its subject trusted only then.
    pub fn scan(
        &self,
        path: &str,
        credentials: &Credentials<'_>,
        now: SystemTime,
        out: &mut Vec<(&'static RuleInfo, String)>,
    ) -> Option<String> {
        if !credentials.present() && !self.required.is_empty() && self.required.is_match(path) {
            out.push((catalog::AUTH_MISSING, String::new()));
        }
        if let Some(authorization) = credentials.authorizations.first() {
            let scheme = authorization.split(' ').next().unwrap_or_default();
            if scheme.eq_ignore_ascii_case("basic") || scheme.eq_ignore_ascii_case("bearer") {
                out.push((catalog::CLEARTEXT_CREDENTIALS, scheme.to_owned()));
            }
        }
        let mut subject = None;
        for (index, authorization) in credentials.authorizations.iter().enumerate() {
            let Some(token) = bearer_token(authorization).filter(|t| looks_like_jwt(t)) else {
                continue;
            };
            match self.check_jwt(token, now) {
                Err(problem) => out.push(problem),
                // Only a signature the configured keys verify makes a subject trusted.
                Ok(claims) if index == 0 && !matches!(self.keys, Keys::None) => {
                    subject = claims
                        .get("sub")
                        .and_then(|s| s.as_str())
                        .map(str::to_owned);
                }
                Ok(_) => {}
            }
        }
        subject
    }

    /// A JWT's claims, or the first problem with it (malformed, unsigned, out of its
    /// validity period, or a signature the configured keys do not verify).
    fn check_jwt(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<serde_json::Value, (&'static RuleInfo, String)> {
        let malformed = |why: &str| (catalog::JWT_MALFORMED, why.to_owned());
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three parts"));
        };
        let header: JwtHeader =
            decode_part(header).ok_or_else(|| malformed("header is not base64url JSON"))?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err((catalog::JWT_ALG_NONE, header.alg));
        }
        let claims: serde_json::Value =
            decode_part(payload).ok_or_else(|| malformed("payload is not base64url JSON"))?;
        let now_s = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let leeway = self.leeway_s as f64;
        let time = |claim: &str| claims.get(claim).and_then(serde_json::Value::as_f64);
        if time("exp").is_some_and(|exp| exp + leeway < now_s) {
            return Err((catalog::JWT_EXPIRED, String::new()));
        }
        if [time("nbf"), time("iat")]
            .into_iter()
            .flatten()
            .any(|t| t - leeway > now_s)
        {
            return Err((catalog::JWT_NOT_YET_VALID, String::new()));
        }
        self.verify_signature(token, &header)
            .map_err(|why| (catalog::JWT_SIGNATURE, why))?;
        Ok(claims)
    }

    fn verify_signature(&self, token: &str, header: &JwtHeader) -> Result<(), String> {
        if matches!(self.keys, Keys::None) {
            return Ok(());
        }
        let algorithm: Algorithm = header
            .alg
            .parse()
            .map_err(|_| format!("unsupported alg {}", header.alg))?;
        let key = match &self.keys {
            Keys::None => return Ok(()),
            Keys::Secret(key) => {
                if algorithm != Algorithm::HS256 {
                    return Err(format!("alg {} where HS256 is configured", header.alg));
                }
                key.clone()
            }
            Keys::Set(set) => {
                let jwk = match &header.kid {
                    Some(kid) => set.find(kid),
                    None => set.keys.first(),
                }
                .ok_or("no key with this kid")?;
                DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?
            }
        };
        if matches!(
            algorithm,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) && matches!(self.keys, Keys::Set(_))
        {
            // An HMAC token checked with a public key is the alg-confusion attack.
            return Err(format!("alg {} with public keys configured", header.alg));
        }
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The token of a `Bearer` Authorization value (the scheme is case-insensitive).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A JWT's claims read without verifying it: good enough to count by, never to trust.
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    decode_part(token.split('.').nth(1)?)
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Option<T> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Compact JWS shape: `eyJ` (a base64url JSON object) and dots.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.contains('.')
}

/// A credential in a query parameter: a credential's name, or a JWT as the value.
pub fn in_query(input: &Input<'_>) -> bool {
    // Not `sig`/`signature` (presigned URLs carry proofs, not credentials), nor `key`,
    // `auth` or `session` (too often something else) unless the value is opaque.
    const AMBIGUOUS: &[&str] = &["sig", "signature", "key", "auth", "session"];
    if input.location != Location::Query {
        return false;
    }
    let opaque = input.value.len() >= 20
        && input
            .value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.=".contains(&b));
    let named = is_secret_name(&input.name)
        && (opaque || !AMBIGUOUS.iter().any(|n| input.name.eq_ignore_ascii_case(n)));
    named || (looks_like_jwt(&input.value) && input.value.matches('.').count() == 2)
}
