//! Signed session tokens: the format is described in [`super::session`] (self-describing
//! session ids). A [`SessionSecret`] signs and verifies [`Claims`]; every refusal is a
//! [`TokenError`] (answered as NOT_FOUND by the store).

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::session::random_u64;
use crate::style_aligned::{StyleAligned, StyleScope};

type HmacSha256 = Hmac<Sha256>;

/// The version prefix of session tokens.
pub const TOKEN_PREFIX: &str = "sa1.";
/// Longer ids are refused without decoding (NOT_FOUND).
pub const MAX_TOKEN_LEN: usize = 4096;
/// The shortest accepted secret, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// The HMAC key shared by the replicas of one deployment. `Debug` shows a fingerprint only.
#[derive(Clone)]
pub struct SessionSecret {
    key: Arc<[u8]>,
    random: bool,
}

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionSecret(fingerprint {}{})", self.fingerprint(), if self.random { ", random" } else { "" })
    }
}

impl SessionSecret {
    /// A secret from bytes; surrounding ASCII whitespace (a file's trailing newline) is ignored.
    /// At least [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        let key = bytes.trim_ascii();
        if key.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the session secret has {} bytes; at least {MIN_SECRET_LEN} are required (e.g. `head -c 32 /dev/urandom | base64`)",
                key.len()
            ));
        }
        Ok(Self { key: Arc::from(key), random: false })
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// 32 random bytes from the operating system (single-replica use: tokens signed with it die
    /// with the process and are refused by other replicas).
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // No OS randomness: SipHash keyed by the standard library's per-process random keys.
            for (i, chunk) in key.chunks_mut(8).enumerate() {
                let v = random_u64() ^ (i as u64).rotate_left(17);
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        Self { key: Arc::from(&key[..]), random: true }
    }

    /// Generated at start (no secret configured).
    pub fn is_random(&self) -> bool {
        self.random
    }

    /// A short, non-secret fingerprint (to check in logs that replicas share the secret).
    pub fn fingerprint(&self) -> String {
        let tag = self.mac(b"stylealign session secret fingerprint").finalize().into_bytes();
        tag[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self, data: &[u8]) -> HmacSha256 {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        m.update(data);
        m
    }

    /// The owner field of a token: a keyed hash of the client identity (128 bits, base64url), so
    /// that tokens do not spell out identities.
    pub fn owner_tag(&self, owner: &str) -> String {
        let mut m = self.mac(b"owner\0");
        m.update(owner.as_bytes());
        B64.encode(&m.finalize().into_bytes()[..16])
    }

    /// Signs claims into a token.
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).expect("claims serialize");
        let mut token = String::with_capacity(TOKEN_PREFIX.len() + json.len() * 4 / 3 + 48);
        token.push_str(TOKEN_PREFIX);
        B64.encode_string(&json, &mut token);
        let sig = self.mac(token.as_bytes()).finalize().into_bytes();
        token.push('.');
        B64.encode_string(sig, &mut token);
        token
    }

    /// Verifies a token's signature and decodes its claims (does not check expiry or owner).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Malformed)?;
        let (payload, sig) = rest.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        let signed = &token[..TOKEN_PREFIX.len() + payload.len()];
        // Constant-time comparison (`subtle`, inside `hmac`).
        self.mac(signed.as_bytes()).verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
        let json = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        claims.nonce().ok_or(TokenError::Malformed)?;
        Ok(claims)
    }

    /// Verifies a token for `owner` at `now` (unix seconds): signature, hard expiry, owner, patch.
    pub fn verify_for(&self, token: &str, owner: &str, now: u64) -> Result<Claims, TokenError> {
        let claims = self.verify(token)?;
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        let tag = self.owner_tag(owner);
        if !subtle_eq(tag.as_bytes(), claims.owner.as_bytes()) {
            return Err(TokenError::WrongOwner);
        }
        claims.patch.resolve().map_err(|_| TokenError::Malformed)?;
        Ok(claims)
    }
}

/// Constant-time byte comparison of equal-length slices.
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a session token says. Field names are short: the token travels with every call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// 128 random bits, 32 hex digits: the session's identity (revocation key).
    pub id: String,
    pub model: String,
    pub patch: StyleAligned,
    /// Where and when the patch acts (absent: the default scope).
    #[serde(default, skip_serializing_if = "StyleScope::is_default")]
    pub scope: StyleScope,
    /// The session's LoRAs (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<super::loras::LoraWeight>,
    /// [`SessionSecret::owner_tag`] of the client identity.
    pub owner: String,
    /// Created, unix seconds.
    pub iat: u64,
    /// The idle TTL promised at creation, in milliseconds.
    pub idle_ms: u64,
    /// Hard expiry, unix seconds: refused everywhere from then on.
    pub exp: u64,
}

impl Claims {
    pub(crate) fn nonce(&self) -> Option<u128> {
        if self.id.len() != 32 {
            return None;
        }
        u128::from_str_radix(&self.id, 16).ok()
    }
}

/// Why a token was refused (all of them answer NOT_FOUND; logged at debug level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a session token")]
    Malformed,
    #[error("bad signature (another secret, or altered)")]
    BadSignature,
    #[error("past its hard expiry")]
    Expired,
    #[error("another client's")]
    WrongOwner,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::session::random_id;
    use crate::style_aligned::{NodeOptions, OfficialArgs, ShareAttn, ShareNorm};

    fn secret(s: &str) -> SessionSecret {
        SessionSecret::new(format!("{s:-<40}").as_bytes()).unwrap()
    }

    #[test]
    fn token_round_trips_every_patch() {
        let k = secret("k");
        let patches = [
            StyleAligned::default(),
            StyleAligned::Node(NodeOptions { share_norm: ShareNorm::Group, share_attn: ShareAttn::QKV, scale: 0.3 }),
            StyleAligned::Official(OfficialArgs {
                adain_values: true,
                shared_score_shift: -0.7,
                shared_score_scale: 0.123_456_79,
                only_self_level: 0.25,
                ..Default::default()
            }),
        ];
        for p in patches {
            let c = Claims {
                id: random_id(),
                model: "tiny".into(),
                patch: p,
                scope: Default::default(),
                loras: Vec::new(),
                owner: k.owner_tag("me"),
                iat: 1,
                idle_ms: 5,
                exp: u64::MAX,
            };
            let t = k.sign(&c);
            assert!(t.starts_with(TOKEN_PREFIX) && t.len() < 700, "{t}");
            assert_eq!(k.verify(&t).unwrap(), c);
            assert_eq!(k.verify_for(&t, "me", 2).unwrap().patch, p);
        }
    }

    #[test]
    fn token_carries_the_scope() {
        use crate::style_aligned::{LevelOptions, StepWindow};
        let k = secret("k");
        let scope = StyleScope {
            window: StepWindow { start: 0.1, end: 0.6 },
            levels: vec![
                LevelOptions { name: "up.1".into(), enabled: Some(false), ..Default::default() },
                LevelOptions {
                    name: "down.2".into(),
                    gain: Some(0.5),
                    share_group_norm: Some(false),
                    share_attention: Some(true),
                    ..Default::default()
                },
            ],
        };
        let c = Claims {
            id: random_id(),
            model: "tiny".into(),
            patch: StyleAligned::default(),
            scope: scope.clone(),
            loras: Vec::new(),
            owner: k.owner_tag("me"),
            iat: 1,
            idle_ms: 5,
            exp: u64::MAX,
        };
        let t = k.sign(&c);
        assert_eq!(k.verify_for(&t, "me", 2).unwrap().scope, scope);
        // A token without a scope (the default, and every token made before scopes) reads back the default.
        let plain = Claims { scope: StyleScope::default(), ..c };
        let t = k.sign(&plain);
        assert!(k.verify(&t).unwrap().scope.is_default());
    }

    #[test]
    fn secrets() {
        assert!(SessionSecret::new(b"short").is_err());
        let a = SessionSecret::new(b"0123456789abcdef0123456789abcdef\n").unwrap();
        let b = SessionSecret::new(b"  0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(!format!("{a:?}").contains("0123"));
        let r = SessionSecret::random();
        assert!(r.is_random() && r.fingerprint() != SessionSecret::random().fingerprint());
        assert_ne!(a.owner_tag("x"), r.owner_tag("x"));
        assert_ne!(a.owner_tag("x"), a.owner_tag("y"));
    }
}
