//! `stylealign`: serve style-aligned Stable Diffusion over gRPC, call the service, or run a
//! self-contained demo / load test.
//!
//! ```text
//! stylealign serve --model tiny --listen 127.0.0.1:50051 --admin-listen 127.0.0.1:9090
//! stylealign generate --server 127.0.0.1:50051 --prompt "a cat, watercolor" --prompt "a dog" --out out/
//! stylealign demo --out out/demo
//! stylealign loadtest --server 127.0.0.1:50051 --clients 1,4,16 --duration 30s
//! ```
//!
//! Every `serve` flag also reads an environment variable (`STYLEALIGN_…`, shown by `--help`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use stylealign::device::DeviceSpec;
use stylealign::client::{self, Identity, Mix, RssSource};
use stylealign::serve::convert::Limits;
use stylealign::serve::session::SessionSecret;
use stylealign::serve::{ServeConfig, Server, Tokens, pb};

#[derive(Parser)]
#[command(name = "stylealign", version, about = "Style-aligned Stable Diffusion image sets over gRPC")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text", env = "STYLEALIGN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (API on --listen; /metrics, /healthz and gRPC health on --admin-listen).
    Serve(ServeArgs),
    /// Generate one style-aligned set through a running server and write the PNGs.
    Generate(GenerateArgs),
    /// Run server and client in one process on the embedded model; write PNGs and a contact sheet.
    Demo(client::demo::DemoArgs),
    /// Measure throughput and latency with concurrent clients (in-process tiny server by default).
    Loadtest(LoadArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// A diffusers folder, or `tiny` (the embedded model). Repeat to serve several models.
    #[arg(long = "model", env = "STYLEALIGN_MODEL", value_delimiter = ',', default_value = "tiny")]
    models: Vec<String>,
    #[arg(long, env = "STYLEALIGN_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Admin HTTP/gRPC listener (`/metrics`, `/healthz`, grpc.health.v1). `off` disables it.
    #[arg(long, env = "STYLEALIGN_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    admin_listen: String,
    /// Devices, one worker each: `cpu`, `cuda`, `cuda:N`. Repeat or comma-separate.
    #[arg(long = "device", env = "STYLEALIGN_DEVICE", value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Workers sharing the CPU device.
    #[arg(long, env = "STYLEALIGN_CPU_WORKERS", default_value_t = 1)]
    cpu_workers: usize,
    /// Admission queue capacity; a full queue answers RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "STYLEALIGN_MAX_QUEUE", default_value_t = 64)]
    max_queue: usize,
    /// Turn off batching across requests.
    #[arg(long, env = "STYLEALIGN_NO_BATCHING")]
    no_batching: bool,
    /// Most images in one UNet batch.
    #[arg(long, env = "STYLEALIGN_MAX_BATCH_ROWS", default_value_t = 8)]
    max_batch_rows: usize,
    /// How long the oldest request may wait for batch-mates, in milliseconds.
    #[arg(long, env = "STYLEALIGN_MAX_BATCH_DELAY_MS", default_value_t = 20)]
    max_batch_delay_ms: u64,
    /// Idle session lifetime, in seconds.
    #[arg(long, env = "STYLEALIGN_SESSION_TTL_SECS", default_value_t = 1800)]
    session_ttl_secs: u64,
    /// Sessions per client (more evicts the client's least recently used one).
    #[arg(long, env = "STYLEALIGN_MAX_SESSIONS_PER_CLIENT", default_value_t = 64)]
    max_sessions_per_client: usize,
    /// Sessions in all (more is RESOURCE_EXHAUSTED).
    #[arg(long, env = "STYLEALIGN_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// File holding the secret that signs session ids (≥ 32 bytes; surrounding whitespace
    /// ignored). Replicas of one deployment share it, so that any replica serves any session.
    /// Without it (or --session-secret) a random secret is generated: ids die with the process.
    #[arg(long, env = "STYLEALIGN_SESSION_SECRET_FILE")]
    session_secret_file: Option<PathBuf>,
    /// The session secret itself (prefer the file).
    #[arg(long, env = "STYLEALIGN_SESSION_SECRET", hide_env_values = true, conflicts_with = "session_secret_file")]
    session_secret: Option<String>,
    /// Hard session lifetime, in seconds: a session id is refused everywhere this long after its
    /// creation, used or not (a release on one replica reaches the others only then).
    #[arg(long, env = "STYLEALIGN_MAX_SESSION_LIFETIME_SECS", default_value_t = 86_400)]
    max_session_lifetime_secs: u64,
    #[arg(long, env = "STYLEALIGN_MAX_PROMPTS", default_value_t = 8)]
    max_prompts: usize,
    #[arg(long, env = "STYLEALIGN_MAX_PROMPT_CHARS", default_value_t = 2000)]
    max_prompt_chars: usize,
    #[arg(long, env = "STYLEALIGN_MAX_STEPS", default_value_t = 150)]
    max_steps: usize,
    /// Largest width and height.
    #[arg(long, env = "STYLEALIGN_MAX_SIZE", default_value_t = 2048)]
    max_size: usize,
    #[arg(long, env = "STYLEALIGN_MAX_GUIDANCE", default_value_t = 50.0)]
    max_guidance: f32,
    #[arg(long, env = "STYLEALIGN_DEFAULT_STEPS", default_value_t = 30)]
    default_steps: usize,
    #[arg(long, env = "STYLEALIGN_DEFAULT_GUIDANCE", default_value_t = 7.5)]
    default_guidance: f32,
    /// On SIGTERM, how long queued and running work may take, in seconds.
    #[arg(long, env = "STYLEALIGN_DRAIN_TIMEOUT_SECS", default_value_t = 60)]
    drain_timeout_secs: u64,
    /// Turn auth on with tokens from this file (lines `client=token` or `token`).
    #[arg(long, env = "STYLEALIGN_AUTH_TOKENS_FILE")]
    auth_tokens_file: Option<PathBuf>,
    /// Turn auth on with these tokens (comma-separated `client=token` or `token`).
    #[arg(long, env = "STYLEALIGN_AUTH_TOKENS", hide_env_values = true)]
    auth_tokens: Option<String>,
    /// Skip the warm-up step (health turns SERVING right after loading).
    #[arg(long, env = "STYLEALIGN_NO_WARMUP")]
    no_warmup: bool,
    /// Do not serve the browser playground at `/` on the API port.
    #[arg(long, env = "STYLEALIGN_NO_PLAYGROUND")]
    no_playground: bool,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<ServeConfig> {
        // Auth is on when a token file or inline tokens are given (both: their union).
        let tokens = if self.auth_tokens_file.is_some() || self.auth_tokens.is_some() {
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
        let devices = self.devices.iter().map(|d| d.parse::<DeviceSpec>().map_err(anyhow::Error::from)).collect::<anyhow::Result<Vec<_>>>()?;
        let cfg = ServeConfig {
            listen: self.listen,
            admin_listen,
            models: self.models.iter().map(|m| m.parse().expect("infallible")).collect(),
            devices,
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
            auth: tokens,
            warmup: !self.no_warmup,
            playground: !self.no_playground,
        };
        cfg.check().map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum SamplerArg {
    Ddim,
    Euler,
    EulerA,
    Dpmpp2m,
    Dpmpp2mKarras,
}

impl SamplerArg {
    fn proto(self) -> pb::Sampler {
        match self {
            SamplerArg::Ddim => pb::Sampler::Ddim,
            SamplerArg::Euler => pb::Sampler::Euler,
            SamplerArg::EulerA => pb::Sampler::EulerA,
            SamplerArg::Dpmpp2m => pb::Sampler::Dpmpp2m,
            SamplerArg::Dpmpp2mKarras => pb::Sampler::Dpmpp2mKarras,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ShareNormArg {
    Both,
    Group,
    Layer,
    Disabled,
}

#[derive(Clone, Copy, ValueEnum)]
enum ShareAttnArg {
    #[value(name = "q+k")]
    QK,
    #[value(name = "q+k+v")]
    Qkv,
    Disabled,
}

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    Low,
    Normal,
    High,
}

#[derive(Args, Clone)]
struct SetArgs {
    /// Prompts of the set; the first is the style reference. Repeat the flag.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// With one prompt: how many images.
    #[arg(long, default_value_t = 0)]
    count: u32,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Default: random (reported in the PNGs).
    #[arg(long)]
    seed: Option<u64>,
    /// 0: the server's default.
    #[arg(long, default_value_t = 0)]
    steps: u32,
    #[arg(long)]
    guidance: Option<f32>,
    /// 0: the model's native size.
    #[arg(long, default_value_t = 0)]
    width: u32,
    #[arg(long, default_value_t = 0)]
    height: u32,
    #[arg(long, value_enum, default_value = "ddim")]
    sampler: SamplerArg,
    #[arg(long, value_enum, default_value = "normal")]
    priority: PriorityArg,
    #[arg(long, default_value = "tiny")]
    model: String,
    #[arg(long, value_enum, default_value = "both")]
    share_norm: ShareNormArg,
    #[arg(long, value_enum, default_value = "q+k")]
    share_attn: ShareAttnArg,
    #[arg(long, default_value_t = 1.0)]
    scale: f32,
    /// A PNG or JPEG to use as the set's style reference (real-image mode; every prompt is then
    /// a target). Needs `--reference-caption` and the ddim sampler.
    #[arg(long)]
    reference_image: Option<PathBuf>,
    /// The reference image's caption.
    #[arg(long, default_value = "")]
    reference_caption: String,
    /// Noise levels the reference starts ahead of the batch (below steps).
    #[arg(long, default_value_t = 0)]
    reference_offset: u32,
}

impl SetArgs {
    fn patch(&self) -> pb::PatchModelRequest {
        pb::PatchModelRequest {
            model: self.model.clone(),
            share_norm: match self.share_norm {
                ShareNormArg::Both => pb::ShareNorm::Both,
                ShareNormArg::Group => pb::ShareNorm::Group,
                ShareNormArg::Layer => pb::ShareNorm::Layer,
                ShareNormArg::Disabled => pb::ShareNorm::Disabled,
            } as i32,
            share_attn: match self.share_attn {
                ShareAttnArg::QK => pb::ShareAttn::QK,
                ShareAttnArg::Qkv => pb::ShareAttn::QKV,
                ShareAttnArg::Disabled => pb::ShareAttn::Disabled,
            } as i32,
            scale: Some(self.scale),
            advanced: None,
        }
    }

    fn generate(&self, session_id: String) -> anyhow::Result<pb::GenerateRequest> {
        let reference_image = match &self.reference_image {
            Some(p) => std::fs::read(p).with_context(|| format!("reading --reference-image {}", p.display()))?,
            None => Vec::new(),
        };
        Ok(pb::GenerateRequest {
            reference_image,
            reference_caption: self.reference_caption.clone(),
            reference_offset: self.reference_offset,
            session_id,
            prompts: self.prompts.clone(),
            count: self.count,
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            steps: self.steps,
            guidance_scale: self.guidance,
            width: self.width,
            height: self.height,
            sampler: self.sampler.proto() as i32,
            priority: match self.priority {
                PriorityArg::Low => pb::Priority::Low,
                PriorityArg::Normal => pb::Priority::Normal,
                PriorityArg::High => pb::Priority::High,
            } as i32,
            ..Default::default()
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// `host:port` or `http://host:port`.
    #[arg(long, env = "STYLEALIGN_SERVER", default_value = "127.0.0.1:50051")]
    server: String,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    set: SetArgs,
    /// Bearer token (servers with auth).
    #[arg(long, env = "STYLEALIGN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// `x-client-id` (servers without auth).
    #[arg(long, env = "STYLEALIGN_CLIENT_ID")]
    client_id: Option<String>,
    /// Deadline for the Generate call, in seconds (sent as grpc-timeout).
    #[arg(long)]
    timeout_secs: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BatchingArg {
    On,
    Off,
    Both,
}

#[derive(Args)]
#[command(after_long_help = "Examples:\n  stylealign loadtest                                   # in-process tiny server, batching on and off, 1 and 4 clients\n  stylealign loadtest --server 127.0.0.1:50051,127.0.0.1:50052 --clients 1,4,16 --duration 30s --json\n  stylealign loadtest --server 127.0.0.1:50051 --mix 'sampler=ddim:3,euler_a:1;images=1:1,4:1' --duration 1m\n  stylealign loadtest --server 127.0.0.1:50051 --soak --duration 600s --clients 4 --server-pid 1234\n  stylealign loadtest --server 10.0.0.5:50051 --soak --duration 10m --metrics 10.0.0.5:9090")]
struct LoadArgs {
    /// Servers (`host:port` or URLs, comma-separated). Each client creates its session on one of
    /// them and sends request i to the next one round-robin (sessions must be valid on every
    /// server: replicas sharing --session-secret-file). Default: an in-process server on the tiny
    /// model (see --batching).
    #[arg(long, value_delimiter = ',')]
    server: Vec<String>,
    /// Concurrent clients (closed loop: each sends its next request when the last one ended). A
    /// list runs one measurement per count.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// How long each measurement sends requests (`30s`, `2m`, `500ms`, or seconds); requests in
    /// flight at the end are waited for.
    #[arg(long, value_parser = client::parse_duration)]
    duration: Option<Duration>,
    /// Requests per client (default 6 without --duration; with it, an upper bound).
    #[arg(long)]
    requests: Option<usize>,
    /// Request mix, e.g. `ddim:3,euler:1` or `sampler=ddim:3,euler_a:1;images=1:1,4:1`.
    #[arg(long, long_help = client::MIX_HELP)]
    mix: Option<String>,
    /// Images (prompts) per request, where --mix does not say.
    #[arg(long, default_value_t = 2)]
    images: u32,
    /// Steps, where --mix does not say.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Width and height, where --mix does not say.
    #[arg(long, default_value_t = 32)]
    size: u32,
    /// Deadline of each request, in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_secs: f64,
    /// Bearer token for every client (servers with auth); else client n sends `x-client-id: load-n`.
    #[arg(long, env = "STYLEALIGN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Label of the measurements in the output (default: `server`, or `batching-on` /
    /// `batching-off` in-process).
    #[arg(long)]
    label: Option<String>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Soak: one run of --duration (one --clients value) that reports the servers' resident
    /// memory at the start, every --rss-every and at the end (from --server-pid or --metrics; the
    /// in-process server: this process).
    #[arg(long, requires = "duration")]
    soak: bool,
    /// Soak: local server processes whose RSS to read from /proc/<pid>/status.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Soak: admin listeners (`host:port`) whose /metrics has process_resident_memory_bytes.
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// Soak: RSS sampling interval.
    #[arg(long, value_parser = client::parse_duration, default_value = "10s")]
    rss_every: Duration,
    /// In-process server: batching on, off, or both (one measurement each).
    #[arg(long, value_enum, default_value = "both")]
    batching: BatchingArg,
    /// In-process server: CPU workers.
    #[arg(long, default_value_t = 1)]
    cpu_workers: usize,
    /// Seed of the request mix and the image seeds.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn init_logging(format: LogFormat, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    init_logging(cli.log_format, default_log);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stylealign: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => stylealign::serve::run(a.config()?).await,
            Command::Generate(a) => generate(a).await,
            Command::Demo(a) => client::demo::run(a).await,
            Command::Loadtest(a) => loadtest(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stylealign: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let who = Identity { token: a.token.clone(), client_id: a.client_id.clone() };
    let mut c = client::connect(&a.server).await?;
    let session = c.patch_model(who.request(a.set.patch(), None)).await.context("PatchModel")?.into_inner();
    let timeout = a.timeout_secs.map(Duration::from_secs_f64);
    let result = client::generate(&mut c, &who, a.set.generate(session.session_id.clone())?, timeout, |ev| {
        use pb::generate_response::Event;
        match ev {
            Event::Queued(q) => eprintln!("queued: position {} of {}", q.position, q.queue_depth),
            Event::Started(s) => eprintln!("started: batch of {} images ({} requests) after {:.2}s in queue", s.batch_rows, s.batch_sets, s.queue_seconds),
            Event::Progress(p) if p.step == p.total_steps => eprintln!("\rstep {}/{}", p.step, p.total_steps),
            Event::Progress(p) => eprint!("\rstep {}/{}", p.step, p.total_steps),
            Event::Image(i) => eprintln!("image {} ({}x{}, seed {}): {}", i.index, i.width, i.height, i.seed, i.prompt),
        }
    })
    .await
    .context("Generate")?;
    let _ = c.release_session(who.request(pb::ReleaseSessionRequest { session_id: session.session_id }, None)).await;
    let paths = client::write_images(&a.out, "image", &result.images)?;
    for p in &paths {
        println!("{}", p.display());
    }
    if result.images.is_empty() {
        bail!("no image came back");
    }
    Ok(())
}

async fn loadtest(a: LoadArgs) -> anyhow::Result<()> {
    use stylealign::sampling::sampler::SamplerKind;
    if a.clients.is_empty() || a.clients.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--clients: 1 to 1024 each");
    }
    if a.requests.is_some_and(|r| r == 0 || r > 1_000_000) {
        bail!("--requests: 1 to 1,000,000");
    }
    if !(a.timeout_secs.is_finite() && a.timeout_secs > 0.0 && a.timeout_secs <= 3600.0) {
        bail!("--timeout-secs: (0, 3600]");
    }
    if a.soak && a.clients.len() != 1 {
        bail!("--soak runs one measurement: give one --clients value");
    }
    if a.soak && !a.server.is_empty() && a.server_pid.is_empty() && a.metrics.is_empty() {
        bail!("--soak against --server needs --server-pid (local process) or --metrics (admin host:port) to read the server's memory");
    }
    let defaults = Mix::fixed(SamplerKind::Ddim, a.images.max(1), a.steps.max(1), a.size);
    let mix = match &a.mix {
        Some(m) => Mix::parse(m).map_err(anyhow::Error::msg)?.or(&defaults),
        None => defaults,
    };
    let requests = match (a.requests, a.duration) {
        (Some(r), _) => Some(r),
        (None, Some(_)) => None,
        (None, None) => Some(6),
    };
    let runs: Vec<(Option<bool>, usize)> = if !a.server.is_empty() {
        a.clients.iter().map(|&c| (None, c)).collect()
    } else {
        let modes: &[bool] = match a.batching {
            BatchingArg::On => &[true],
            BatchingArg::Off => &[false],
            BatchingArg::Both => &[true, false],
        };
        modes.iter().flat_map(|&b| a.clients.iter().map(move |&c| (Some(b), c))).collect()
    };
    if !a.json {
        println!(
            "mix {}; {}",
            mix.describe(),
            match (a.duration, requests) {
                (Some(d), Some(r)) => format!("{:.0} s or {r} requests per client", d.as_secs_f64()),
                (Some(d), None) => format!("{:.0} s per measurement", d.as_secs_f64()),
                (None, Some(r)) => format!("{r} requests per client"),
                (None, None) => unreachable!(),
            }
        );
        println!(
            "{:<14} {:>7} {:>8} {:>6} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}  codes",
            "label", "clients", "requests", "ok", "images", "images/s", "p50 ms", "p95 ms", "p99 ms", "q50 ms", "q95 ms", "q99 ms", "rows"
        );
    }
    let mut results = Vec::new();
    let mut soak_json = None;
    for (batching, clients) in runs {
        let (servers, server) = if !a.server.is_empty() {
            (a.server.clone(), None)
        } else {
            let cfg = ServeConfig {
                listen: "127.0.0.1:0".parse()?,
                admin_listen: None,
                batching: batching.unwrap_or(true),
                cpu_workers: a.cpu_workers,
                max_batch_rows: 16,
                max_batch_delay: Duration::from_millis(20),
                // One process: a per-process secret is all it needs (and says so without a warning).
                session_secret: Some(SessionSecret::random()),
                ..ServeConfig::default()
            };
            let s = Server::bind(cfg).await?;
            s.load().await?;
            (vec![s.addr().to_string()], Some(s))
        };
        let cfg = client::LoadConfig {
            duration: a.duration,
            requests_per_client: requests,
            timeout: Duration::from_secs_f64(a.timeout_secs),
            token: a.token.clone(),
            seed: a.seed,
            ..client::LoadConfig::new(servers, clients, mix.clone())
        };
        let label = a.label.clone().unwrap_or_else(|| match batching {
            Some(true) => "batching-on".into(),
            Some(false) => "batching-off".into(),
            None => "server".into(),
        });
        let r = if a.soak {
            let mut sources: Vec<RssSource> = a.server_pid.iter().map(|&p| RssSource::Pid(p)).chain(a.metrics.iter().map(|m| RssSource::Metrics(m.clone()))).collect();
            if sources.is_empty() {
                sources.push(RssSource::ThisProcess);
            }
            let (r, traces) = client::soak(&cfg, &sources, a.rss_every).await?;
            if !a.json {
                for t in &traces {
                    let mb = |b: Option<u64>| b.map(|b| format!("{:.1} MB", b as f64 / 1048576.0)).unwrap_or_else(|| "?".into());
                    println!("soak RSS ({}): start {}, end {}, max {}, {} samples", t.source, mb(t.start()), mb(t.end()), mb(t.max()), t.samples.len());
                }
            }
            soak_json = Some(serde_json::json!({"duration_s": a.duration.map(|d| d.as_secs_f64()), "rss": traces.iter().map(|t| t.to_json()).collect::<Vec<_>>()}));
            r
        } else {
            client::load_test(&cfg).await?
        };
        if !a.json {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{:<14} {:>7} {:>8} {:>6} {:>7} {:>9.2} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>6.2}  {}",
                label,
                clients,
                r.requests,
                r.ok,
                r.images,
                r.images_per_second(),
                ms(r.percentile(50.0)),
                ms(r.percentile(95.0)),
                ms(r.percentile(99.0)),
                ms(r.queue_percentile(50.0)),
                ms(r.queue_percentile(95.0)),
                ms(r.queue_percentile(99.0)),
                r.mean_batch_rows(),
                r.codes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
            );
        }
        let mut j = r.to_json();
        j["label"] = serde_json::json!(label);
        if let Some(s) = server {
            let st = s.stats();
            let batches = stylealign::serve::metrics::Stats::get(&st.batches).max(1);
            let rows = stylealign::serve::metrics::Stats::get(&st.batch_rows) as f64 / batches as f64;
            if !a.json {
                println!("{:<14} ({batches} batches, {rows:.2} rows/batch on average)", "");
            }
            j["server_batches"] = serde_json::json!(batches);
            s.shutdown().await;
        }
        results.push(j);
    }
    if a.json {
        let mut doc = serde_json::json!({
            "mix": mix.describe(),
            "duration_s": a.duration.map(|d| d.as_secs_f64()),
            "requests_per_client": requests,
            "servers": if a.server.is_empty() { serde_json::json!("in-process") } else { serde_json::json!(a.server) },
            "runs": results,
        });
        if let Some(s) = soak_json {
            doc["soak"] = s;
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(())
}
