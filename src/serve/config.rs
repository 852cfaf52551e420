//! Server configuration: limits, queue and batching, sessions, auth. The CLI (`stylealign serve`)
//! fills it from flags and `STYLEALIGN_*` environment variables.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::convert::Limits;
use super::session::SessionSecret;
use crate::device::DeviceSpec;

/// Where a served model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// The embedded tiny model (`tiny`).
    Tiny,
    /// A diffusers folder; served under the folder's name.
    Dir(PathBuf),
}

impl std::str::FromStr for ModelSource {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "tiny" { ModelSource::Tiny } else { ModelSource::Dir(PathBuf::from(s)) })
    }
}

/// Everything the server needs to run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The gRPC API. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Admin HTTP: `/metrics` (Prometheus), `/healthz`, and a plaintext `grpc.health.v1`
    /// endpoint for probes. `None`: no admin listener.
    pub admin_listen: Option<SocketAddr>,
    pub models: Vec<ModelSource>,
    /// One worker per device; for the CPU, `cpu_workers` workers share the CPU device.
    pub devices: Vec<DeviceSpec>,
    pub cpu_workers: usize,
    /// Admission queue capacity (requests waiting to run). Full: RESOURCE_EXHAUSTED at once.
    pub max_queue: usize,
    /// Batching across requests: compatible queued sets run in one UNet batch.
    pub batching: bool,
    /// Most images (rows) in one batch. A single set larger than this runs alone.
    pub max_batch_rows: usize,
    /// How long the oldest request of a batch may wait for batch-mates (from its enqueue time).
    pub max_batch_delay: Duration,
    /// Sessions expire after this long without use.
    pub session_ttl: Duration,
    /// Per client: creating one more session evicts that client's least recently used session.
    pub max_sessions_per_client: usize,
    /// Across clients: creating one more session is RESOURCE_EXHAUSTED (never evicts another
    /// client's session).
    pub max_sessions: usize,
    /// Signs session ids (self-describing tokens). Replicas sharing it accept each other's
    /// sessions. `None`: a random secret per process (single replica; ids die with it).
    pub session_secret: Option<SessionSecret>,
    /// Hard lifetime of a session from its creation: its token is refused everywhere afterwards
    /// (this bounds how long a session released on one replica stays usable on the others).
    pub max_session_lifetime: Duration,
    /// Request limits and defaults (most prompts per set, prompt length, steps, size, guidance).
    pub limits: Limits,
    /// On SIGTERM: how long queued and running work may take before it is cut off.
    pub drain_timeout: Duration,
    /// Bearer tokens → client identity. `None`: no auth, identity from `x-client-id`.
    pub auth: Option<Tokens>,
    /// Run one denoising step per model and worker before reporting SERVING.
    pub warmup: bool,
    /// Serve the browser playground at `/` on the API port.
    pub playground: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".parse().unwrap(),
            admin_listen: Some("127.0.0.1:9090".parse().unwrap()),
            models: vec![ModelSource::Tiny],
            devices: vec![DeviceSpec::Cpu],
            cpu_workers: 1,
            max_queue: 64,
            batching: true,
            max_batch_rows: 8,
            max_batch_delay: Duration::from_millis(20),
            session_ttl: Duration::from_secs(30 * 60),
            max_sessions_per_client: 64,
            max_sessions: 10_000,
            session_secret: None,
            max_session_lifetime: super::session::DEFAULT_MAX_LIFETIME,
            limits: Limits {
                max_prompts: 8,
                max_prompt_chars: 2_000,
                max_steps: 150,
                max_size: 2048,
                max_guidance: 50.0,
                default_steps: 30,
                default_guidance: 7.5,
            },
            drain_timeout: Duration::from_secs(60),
            auth: None,
            warmup: true,
            playground: true,
        }
    }
}

impl ServeConfig {
    /// Checks the numbers; the message names the setting.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("cpu-workers", self.cpu_workers),
            ("max-queue", self.max_queue),
            ("max-batch-rows", self.max_batch_rows),
            ("max-sessions-per-client", self.max_sessions_per_client),
            ("max-sessions", self.max_sessions),
            ("max-prompts", self.limits.max_prompts),
            ("max-steps", self.limits.max_steps),
            ("max-size", self.limits.max_size),
            ("default-steps", self.limits.default_steps),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        if self.models.is_empty() {
            return Err("--model: at least one model".into());
        }
        if self.devices.is_empty() {
            return Err("--device: at least one device".into());
        }
        let l = &self.limits;
        if l.default_steps > l.max_steps {
            return Err(format!("--default-steps {} exceeds --max-steps {}", l.default_steps, l.max_steps));
        }
        if !(l.max_guidance.is_finite() && l.max_guidance >= 0.0) {
            return Err("--max-guidance must be a finite number ≥ 0".into());
        }
        if !(l.default_guidance.is_finite() && (0.0..=l.max_guidance).contains(&l.default_guidance)) {
            return Err(format!("--default-guidance must be within [0, {}]", l.max_guidance));
        }
        if self.session_ttl.is_zero() {
            return Err("--session-ttl must be positive".into());
        }
        if self.max_session_lifetime < Duration::from_secs(1) {
            return Err("--max-session-lifetime-secs must be at least 1".into());
        }
        Ok(())
    }
}

/// Bearer tokens and the client identity each stands for.
#[derive(Clone, Default)]
pub struct Tokens {
    by_token: HashMap<String, String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens themselves.
        write!(f, "Tokens({} clients)", self.by_token.len())
    }
}

impl Tokens {
    /// Parses token entries: one per line (file) or comma-separated (env), each `client=token`
    /// or a bare `token` (identity `token-<hash>`). Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_token = HashMap::new();
        for (n, raw) in text.split(['\n', ',']).enumerate() {
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let (client, token) = match entry.split_once('=') {
                Some((c, t)) => (c.trim().to_string(), t.trim().to_string()),
                None => (format!("token-{:016x}", fnv1a(entry.as_bytes())), entry.to_string()),
            };
            if client.is_empty() || token.is_empty() {
                return Err(format!("token entry {}: expected `client=token` or `token`", n + 1));
            }
            if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("token entry {} (client {client}): a token has no spaces", n + 1));
            }
            by_token.insert(token, client);
        }
        if by_token.is_empty() {
            return Err("no token given".into());
        }
        Ok(Self { by_token })
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The client a token stands for.
    pub fn client(&self, token: &str) -> Option<&str> {
        self.by_token.get(token).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

/// FNV-1a, 64 bit: a stable, non-secret fingerprint.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_named_and_bare() {
        let t = Tokens::parse("# comment\nalice=tok-a\n\n tok-b \n").unwrap();
        assert_eq!(t.client("tok-a"), Some("alice"));
        assert!(t.client("tok-b").unwrap().starts_with("token-"));
        assert_eq!(t.client("nope"), None);
        let t = Tokens::parse("a=1,b=2").unwrap();
        assert_eq!(t.client("2"), Some("b"));
        assert!(Tokens::parse("").is_err());
        assert!(Tokens::parse("=x").is_err());
        assert!(!format!("{t:?}").contains('1'));
    }

    #[test]
    fn default_config_is_valid() {
        ServeConfig::default().check().unwrap();
        let bad = ServeConfig { max_queue: 0, ..Default::default() };
        assert!(bad.check().unwrap_err().contains("max-queue"));
    }
}
