//! Server configuration: limits, queue and batching, sessions, auth. [`ServeArgs`] are the
//! `stylealign serve` flags (and `STYLEALIGN_*` environment variables); their defaults are
//! [`ServeConfig::default`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use super::convert::Limits;
use super::session::SessionSecret;
use crate::device::DeviceSpec;
use crate::model::precision::Precision;
use crate::model::weights::{extension, is_pickle};

/// Where a served model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// The embedded tiny model (`tiny`).
    Tiny,
    /// A diffusers folder; served under the folder's name.
    Dir(PathBuf),
    /// A single-file checkpoint (`.safetensors`, original layout); served under the file's stem.
    File(PathBuf),
}

impl std::str::FromStr for ModelSource {
    type Err = std::convert::Infallible;
    /// `tiny`, a folder, or a file: an existing file, or a path ending in `.safetensors` (or a
    /// pickle extension, refused when loading with a message).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "tiny" {
            return Ok(ModelSource::Tiny);
        }
        let path = PathBuf::from(s);
        Ok(if path.is_file() || extension(&path) == "safetensors" || is_pickle(&path) {
            ModelSource::File(path)
        } else {
            ModelSource::Dir(path)
        })
    }
}

/// The entries of the folder given to `flag` that `pick` takes, in the folder's order. A pickle
/// checkpoint in the folder is an error saying `refusal` of it: such files are never read.
pub(crate) fn scan_folder<T>(
    flag: &str,
    dir: &Path,
    refusal: impl Fn(&Path) -> String,
    pick: impl Fn(&Path) -> Option<T>,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{flag} {}", dir.display()))? {
        let path = e.with_context(|| format!("{flag} {}", dir.display()))?.path();
        if path.is_file() && is_pickle(&path) {
            anyhow::bail!("{flag}: {}", refusal(&path));
        }
        out.extend(pick(&path));
    }
    Ok(out)
}

/// Why a pickle checkpoint in a served folder is refused.
pub(crate) fn pickle_in_folder(path: &Path) -> String {
    format!(
        "{} is a pickle checkpoint, which is not read (unpickling can run code); convert it to safetensors or move it out of the folder",
        path.display()
    )
}

pub(crate) fn is_safetensors_file(path: &Path) -> bool {
    path.is_file() && extension(path) == "safetensors"
}

/// The models of `--models-dir`: every subfolder that is a diffusers pipeline (a
/// `model_index.json` or a `unet/` folder) and every `.safetensors` file (a `.json` beside a
/// file is its sidecar config, not a model), sorted by name. Pickle checkpoints are named in the
/// error: they are never read.
pub fn models_dir(dir: &Path) -> anyhow::Result<Vec<ModelSource>> {
    let refusal = |path: &Path| {
        crate::model::single_file::pickle_refusal(path)
            .to_string()
            .replace(" and serve the .safetensors file", " (or move it out of the folder)")
    };
    let mut out = scan_folder("--models-dir", dir, refusal, |path| {
        if path.is_dir() && (path.join("model_index.json").is_file() || path.join("unet").is_dir()) {
            Some(ModelSource::Dir(path.to_path_buf()))
        } else if is_safetensors_file(path) {
            Some(ModelSource::File(path.to_path_buf()))
        } else {
            None
        }
    })?;
    out.sort_by_key(|s| match s {
        ModelSource::Dir(p) | ModelSource::File(p) => p.file_name().map(|n| n.to_os_string()),
        ModelSource::Tiny => None,
    });
    Ok(out)
}

/// Where a served ControlNet comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlNetSource {
    /// The embedded model's ControlNet (`tiny-controlnet`, served with the embedded model).
    Tiny,
    /// A diffusers ControlNet folder or a single `.safetensors` file; served under the folder's
    /// name or the file's stem.
    Path(PathBuf),
}

/// Name under which the embedded ControlNet is served.
pub const TINY_CONTROLNET: &str = "tiny-controlnet";

impl ControlNetSource {
    /// The name clients use.
    pub fn name(&self) -> String {
        match self {
            ControlNetSource::Tiny => TINY_CONTROLNET.into(),
            ControlNetSource::Path(p) => {
                let name = if p.is_dir() { p.file_name() } else { p.file_stem() };
                name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
            }
        }
    }
}

impl std::str::FromStr for ControlNetSource {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == TINY_CONTROLNET { ControlNetSource::Tiny } else { ControlNetSource::Path(PathBuf::from(s)) })
    }
}

/// The ControlNets of `--controlnet-dir`: every subfolder holding a `config.json` and every
/// `.safetensors` file (a `.json` beside a file is its config, not a ControlNet), sorted by name.
/// Pickle checkpoints are named in the error: they are never read.
pub fn controlnet_dir(dir: &Path) -> anyhow::Result<Vec<ControlNetSource>> {
    let mut out = scan_folder("--controlnet-dir", dir, pickle_in_folder, |path| {
        let folder = path.is_dir() && path.join("config.json").is_file();
        (folder || is_safetensors_file(path)).then(|| ControlNetSource::Path(path.to_path_buf()))
    })?;
    out.sort_by_key(|s| s.name());
    Ok(out)
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
    /// Prediction type and VAE of single-file models (see [`crate::pipeline::single_file`]).
    pub single_file: crate::pipeline::single_file::SingleFileOptions,
    /// ControlNets (with the embedded model, its ControlNet is added).
    pub controlnets: Vec<ControlNetSource>,
    /// One worker per device; for the CPU, `cpu_workers` workers share the CPU device.
    pub devices: Vec<DeviceSpec>,
    /// The models' dtype on every device (`None`: f16 on GPU devices, f32 on the CPU; see
    /// [`Precision::default_for`]).
    pub dtype: Option<Precision>,
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
    /// TLS (and mTLS) on the API port; `None`: plaintext.
    pub tls: Option<super::tls::TlsFiles>,
    /// Timeouts, limits and HTTP/2 settings of the API port.
    pub transport: super::conn::Transport,
    /// Memory budget per device for the requests (`None`: derived after loading, see
    /// [`super::admission`]).
    pub memory_budget: Option<u64>,
    /// The LoRA folder: every `.safetensors` file is a LoRA, served under its stem.
    pub lora_dir: Option<PathBuf>,
    /// Memory budget of the loaded-LoRA cache, per device, in bytes.
    pub lora_cache_bytes: u64,
}

impl Default for ServeConfig {
    /// The configuration of `stylealign serve` without flags (the defaults live on [`ServeArgs`]).
    fn default() -> Self {
        ServeArgs::default().config().expect("the default serve flags make a valid configuration")
    }
}

/// The `stylealign serve` flags, each with its `STYLEALIGN_*` environment variable. Their defaults
/// are the one definition of [`ServeConfig::default`].
/// (No `Debug`: it holds the session secret and auth tokens.)
#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// A diffusers folder, a single-file `.safetensors` checkpoint, or `tiny` (the embedded
    /// model). Repeat to serve several models. Default: `tiny`, unless `--models-dir` is given.
    #[arg(long = "model", env = "STYLEALIGN_MODEL", value_delimiter = ',')]
    pub models: Vec<ModelSource>,
    /// Serve every model of this folder: its diffusers subfolders and its `.safetensors`
    /// single-file checkpoints (each with an optional `<stem>.json` sidecar config).
    #[arg(long, env = "STYLEALIGN_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Prediction type of single-file checkpoints whose sidecar names none: `epsilon` or
    /// `v_prediction` (the weights cannot tell an SD2 ε model from a v model). Default: the
    /// family's (SD1, SDXL: epsilon; SD2: v_prediction, as SD 2.1).
    #[arg(long, env = "STYLEALIGN_PREDICTION_TYPE", value_parser = crate::pipeline::single_file::parse_prediction)]
    pub prediction_type: Option<crate::sampling::schedule::Prediction>,
    /// VAE of single-file checkpoints that hold none: a diffusers VAE folder or a `.safetensors`
    /// file (original or diffusers names).
    #[arg(long, env = "STYLEALIGN_VAE")]
    pub vae: Option<PathBuf>,
    /// A ControlNet: a diffusers ControlNet folder or a single `.safetensors` file (original or
    /// diffusers layout). Repeat to serve several. The embedded model brings `tiny-controlnet`.
    #[arg(long = "controlnet", env = "STYLEALIGN_CONTROLNET", value_delimiter = ',')]
    pub controlnets: Vec<ControlNetSource>,
    /// Serve every ControlNet of this folder: its subfolders with a `config.json` and its
    /// `.safetensors` files.
    #[arg(long, env = "STYLEALIGN_CONTROLNET_DIR")]
    pub controlnet_dir: Option<PathBuf>,
    /// Serve every `.safetensors` file of this folder as a LoRA (kohya/A1111 or diffusers/PEFT
    /// format), under its file stem; sessions pick them with PatchModel `loras`.
    #[arg(long, env = "STYLEALIGN_LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Memory budget of the loaded-LoRA cache per device, in MiB: least recently used LoRAs that
    /// no running batch uses are evicted to load others.
    #[arg(long, env = "STYLEALIGN_LORA_CACHE_MB", default_value_t = 2048)]
    pub lora_cache_mb: u64,
    #[arg(long, env = "STYLEALIGN_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Admin HTTP/gRPC listener (`/metrics`, `/healthz`, grpc.health.v1). `off` disables it.
    #[arg(long, env = "STYLEALIGN_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: String,
    /// Devices, one worker each: `cpu`, `cuda`, `cuda:N`, `wgpu`, `wgpu:N`. Repeat or comma-separate.
    #[arg(long = "device", env = "STYLEALIGN_DEVICE", value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<DeviceSpec>,
    /// The models' dtype: `f32`, `f16` or `bf16` (weights converted once at load; GroupNorm and
    /// softmax statistics, timestep embeddings and the sampler stay f32). Default: f16 on GPU
    /// devices, f32 on the CPU. A device that cannot compute in it is refused at startup.
    #[arg(long, env = "STYLEALIGN_DTYPE")]
    pub dtype: Option<Precision>,
    /// Workers sharing the CPU device.
    #[arg(long, env = "STYLEALIGN_CPU_WORKERS", default_value_t = 1)]
    pub cpu_workers: usize,
    /// Admission queue capacity; a full queue answers RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "STYLEALIGN_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Turn off batching across requests.
    #[arg(long, env = "STYLEALIGN_NO_BATCHING")]
    pub no_batching: bool,
    /// Most images in one UNet batch.
    #[arg(long, env = "STYLEALIGN_MAX_BATCH_ROWS", default_value_t = 8)]
    pub max_batch_rows: usize,
    /// How long the oldest request may wait for batch-mates, in milliseconds.
    #[arg(long, env = "STYLEALIGN_MAX_BATCH_DELAY_MS", default_value_t = 20)]
    pub max_batch_delay_ms: u64,
    /// Idle session lifetime, in seconds.
    #[arg(long, env = "STYLEALIGN_SESSION_TTL_SECS", default_value_t = 1800)]
    pub session_ttl_secs: u64,
    /// Sessions per client (more evicts the client's least recently used one).
    #[arg(long, env = "STYLEALIGN_MAX_SESSIONS_PER_CLIENT", default_value_t = 64)]
    pub max_sessions_per_client: usize,
    /// Sessions in all (more is RESOURCE_EXHAUSTED).
    #[arg(long, env = "STYLEALIGN_MAX_SESSIONS", default_value_t = 10_000)]
    pub max_sessions: usize,
    /// File holding the secret that signs session ids (≥ 32 bytes; surrounding whitespace
    /// ignored). Replicas of one deployment share it, so that any replica serves any session.
    /// Without it (or --session-secret) a random secret is generated: ids die with the process.
    #[arg(long, env = "STYLEALIGN_SESSION_SECRET_FILE")]
    pub session_secret_file: Option<PathBuf>,
    /// The session secret itself (prefer the file).
    #[arg(long, env = "STYLEALIGN_SESSION_SECRET", hide_env_values = true, conflicts_with = "session_secret_file")]
    pub session_secret: Option<String>,
    /// Hard session lifetime, in seconds: a session id is refused everywhere this long after its
    /// creation, used or not (a release on one replica reaches the others only then).
    #[arg(long, env = "STYLEALIGN_MAX_SESSION_LIFETIME_SECS", default_value_t = super::session::DEFAULT_MAX_LIFETIME.as_secs())]
    pub max_session_lifetime_secs: u64,
    #[arg(long, env = "STYLEALIGN_MAX_PROMPTS", default_value_t = 8)]
    pub max_prompts: usize,
    #[arg(long, env = "STYLEALIGN_MAX_PROMPT_CHARS", default_value_t = 2000)]
    pub max_prompt_chars: usize,
    #[arg(long, env = "STYLEALIGN_MAX_STEPS", default_value_t = 150)]
    pub max_steps: usize,
    /// Largest width and height.
    #[arg(long, env = "STYLEALIGN_MAX_SIZE", default_value_t = 2048)]
    pub max_size: usize,
    #[arg(long, env = "STYLEALIGN_MAX_GUIDANCE", default_value_t = 50.0)]
    pub max_guidance: f32,
    #[arg(long, env = "STYLEALIGN_DEFAULT_STEPS", default_value_t = 30)]
    pub default_steps: usize,
    #[arg(long, env = "STYLEALIGN_DEFAULT_GUIDANCE", default_value_t = 7.5)]
    pub default_guidance: f32,
    /// On SIGTERM, how long queued and running work may take, in seconds.
    #[arg(long, env = "STYLEALIGN_DRAIN_TIMEOUT_SECS", default_value_t = 60)]
    pub drain_timeout_secs: u64,
    /// Turn auth on with tokens from this file (lines `client=token` or `token`).
    #[arg(long, env = "STYLEALIGN_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// Turn auth on with these tokens (comma-separated `client=token` or `token`).
    #[arg(long, env = "STYLEALIGN_AUTH_TOKENS", hide_env_values = true)]
    pub auth_tokens: Option<String>,
    /// Skip the warm-up step (health turns SERVING right after loading).
    #[arg(long, env = "STYLEALIGN_NO_WARMUP")]
    pub no_warmup: bool,
    /// Do not serve the browser playground at `/` on the API port.
    #[arg(long, env = "STYLEALIGN_NO_PLAYGROUND")]
    pub no_playground: bool,
    /// Send OpenTelemetry traces over OTLP/gRPC to this collector (e.g. `http://otel-collector:4317`):
    /// a span per RPC (continuing a W3C `traceparent`), with queue wait, batch, steps, decode and
    /// encode as children. Off when unset.
    #[arg(long, env = "STYLEALIGN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    #[command(flatten)]
    pub transport: super::conn::TransportArgs,
    #[command(flatten)]
    pub memory: super::admission::MemoryArgs,
}

impl Default for ServeArgs {
    /// Every flag at its default; the `STYLEALIGN_*` environment is not read.
    fn default() -> Self {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = ServeArgs::augment_args(clap::Command::new("serve")).mut_args(|a| a.env(None::<&'static str>));
        let matches = cmd.try_get_matches_from(["serve"]).expect("every serve flag has a valid default");
        ServeArgs::from_arg_matches(&matches).expect("every serve flag has a valid default")
    }
}

impl ServeArgs {
    /// The server configuration: reads the token and secret files, checks every number; errors
    /// name the flag.
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        // Auth is on when a token file or inline tokens are given (both: their union).
        let auth = if self.auth_tokens_file.is_some() || self.auth_tokens.is_some() {
            let mut text = String::new();
            if let Some(f) = &self.auth_tokens_file {
                text += &std::fs::read_to_string(f).with_context(|| format!("--auth-tokens-file {}", f.display()))?;
                text.push('\n');
            }
            if let Some(t) = &self.auth_tokens {
                text += t;
            }
            Some(Tokens::parse(&text).map_err(anyhow::Error::msg).context("auth tokens")?)
        } else {
            None
        };
        let session_secret = match (&self.session_secret_file, &self.session_secret) {
            (Some(f), _) => Some(SessionSecret::from_file(f).map_err(anyhow::Error::msg).context("--session-secret-file")?),
            (None, Some(s)) => Some(SessionSecret::new(s.as_bytes()).map_err(anyhow::Error::msg).context("--session-secret")?),
            (None, None) => None,
        };
        let admin_listen = match self.admin_listen.as_str() {
            "off" | "none" | "" => None,
            a => Some(a.parse().with_context(|| format!("--admin-listen {a:?}"))?),
        };
        let mut controlnets = self.controlnets.clone();
        if let Some(dir) = &self.controlnet_dir {
            controlnets.extend(controlnet_dir(dir)?);
        }
        let mut models = self.models.clone();
        if let Some(dir) = &self.models_dir {
            let found = models_dir(dir)?;
            if found.is_empty() {
                anyhow::bail!("--models-dir {}: no diffusers folder and no .safetensors file in it", dir.display());
            }
            models.extend(found);
        } else if models.is_empty() {
            models.push(ModelSource::Tiny);
        }
        if models.contains(&ModelSource::Tiny) && !controlnets.contains(&ControlNetSource::Tiny) {
            controlnets.insert(0, ControlNetSource::Tiny);
        }
        let cfg = ServeConfig {
            listen: self.listen,
            admin_listen,
            models,
            single_file: crate::pipeline::single_file::SingleFileOptions { prediction_type: self.prediction_type, vae: self.vae.clone() },
            controlnets,
            devices: self.devices.clone(),
            dtype: self.dtype,
            cpu_workers: self.cpu_workers,
            max_queue: self.max_queue,
            batching: !self.no_batching,
            max_batch_rows: self.max_batch_rows,
            max_batch_delay: Duration::from_millis(self.max_batch_delay_ms),
            session_ttl: Duration::from_secs(self.session_ttl_secs),
            max_sessions_per_client: self.max_sessions_per_client,
            max_sessions: self.max_sessions,
            session_secret,
            max_session_lifetime: Duration::from_secs(self.max_session_lifetime_secs),
            limits: Limits {
                max_prompts: self.max_prompts,
                max_prompt_chars: self.max_prompt_chars,
                max_steps: self.max_steps,
                max_size: self.max_size,
                max_guidance: self.max_guidance,
                default_steps: self.default_steps,
                default_guidance: self.default_guidance,
            },
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            auth,
            warmup: !self.no_warmup,
            playground: !self.no_playground,
            tls: self.tls.files()?,
            transport: self.transport.transport()?,
            memory_budget: self.memory.memory_budget,
            lora_dir: self.lora_dir.clone(),
            lora_cache_bytes: self.lora_cache_mb.saturating_mul(1 << 20),
        };
        cfg.check().map_err(anyhow::Error::msg)?;
        Ok(cfg)
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
        self.transport.check()?;
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
    fn controlnet_dir_lists_folders_and_safetensors_files() {
        let dir = std::env::temp_dir().join(format!("stylealign-cn-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("depth")).unwrap();
        std::fs::write(dir.join("depth/config.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.join("notes")).unwrap();
        for f in ["canny.safetensors", "canny.json", "readme.txt"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let names: Vec<String> = controlnet_dir(&dir).unwrap().iter().map(ControlNetSource::name).collect();
        assert_eq!(names, ["canny", "depth"]);
        std::fs::write(dir.join("pose.ckpt"), "x").unwrap();
        let err = controlnet_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("pose.ckpt") && err.contains("pickle"), "{err}");
        assert!(controlnet_dir(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn models_dir_and_single_file_flags() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let dir = std::env::temp_dir().join(format!("stylealign-models-dir-flags-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sd15/unet")).unwrap();
        std::fs::create_dir_all(dir.join("loose")).unwrap();
        for f in ["b.safetensors", "b.json", "a.safetensors", "readme.md"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let d = dir.display().to_string();
        let cfg = Cli::try_parse_from(["x", "--models-dir", &d, "--prediction-type", "v", "--vae", "vae.safetensors"])
            .unwrap()
            .serve
            .config()
            .unwrap();
        // Without --model, the embedded model is not added to a models directory.
        assert_eq!(
            cfg.models,
            vec![
                ModelSource::File(dir.join("a.safetensors")),
                ModelSource::File(dir.join("b.safetensors")),
                ModelSource::Dir(dir.join("sd15"))
            ]
        );
        assert_eq!(cfg.single_file.prediction_type, Some(crate::sampling::schedule::Prediction::VPrediction));
        assert_eq!(cfg.single_file.vae, Some(PathBuf::from("vae.safetensors")));
        let cfg = Cli::try_parse_from(["x", "--models-dir", &d, "--model", "tiny"]).unwrap().serve.config().unwrap();
        assert_eq!(cfg.models.len(), 4);
        assert!(cfg.controlnets.contains(&ControlNetSource::Tiny));
        let e = Cli::try_parse_from(["x", "--prediction-type", "x0"]).err().expect("refused").to_string();
        assert!(e.contains("--prediction-type") && e.contains("x0"), "{e}");
        assert_eq!("m/v1-5.safetensors".parse::<ModelSource>().unwrap(), ModelSource::File(PathBuf::from("m/v1-5.safetensors")));
        assert_eq!("m/old.ckpt".parse::<ModelSource>().unwrap(), ModelSource::File(PathBuf::from("m/old.ckpt")));
        assert_eq!("m/sd15".parse::<ModelSource>().unwrap(), ModelSource::Dir(PathBuf::from("m/sd15")));
        std::fs::remove_dir_all(dir.join("sd15")).unwrap();
        for f in ["b.safetensors", "a.safetensors"] {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        let e = Cli::try_parse_from(["x", "--models-dir", &d]).unwrap().serve.config().unwrap_err().to_string();
        assert!(e.contains("--models-dir") && e.contains("no diffusers folder"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

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

    #[test]
    fn defaults_come_from_the_flags_and_ignore_the_environment() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let d = ServeConfig::default();
        assert_eq!((d.listen, d.admin_listen), ("127.0.0.1:50051".parse().unwrap(), Some("127.0.0.1:9090".parse().unwrap())));
        assert_eq!((d.models.clone(), d.devices.clone()), (vec![ModelSource::Tiny], vec![DeviceSpec::Cpu]));
        assert_eq!(
            (d.max_queue, d.max_batch_rows, d.max_batch_delay, d.batching, d.warmup),
            (64, 8, Duration::from_millis(20), true, true)
        );
        assert_eq!(
            (d.session_ttl, d.max_session_lifetime, d.drain_timeout),
            (Duration::from_secs(1800), super::super::session::DEFAULT_MAX_LIFETIME, Duration::from_secs(60))
        );
        assert_eq!((d.limits.max_prompts, d.limits.max_steps, d.limits.default_steps, d.limits.default_guidance), (8, 150, 30, 7.5));
        assert!(d.auth.is_none() && d.session_secret.is_none());
        // Flags override; `off` turns the admin listener off; a bad value names its flag.
        let a = Cli::try_parse_from(["x", "--max-queue", "3", "--admin-listen", "off", "--device", "cpu,cuda:1", "--no-batching"])
            .unwrap()
            .serve
            .config()
            .unwrap();
        assert_eq!((a.max_queue, a.admin_listen, a.batching), (3, None, false));
        assert_eq!(a.devices, vec![DeviceSpec::Cpu, DeviceSpec::Cuda(1)]);
        assert!(
            Cli::try_parse_from(["x", "--device", "tpu"]).err().expect("an unknown device is refused").to_string().contains("--device")
        );
        assert_eq!(d.dtype, None, "the default dtype follows the device");
        let a = Cli::try_parse_from(["x", "--dtype", "f16"]).unwrap().serve.config().unwrap();
        assert_eq!(a.dtype, Some(Precision::F16));
        let e = Cli::try_parse_from(["x", "--dtype", "f8"]).err().expect("an unknown dtype is refused").to_string();
        assert!(e.contains("--dtype") && e.contains("`bf16`"), "{e}");
        let e = Cli::try_parse_from(["x", "--max-steps", "4", "--default-steps", "5"]).unwrap().serve.config().unwrap_err();
        assert!(e.to_string().contains("--default-steps"), "{e}");
    }
}
