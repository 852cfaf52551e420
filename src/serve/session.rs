//! The session store. A session is a model name plus a [`StyleAligned`] value: plain data, no
//! weights (a patched model is the shared base weights plus this value), so it costs a few
//! hundred bytes.
//!
//! Sessions belong to a client identity; looking up another client's session id answers "not
//! found", exactly as an unknown id does, so ids leak nothing across clients.
//!
//! Limits:
//! - idle TTL: a session unused for `ttl` is gone (checked on access, and swept periodically);
//! - per-client cap: creating one more session **evicts that client's least recently used
//!   session** (eviction never crosses client boundaries);
//! - global cap: creating one more session when the store is full (after removing expired
//!   ones) is **refused** ([`SessionError::GlobalCap`] → RESOURCE_EXHAUSTED): one client's
//!   activity never destroys another client's sessions.
//!
//! # Self-describing session ids (scale-out)
//!
//! A session id is a signed token that carries the whole session, so that any replica sharing
//! the secret can serve it without a shared store:
//!
//! ```text
//! sa1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, "sa1." + base64url(JSON claims)))>
//! claims: {"id": 128-bit nonce (hex), "model", "patch": StyleAligned, "scope": StyleScope (absent
//!          when default), "owner": keyed hash of the client identity, "iat": created (unix s),
//!          "idle_ms": idle TTL, "exp": hard expiry (unix s)}
//! ```
//!
//! A replica that does not hold an id (a lookup miss) verifies the token (constant-time MAC
//! compare, then the hard expiry, then the owner) and **adopts** it into its local store, where it
//! counts against the caps like a created session and gets a fresh idle TTL (the token cannot
//! know when the session was last used elsewhere; adoption happens because the client is using
//! it right now). Every failure is NOT_FOUND, exactly like an unknown id.
//!
//! A replica never brings back a session it has itself seen end: release, eviction and idle
//! expiry record the session's nonce in a local revocation set (bounded, pruned at each token's
//! hard expiry). Other replicas do not learn of it: a session released on one replica stays
//! usable on the others until its hard expiry (`exp`, the creating replica's
//! `--max-session-lifetime-secs` after creation), after which every replica refuses it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use super::token::{Claims, MAX_TOKEN_LEN, MIN_SECRET_LEN, SessionSecret, TOKEN_PREFIX, TokenError};
use crate::style_aligned::{StyleAligned, StyleScope};

/// The default hard lifetime of a session (`--max-session-lifetime-secs`).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A session: cheap to clone (shared strings, small values; the default scope allocates nothing).
#[derive(Clone, Debug)]
pub struct Session {
    /// The token (`sa1.…`).
    pub id: Arc<str>,
    pub owner: Arc<str>,
    pub model: Arc<str>,
    pub patch: StyleAligned,
    /// Where and when the patch acts.
    pub scope: StyleScope,
    /// LoRAs (names and weights; each batch resolves them to the loaded LoRAs).
    pub loras: Vec<super::loras::LoraWeight>,
    pub created: SystemTime,
    /// Expiry if left idle from now on (never after `hard_expires`).
    pub expires: SystemTime,
    /// The idle TTL this replica applies to the session.
    pub idle_ttl: Duration,
    /// The token's hard expiry: no replica accepts the session afterwards.
    pub hard_expires: SystemTime,
}

impl Session {
    /// A short, stable handle for logs: the token's last 16 characters (from its signature).
    pub fn short_id(&self) -> &str {
        let id: &str = &self.id;
        match id.char_indices().rev().nth(15) {
            Some((i, _)) => &id[i..],
            None => id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("session {0:?} not found (unknown, expired, released, evicted, or another client's)")]
    NotFound(String),
    #[error("the server holds its maximum of {0} sessions; release sessions or retry later")]
    GlobalCap(usize),
}

/// How an id is shown in errors and logs: tokens are long, so only their start.
pub fn shown(id: &str) -> String {
    match id.char_indices().nth(24) {
        Some((i, _)) => format!("{}…", &id[..i]),
        None => id.to_string(),
    }
}

fn not_found(id: &str) -> SessionError {
    SessionError::NotFound(shown(id))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

struct Entry {
    session: Session,
    last_used: Instant,
    nonce: u128,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<Arc<str>, Entry>,
    by_owner: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Sessions seen ending here (released, evicted, expired): nonce → hard expiry (unix s).
    revoked: HashMap<u128, u64>,
}

impl Inner {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.by_id.remove(id)?;
        if let Some(set) = self.by_owner.get_mut(&e.session.owner) {
            set.remove(id);
            if set.is_empty() {
                self.by_owner.remove(&e.session.owner);
            }
        }
        Some(e)
    }

    /// Removes the session and remembers it ended (until its hard expiry).
    fn end(&mut self, id: &str, max_revoked: usize) -> Option<Entry> {
        let e = self.remove(id)?;
        self.revoke(e.nonce, unix_secs(e.session.hard_expires), max_revoked);
        Some(e)
    }

    fn revoke(&mut self, nonce: u128, exp: u64, max_revoked: usize) {
        if self.revoked.len() >= max_revoked && !self.revoked.contains_key(&nonce) {
            let now = unix_secs(SystemTime::now());
            self.revoked.retain(|_, &mut x| x > now);
            if self.revoked.len() >= max_revoked {
                // Full of live entries: forget the one closest to its hard expiry.
                if let Some(k) = self.revoked.iter().min_by_key(|(_, x)| **x).map(|(k, _)| *k) {
                    self.revoked.remove(&k);
                }
            }
        }
        self.revoked.insert(nonce, exp);
    }
}

/// Counters of what happened to sessions (besides the live count).
#[derive(Debug, Default)]
pub struct SessionCounters {
    pub created: AtomicU64,
    /// Sessions created elsewhere (another replica, or before a restart) taken into this store
    /// from their token.
    pub adopted: AtomicU64,
    pub released: AtomicU64,
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
}

pub struct SessionStore {
    inner: Mutex<Inner>,
    ttl: Duration,
    per_client: usize,
    global: usize,
    secret: SessionSecret,
    max_lifetime: Duration,
    max_revoked: usize,
    pub counters: SessionCounters,
}

impl SessionStore {
    /// A store with a random secret (tokens valid in this process only) and the default hard
    /// lifetime.
    pub fn new(ttl: Duration, per_client: usize, global: usize) -> Self {
        Self::with_secret(ttl, per_client, global, SessionSecret::random(), DEFAULT_MAX_LIFETIME)
    }

    /// A store whose tokens are signed with `secret` (shared by the replicas of a deployment) and
    /// expire for good `max_lifetime` after creation.
    pub fn with_secret(ttl: Duration, per_client: usize, global: usize, secret: SessionSecret, max_lifetime: Duration) -> Self {
        let global = global.max(1);
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            per_client: per_client.max(1),
            global,
            secret,
            max_lifetime: max_lifetime.max(Duration::from_secs(1)),
            max_revoked: global.saturating_mul(16).max(4096),
            counters: SessionCounters::default(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    pub fn secret(&self) -> &SessionSecret {
        &self.secret
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that matters
        // more than refusing every later call: keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expired(&self, e: &Entry, now: Instant, wall: SystemTime) -> bool {
        now.duration_since(e.last_used) >= e.session.idle_ttl || wall >= e.session.hard_expires
    }

    /// Makes room for one more session of `owner`: its expired sessions go, then its LRU ones
    /// while at the per-client cap; then the global cap (after a sweep) refuses.
    fn make_room(&self, g: &mut Inner, owner: &Arc<str>, now: Instant, wall: SystemTime) -> Result<(), SessionError> {
        let mine: Vec<Arc<str>> = g.by_owner.get(owner).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        for id in &mine {
            if g.by_id.get(id).is_some_and(|e| self.expired(e, now, wall)) {
                g.end(id, self.max_revoked);
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
            }
        }
        while g.by_owner.get(owner).map_or(0, |s| s.len()) >= self.per_client {
            let lru = g.by_owner[owner].iter().min_by_key(|id| g.by_id[*id].last_used).cloned();
            match lru {
                Some(id) => {
                    g.end(&id, self.max_revoked);
                    self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        if g.by_id.len() >= self.global {
            self.sweep_locked(g, now, wall);
            if g.by_id.len() >= self.global {
                return Err(SessionError::GlobalCap(self.global));
            }
        }
        Ok(())
    }

    fn interned_owner(g: &Inner, owner: &str) -> Arc<str> {
        match g.by_owner.get_key_value(owner) {
            Some((k, _)) => k.clone(),
            None => Arc::from(owner),
        }
    }

    /// Creates a session for `owner` (the default scope).
    pub fn create(&self, owner: &str, model: &str, patch: StyleAligned) -> Result<Session, SessionError> {
        self.create_scoped(owner, model, patch, StyleScope::default())
    }

    /// Creates a session for `owner` whose patch acts within `scope`.
    pub fn create_scoped(&self, owner: &str, model: &str, patch: StyleAligned, scope: StyleScope) -> Result<Session, SessionError> {
        self.create_with_loras(owner, model, patch, scope, Vec::new())
    }

    /// [`create_scoped`](Self::create_scoped) with LoRAs (checked by the caller).
    pub fn create_with_loras(
        &self,
        owner: &str,
        model: &str,
        patch: StyleAligned,
        scope: StyleScope,
        loras: Vec<super::loras::LoraWeight>,
    ) -> Result<Session, SessionError> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let iat = unix_secs(wall);
        let exp = iat.saturating_add(self.max_lifetime.as_secs().max(1));
        let owner_tag = self.secret.owner_tag(owner);
        let mut g = self.lock();
        let owner: Arc<str> = Self::interned_owner(&g, owner);
        self.make_room(&mut g, &owner, now, wall)?;
        let (nonce, id) = loop {
            let nonce = (random_u64() as u128) << 64 | random_u64() as u128;
            if g.revoked.contains_key(&nonce) {
                continue;
            }
            let claims = Claims {
                id: format!("{nonce:032x}"),
                model: model.to_string(),
                patch,
                scope: scope.clone(),
                loras: loras.clone(),
                owner: owner_tag.clone(),
                iat,
                idle_ms: self.ttl.as_millis() as u64,
                exp,
            };
            let id: Arc<str> = Arc::from(self.secret.sign(&claims));
            if !g.by_id.contains_key(&id) {
                break (nonce, id);
            }
        };
        let created = UNIX_EPOCH + Duration::from_secs(iat);
        let hard_expires = UNIX_EPOCH + Duration::from_secs(exp);
        let session = Session {
            id: id.clone(),
            owner: owner.clone(),
            model: Arc::from(model),
            patch,
            scope,
            loras,
            created,
            expires: (wall + self.ttl).min(hard_expires),
            idle_ttl: self.ttl,
            hard_expires,
        };
        g.by_owner.entry(owner).or_default().insert(id.clone());
        g.by_id.insert(id, Entry { session: session.clone(), last_used: now, nonce });
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(session)
    }

    /// The session, if it exists (here, or as a valid token of this deployment), belongs to
    /// `owner` and has not expired; touches it.
    ///
    /// A valid token this store does not hold is adopted (counting against the caps: the global
    /// cap answers [`SessionError::GlobalCap`]), unless this store has seen it end.
    pub fn get(&self, owner: &str, id: &str) -> Result<Session, SessionError> {
        if let Some(r) = self.get_local(owner, id) {
            return r;
        }
        // A miss: is it a session of this deployment?
        let wall = SystemTime::now();
        let claims = match self.secret.verify_for(id, owner, unix_secs(wall)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(session = %shown(id), reason = %e, "session token refused");
                return Err(not_found(id));
            }
        };
        self.adopt(owner, id, claims, wall)
    }

    /// `None`: not held here.
    fn get_local(&self, owner: &str, id: &str) -> Option<Result<Session, SessionError>> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut g = self.lock();
        let e = g.by_id.get(id)?;
        if &*e.session.owner != owner {
            return Some(Err(not_found(id)));
        }
        if self.expired(e, now, wall) {
            g.end(id, self.max_revoked);
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
            return Some(Err(not_found(id)));
        }
        let e = g.by_id.get_mut(id).expect("present");
        e.last_used = now;
        e.session.expires = (wall + e.session.idle_ttl).min(e.session.hard_expires);
        Some(Ok(e.session.clone()))
    }

    fn adopt(&self, owner: &str, id: &str, claims: Claims, wall: SystemTime) -> Result<Session, SessionError> {
        let nonce = claims.nonce().ok_or_else(|| not_found(id))?;
        let now = Instant::now();
        let mut g = self.lock();
        if g.revoked.contains_key(&nonce) {
            return Err(not_found(id));
        }
        if g.by_id.contains_key(id) {
            // Adopted by a concurrent call meanwhile.
            drop(g);
            return self.get_local(owner, id).unwrap_or_else(|| Err(not_found(id)));
        }
        let owner: Arc<str> = Self::interned_owner(&g, owner);
        self.make_room(&mut g, &owner, now, wall)?;
        // Never idle longer than this replica's own TTL.
        let idle_ttl = Duration::from_millis(claims.idle_ms).min(self.ttl);
        let hard_expires = UNIX_EPOCH + Duration::from_secs(claims.exp);
        let id: Arc<str> = Arc::from(id);
        let session = Session {
            id: id.clone(),
            owner: owner.clone(),
            model: Arc::from(claims.model.as_str()),
            patch: claims.patch,
            scope: claims.scope,
            loras: claims.loras,
            created: UNIX_EPOCH + Duration::from_secs(claims.iat),
            expires: (wall + idle_ttl).min(hard_expires),
            idle_ttl,
            hard_expires,
        };
        g.by_owner.entry(owner).or_default().insert(id.clone());
        g.by_id.insert(id, Entry { session: session.clone(), last_used: now, nonce });
        self.counters.adopted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = %session.short_id(), model = %session.model, "session adopted from its token");
        Ok(session)
    }

    /// Drops the session (only its owner can) and remembers that it ended, so that this replica
    /// refuses its token from now on. A valid token this store does not hold is revoked here too.
    pub fn release(&self, owner: &str, id: &str) -> Result<(), SessionError> {
        let now = Instant::now();
        let wall = SystemTime::now();
        {
            let mut g = self.lock();
            match g.by_id.get(id) {
                Some(e) if &*e.session.owner == owner => {
                    let expired = self.expired(e, now, wall);
                    g.end(id, self.max_revoked);
                    return if expired {
                        self.counters.expired.fetch_add(1, Ordering::Relaxed);
                        Err(not_found(id))
                    } else {
                        self.counters.released.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    };
                }
                Some(_) => return Err(not_found(id)),
                None => {}
            }
        }
        let claims = self.secret.verify_for(id, owner, unix_secs(wall)).map_err(|_| not_found(id))?;
        let nonce = claims.nonce().ok_or_else(|| not_found(id))?;
        let mut g = self.lock();
        if g.revoked.contains_key(&nonce) {
            return Err(not_found(id));
        }
        if g.by_id.contains_key(id) {
            drop(g);
            return self.release(owner, id);
        }
        g.revoke(nonce, claims.exp, self.max_revoked);
        self.counters.released.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Removes expired sessions and revocations past their hard expiry; returns how many
    /// sessions.
    pub fn sweep(&self) -> usize {
        let mut g = self.lock();
        let wall = SystemTime::now();
        let n = self.sweep_locked(&mut g, Instant::now(), wall);
        let now = unix_secs(wall);
        g.revoked.retain(|_, &mut x| x > now);
        n
    }

    fn sweep_locked(&self, g: &mut Inner, now: Instant, wall: SystemTime) -> usize {
        let dead: Vec<Arc<str>> = g.by_id.iter().filter(|(_, e)| self.expired(e, now, wall)).map(|(k, _)| k.clone()).collect();
        for id in &dead {
            g.end(id, self.max_revoked);
        }
        self.counters.expired.fetch_add(dead.len() as u64, Ordering::Relaxed);
        dead.len()
    }

    /// Live sessions (including expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions of one client.
    pub fn count_for(&self, owner: &str) -> usize {
        self.lock().by_owner.get(owner).map_or(0, |s| s.len())
    }

    /// Sessions remembered as ended (refused here until their hard expiry).
    pub fn revoked_len(&self) -> usize {
        self.lock().revoked.len()
    }
}

static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 unpredictable bits: SipHash, keyed randomly per process by the standard library, of a
/// counter and the clock.
pub(crate) fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(ID_COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// A 128-bit random id, 32 hex digits.
pub fn random_id() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::style_aligned::NodeOptions;

    fn store(ttl_ms: u64, per_client: usize, global: usize) -> SessionStore {
        SessionStore::new(Duration::from_millis(ttl_ms), per_client, global)
    }

    fn secret(s: &str) -> SessionSecret {
        SessionSecret::new(format!("{s:-<40}").as_bytes()).unwrap()
    }

    fn replica(secret: &SessionSecret) -> SessionStore {
        SessionStore::with_secret(Duration::from_secs(60), 4, 10, secret.clone(), DEFAULT_MAX_LIFETIME)
    }

    #[test]
    fn owner_scoping() {
        let s = store(60_000, 4, 10);
        let a = s.create("alice", "tiny", StyleAligned::default()).unwrap();
        assert!(a.id.starts_with(TOKEN_PREFIX));
        assert!(s.get("alice", &a.id).is_ok());
        assert!(matches!(s.get("bob", &a.id), Err(SessionError::NotFound(_))));
        assert!(s.release("bob", &a.id).is_err());
        assert!(s.release("alice", &a.id).is_ok());
        assert!(s.get("alice", &a.id).is_err());
        assert!(s.release("alice", &a.id).is_err());
    }

    #[test]
    fn per_client_cap_evicts_own_lru() {
        let s = store(60_000, 2, 10);
        let a1 = s.create("alice", "tiny", StyleAligned::default()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let a2 = s.create("alice", "tiny", StyleAligned::default()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let b1 = s.create("bob", "tiny", StyleAligned::default()).unwrap();
        s.get("alice", &a1.id).unwrap(); // a1 is now more recent than a2
        std::thread::sleep(Duration::from_millis(2));
        let a3 = s.create("alice", "tiny", StyleAligned::default()).unwrap();
        assert!(s.get("alice", &a2.id).is_err(), "LRU evicted (and not re-adopted from its token)");
        assert!(s.get("alice", &a1.id).is_ok());
        assert!(s.get("alice", &a3.id).is_ok());
        assert!(s.get("bob", &b1.id).is_ok(), "other clients untouched");
        assert_eq!(s.count_for("alice"), 2);
        assert_eq!(s.counters.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(s.counters.adopted.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn global_cap_refuses() {
        let s = store(60_000, 5, 3);
        for c in ["a", "b", "c"] {
            s.create(c, "tiny", StyleAligned::default()).unwrap();
        }
        assert_eq!(s.create("d", "tiny", StyleAligned::default()).unwrap_err(), SessionError::GlobalCap(3));
        // The same client at the global cap: still refused (no eviction across the store)...
        assert!(s.create("a", "tiny", StyleAligned::default()).is_err());
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn ttl_expires_and_frees_capacity() {
        let s = store(30, 5, 1);
        let a = s.create("a", "tiny", StyleAligned::default()).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.get("a", &a.id).is_err());
        let _b = s.create("b", "tiny", StyleAligned::default()).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        // Expired sessions do not count against the global cap.
        s.create("c", "tiny", StyleAligned::default()).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(s.sweep(), 1);
        assert!(s.is_empty());
        // ...and stay gone: their tokens are not adopted back.
        assert!(s.get("a", &a.id).is_err());
        assert_eq!(s.revoked_len(), 3);
    }

    #[test]
    fn use_pushes_expiry_back() {
        let s = store(60, 5, 5);
        let a = s.create("a", "tiny", StyleAligned::default()).unwrap();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(25));
            s.get("a", &a.id).unwrap();
        }
    }

    #[test]
    fn ids_are_distinct() {
        let ids: HashSet<String> = (0..1000).map(|_| random_id()).collect();
        assert_eq!(ids.len(), 1000);
        let s = store(60_000, 1000, 1000);
        let tokens: HashSet<Arc<str>> = (0..500).map(|_| s.create("a", "tiny", StyleAligned::default()).unwrap().id).collect();
        assert_eq!(tokens.len(), 500);
    }

    #[test]
    fn another_replica_adopts_with_the_same_secret_only() {
        let k = secret("shared");
        let (a, b) = (replica(&k), replica(&k));
        let patch = StyleAligned::Node(NodeOptions { scale: 0.5, ..Default::default() });
        let s = a.create("alice", "tiny", patch).unwrap();
        let got = b.get("alice", &s.id).unwrap();
        assert_eq!((got.model.as_ref(), got.patch, got.created), ("tiny", patch, s.created));
        assert_eq!(got.hard_expires, s.hard_expires);
        assert_eq!(b.counters.adopted.load(Ordering::Relaxed), 1);
        assert_eq!(b.len(), 1);
        b.get("alice", &s.id).unwrap();
        assert_eq!(b.counters.adopted.load(Ordering::Relaxed), 1, "held now");
        // Another client: not found, and not adopted.
        let c = replica(&k);
        assert!(matches!(c.get("bob", &s.id), Err(SessionError::NotFound(_))));
        assert!(c.is_empty());
        // Another secret.
        let other = replica(&secret("other"));
        assert!(other.get("alice", &s.id).is_err());
        // An altered token: any byte of the signature, or of the payload.
        let bytes = s.id.as_bytes();
        for i in [bytes.len() - 1, bytes.len() - 10, TOKEN_PREFIX.len() + 3] {
            let mut t = bytes.to_vec();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            assert!(matches!(k.verify(&t).unwrap_err(), TokenError::BadSignature | TokenError::Malformed));
            assert!(c.get("alice", &t).is_err());
        }
        for junk in ["", "sa1.", "sa1..", "sa1.x.y", "0123456789abcdef0123456789abcdef", &"a".repeat(10_000)] {
            assert!(c.get("alice", junk).is_err());
        }
    }

    #[test]
    fn release_is_local_and_sticky() {
        let k = secret("shared");
        let (a, b) = (replica(&k), replica(&k));
        let s = a.create("alice", "tiny", StyleAligned::default()).unwrap();
        b.get("alice", &s.id).unwrap();
        a.release("alice", &s.id).unwrap();
        assert!(a.get("alice", &s.id).is_err(), "released here: never adopted back");
        assert!(b.get("alice", &s.id).is_ok(), "other replicas learn nothing (documented)");
        // Releasing a token this replica never held revokes it here.
        let c = replica(&k);
        assert!(c.release("bob", &s.id).is_err());
        c.release("alice", &s.id).unwrap();
        assert!(c.get("alice", &s.id).is_err());
        assert!(c.release("alice", &s.id).is_err());
        assert_eq!(c.counters.released.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn hard_expiry_is_refused_everywhere() {
        let k = secret("shared");
        let now = unix_secs(SystemTime::now());
        let b = replica(&k);
        let expired = Claims {
            id: random_id(),
            model: "tiny".into(),
            patch: StyleAligned::default(),
            scope: Default::default(),
            loras: Vec::new(),
            owner: k.owner_tag("alice"),
            iat: now - 100,
            idle_ms: 60_000,
            exp: now - 1,
        };
        let t = k.sign(&expired);
        assert_eq!(k.verify_for(&t, "alice", now).unwrap_err(), TokenError::Expired);
        assert!(b.get("alice", &t).is_err());
        let fresh = Claims { exp: now + 100, ..expired };
        assert!(b.get("alice", &k.sign(&fresh)).is_ok());
        // A held session past its hard expiry goes too.
        let s = SessionStore::with_secret(Duration::from_secs(60), 4, 10, k.clone(), Duration::from_secs(1));
        let a = s.create("alice", "tiny", StyleAligned::default()).unwrap();
        assert!(a.expires <= a.hard_expires);
        std::thread::sleep(a.hard_expires.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(20));
        assert!(s.get("alice", &a.id).is_err());
    }

    #[test]
    fn adoption_counts_against_caps() {
        let k = secret("shared");
        let a = SessionStore::with_secret(Duration::from_secs(60), 8, 8, k.clone(), DEFAULT_MAX_LIFETIME);
        let b = SessionStore::with_secret(Duration::from_secs(60), 2, 3, k.clone(), DEFAULT_MAX_LIFETIME);
        let ids: Vec<_> = (0..3).map(|_| a.create("alice", "tiny", StyleAligned::default()).unwrap().id).collect();
        for id in &ids {
            b.get("alice", id).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(b.count_for("alice"), 2, "per-client cap: the LRU adopted one was evicted");
        assert!(b.get("alice", &ids[0]).is_err(), "evicted here stays evicted here");
        let others: Vec<_> = (0..2).map(|i| a.create(&format!("c{i}"), "tiny", StyleAligned::default()).unwrap().id).collect();
        b.get("c0", &others[0]).unwrap();
        assert_eq!(b.get("c1", &others[1]).unwrap_err(), SessionError::GlobalCap(3));
        // The idle TTL of an adopted session is the token's, at most this replica's.
        let short = SessionStore::with_secret(Duration::from_millis(50), 8, 8, k.clone(), DEFAULT_MAX_LIFETIME);
        let got = short.get("alice", &ids[1]).unwrap();
        assert_eq!(got.idle_ttl, Duration::from_millis(50));
    }

    #[test]
    fn revocations_are_bounded() {
        let k = secret("shared");
        let s = SessionStore::with_secret(Duration::from_secs(60), 100_000, 1, k, DEFAULT_MAX_LIFETIME);
        assert_eq!(s.max_revoked, 4096);
        for _ in 0..5000 {
            let a = s.create("a", "tiny", StyleAligned::default()).unwrap();
            s.release("a", &a.id).unwrap();
        }
        assert!(s.revoked_len() <= 4096);
    }
}
