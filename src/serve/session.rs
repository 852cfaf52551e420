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

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::style_aligned::StyleAligned;

/// A session: cheap to clone (shared strings, a small `Copy` value).
#[derive(Clone, Debug)]
pub struct Session {
    pub id: Arc<str>,
    pub owner: Arc<str>,
    pub model: Arc<str>,
    pub patch: StyleAligned,
    pub created: SystemTime,
    /// Expiry if left idle from now on.
    pub expires: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("session {0:?} not found (unknown, expired, released, evicted, or another client's)")]
    NotFound(String),
    #[error("the server holds its maximum of {0} sessions; release sessions or retry later")]
    GlobalCap(usize),
}

struct Entry {
    session: Session,
    last_used: Instant,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<Arc<str>, Entry>,
    by_owner: HashMap<Arc<str>, HashSet<Arc<str>>>,
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
}

/// Counters of what happened to sessions (besides the live count).
#[derive(Debug, Default)]
pub struct SessionCounters {
    pub created: AtomicU64,
    pub released: AtomicU64,
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
}

pub struct SessionStore {
    inner: Mutex<Inner>,
    ttl: Duration,
    per_client: usize,
    global: usize,
    pub counters: SessionCounters,
}

impl SessionStore {
    pub fn new(ttl: Duration, per_client: usize, global: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), ttl, per_client: per_client.max(1), global: global.max(1), counters: SessionCounters::default() }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that matters
        // more than refusing every later call: keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expired(&self, e: &Entry, now: Instant) -> bool {
        now.duration_since(e.last_used) >= self.ttl
    }

    /// Creates a session for `owner`.
    pub fn create(&self, owner: &str, model: &str, patch: StyleAligned) -> Result<Session, SessionError> {
        let now = Instant::now();
        let mut g = self.lock();
        let owner: Arc<str> = match g.by_owner.get_key_value(owner) {
            Some((k, _)) => k.clone(),
            None => Arc::from(owner),
        };
        // The owner's own expired sessions first, then its LRU one if at the cap.
        let mine: Vec<Arc<str>> = g.by_owner.get(&owner).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        for id in &mine {
            if g.by_id.get(id).is_some_and(|e| self.expired(e, now)) {
                g.remove(id);
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
            }
        }
        while g.by_owner.get(&owner).map_or(0, |s| s.len()) >= self.per_client {
            let lru = g.by_owner[&owner].iter().min_by_key(|id| g.by_id[*id].last_used).cloned();
            match lru {
                Some(id) => {
                    g.remove(&id);
                    self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        if g.by_id.len() >= self.global {
            self.sweep_locked(&mut g, now);
            if g.by_id.len() >= self.global {
                return Err(SessionError::GlobalCap(self.global));
            }
        }
        let id: Arc<str> = loop {
            let id: Arc<str> = Arc::from(random_id().as_str());
            if !g.by_id.contains_key(&id) {
                break id;
            }
        };
        let created = SystemTime::now();
        let session = Session { id: id.clone(), owner: owner.clone(), model: Arc::from(model), patch, created, expires: created + self.ttl };
        g.by_owner.entry(owner).or_default().insert(id.clone());
        g.by_id.insert(id, Entry { session: session.clone(), last_used: now });
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(session)
    }

    /// The session, if it exists, belongs to `owner` and has not expired; touches it.
    pub fn get(&self, owner: &str, id: &str) -> Result<Session, SessionError> {
        let now = Instant::now();
        let mut g = self.lock();
        let not_found = || SessionError::NotFound(id.to_string());
        let e = g.by_id.get(id).ok_or_else(not_found)?;
        if &*e.session.owner != owner {
            return Err(not_found());
        }
        if self.expired(e, now) {
            g.remove(id);
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
            return Err(not_found());
        }
        let e = g.by_id.get_mut(id).expect("present");
        e.last_used = now;
        e.session.expires = SystemTime::now() + self.ttl;
        Ok(e.session.clone())
    }

    /// Drops the session (only its owner can).
    pub fn release(&self, owner: &str, id: &str) -> Result<(), SessionError> {
        let mut g = self.lock();
        match g.by_id.get(id) {
            Some(e) if &*e.session.owner == owner => {
                let expired = self.expired(e, Instant::now());
                g.remove(id);
                if expired {
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    Err(SessionError::NotFound(id.to_string()))
                } else {
                    self.counters.released.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            }
            _ => Err(SessionError::NotFound(id.to_string())),
        }
    }

    /// Removes expired sessions; returns how many.
    pub fn sweep(&self) -> usize {
        let mut g = self.lock();
        self.sweep_locked(&mut g, Instant::now())
    }

    fn sweep_locked(&self, g: &mut Inner, now: Instant) -> usize {
        let dead: Vec<Arc<str>> = g.by_id.iter().filter(|(_, e)| self.expired(e, now)).map(|(k, _)| k.clone()).collect();
        for id in &dead {
            g.remove(id);
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

/// A 128-bit random session id, 32 hex digits.
pub fn random_id() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(ttl_ms: u64, per_client: usize, global: usize) -> SessionStore {
        SessionStore::new(Duration::from_millis(ttl_ms), per_client, global)
    }

    #[test]
    fn owner_scoping() {
        let s = store(60_000, 4, 10);
        let a = s.create("alice", "tiny", StyleAligned::default()).unwrap();
        assert_eq!(a.id.len(), 32);
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
        assert!(s.get("alice", &a2.id).is_err(), "LRU evicted");
        assert!(s.get("alice", &a1.id).is_ok());
        assert!(s.get("alice", &a3.id).is_ok());
        assert!(s.get("bob", &b1.id).is_ok(), "other clients untouched");
        assert_eq!(s.count_for("alice"), 2);
        assert_eq!(s.counters.evicted.load(Ordering::Relaxed), 1);
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
    }
}
