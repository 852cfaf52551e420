//! `stylealign loadtest`: the load generator (closed loop over one or more servers, request
//! mixes, latency / queue-time percentiles, status counts) and the soak (resident memory of the
//! servers over a long run), with the subcommand's flags and its table / JSON report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

use super::{Identity, StatusError, generate, out, parse_duration};
use crate::sampling::sampler::SamplerKind;
use crate::serve::pb;
use crate::serve::session::SessionSecret;
use crate::serve::{ServeConfig, Server};

/// Weighted choices (`value[:weight]`, comma-separated). Empty: "use the default".
#[derive(Clone, Debug, PartialEq)]
pub struct Weighted<T>(pub Vec<(T, u32)>);

impl<T: Copy> Weighted<T> {
    fn pick(&self, r: u64) -> Option<T> {
        let total: u64 = self.0.iter().map(|(_, w)| *w as u64).sum();
        if total == 0 {
            return None;
        }
        let mut x = r % total;
        for (v, w) in &self.0 {
            if x < *w as u64 {
                return Some(*v);
            }
            x -= *w as u64;
        }
        None
    }
}

/// The `--mix` syntax (also in `stylealign loadtest --help`).
pub const MIX_HELP: &str = "Request mix: `;`-separated dimensions `key=value[:weight],…`. Each request draws every \
dimension independently by weight (default weight 1); a dimension left out takes --images / --steps / --size / ddim. \
Keys: `sampler` (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras), `images` (prompts per request), `steps`, `size` \
(width = height). A bare list is the sampler dimension. Examples: `ddim:3,euler:1`; \
`sampler=ddim:3,euler_a:1;images=1:1,4:1;size=32`. Requests batch together only when model, size, steps, sampler, \
guidance and patch match, so a mix lowers batching.";

/// A sampler by its API name or an older spelling (`euler-a`, `dpmpp2m`, `dpmpp-2m`, …).
fn parse_sampler(v: &str) -> Option<SamplerKind> {
    use clap::ValueEnum as _;
    SamplerKind::from_str(v, true).or_else(|_| SamplerKind::from_str(&v.replace('-', "_"), true)).ok()
}

/// What the load generator sends (see [`MIX_HELP`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Mix {
    pub sampler: Weighted<SamplerKind>,
    pub images: Weighted<u32>,
    pub steps: Weighted<u32>,
    pub size: Weighted<u32>,
}

/// One drawn request shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub sampler: SamplerKind,
    pub images: u32,
    pub steps: u32,
    pub size: u32,
}

impl Mix {
    /// Every request the same.
    pub fn fixed(sampler: SamplerKind, images: u32, steps: u32, size: u32) -> Self {
        Self {
            sampler: Weighted(vec![(sampler, 1)]),
            images: Weighted(vec![(images, 1)]),
            steps: Weighted(vec![(steps, 1)]),
            size: Weighted(vec![(size, 1)]),
        }
    }

    /// Parses [`MIX_HELP`]'s syntax; dimensions not given are empty (see [`or`](Self::or)).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut mix = Self { sampler: Weighted(vec![]), images: Weighted(vec![]), steps: Weighted(vec![]), size: Weighted(vec![]) };
        let mut seen = Vec::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, list) = match part.split_once('=') {
                Some((k, l)) => (k.trim(), l),
                None => ("sampler", part),
            };
            if seen.contains(&key) {
                return Err(format!("--mix: `{key}` given twice"));
            }
            seen.push(key);
            let mut items = Vec::new();
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let (v, w) = match item.rsplit_once(':') {
                    Some((v, w)) => (v.trim(), w.trim().parse::<u32>().map_err(|_| format!("--mix: bad weight in `{item}`"))?),
                    None => (item, 1),
                };
                items.push((v, w));
            }
            if items.iter().all(|(_, w)| *w == 0) {
                return Err(format!("--mix: `{key}` needs at least one value with a positive weight"));
            }
            let num = |v: &str, lo: u32, hi: u32| -> Result<u32, String> {
                v.parse::<u32>().ok().filter(|n| (lo..=hi).contains(n)).ok_or_else(|| format!("--mix: {key} `{v}`: expected {lo}..={hi}"))
            };
            match key {
                "sampler" => {
                    mix.sampler = Weighted(
                        items
                            .iter()
                            .map(|(v, w)| {
                                parse_sampler(v).map(|s| (s, *w)).ok_or_else(|| {
                                    format!("--mix: unknown sampler `{v}` (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras)")
                                })
                            })
                            .collect::<Result<_, _>>()?,
                    )
                }
                "images" | "count" => {
                    mix.images = Weighted(items.iter().map(|(v, w)| num(v, 1, 64).map(|n| (n, *w))).collect::<Result<_, _>>()?)
                }
                "steps" => mix.steps = Weighted(items.iter().map(|(v, w)| num(v, 1, 1000).map(|n| (n, *w))).collect::<Result<_, _>>()?),
                "size" => mix.size = Weighted(items.iter().map(|(v, w)| num(v, 8, 4096).map(|n| (n, *w))).collect::<Result<_, _>>()?),
                other => return Err(format!("--mix: unknown key `{other}` (sampler, images, steps, size)")),
            }
        }
        Ok(mix)
    }

    /// Fills the dimensions this mix leaves out from `defaults`.
    pub fn or(self, defaults: &Mix) -> Mix {
        let pick = |a: &Weighted<u32>, b: &Weighted<u32>| if a.0.is_empty() { b.clone() } else { a.clone() };
        Mix {
            sampler: if self.sampler.0.is_empty() { defaults.sampler.clone() } else { self.sampler.clone() },
            images: pick(&self.images, &defaults.images),
            steps: pick(&self.steps, &defaults.steps),
            size: pick(&self.size, &defaults.size),
        }
    }

    /// Draws a request shape.
    pub fn draw(&self, rng: &mut Rng) -> Shape {
        Shape {
            sampler: self.sampler.pick(rng.next()).unwrap_or(SamplerKind::Ddim),
            images: self.images.pick(rng.next()).unwrap_or(1),
            steps: self.steps.pick(rng.next()).unwrap_or(8),
            size: self.size.pick(rng.next()).unwrap_or(32),
        }
    }

    /// The canonical spelling (reports).
    pub fn describe(&self) -> String {
        fn list<T>(w: &Weighted<T>, name: impl Fn(&T) -> String) -> String {
            w.0.iter().map(|(v, n)| format!("{}:{n}", name(v))).collect::<Vec<_>>().join(",")
        }
        format!(
            "sampler={};images={};steps={};size={}",
            list(&self.sampler, |s| s.as_str().to_string()),
            list(&self.images, u32::to_string),
            list(&self.steps, u32::to_string),
            list(&self.size, u32::to_string)
        )
    }
}

/// SplitMix64: a small deterministic generator for the mix.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Each client sends request `i` to `servers[(client + i) % len]` (round robin); its session
    /// is created on `servers[client % len]`.
    pub servers: Vec<String>,
    pub clients: usize,
    /// Closed loop: every client sends its next request when the previous one ended, until this
    /// long has passed (requests in flight then are waited for) ...
    pub duration: Option<Duration>,
    /// ... and/or it has sent this many.
    pub requests_per_client: Option<usize>,
    pub mix: Mix,
    pub patch: pb::PatchModelRequest,
    /// Per-request deadline (sent as grpc-timeout; the client also gives up 5 s later).
    pub timeout: Duration,
    /// Bearer token for every client (servers with auth); else each client is `x-client-id:
    /// load-<n>`.
    pub token: Option<String>,
    /// TLS towards the servers (`--tls-ca`, …; `https://` servers).
    pub tls: super::tls::TlsArgs,
    pub seed: u64,
}

impl LoadConfig {
    pub fn new(servers: Vec<String>, clients: usize, mix: Mix) -> Self {
        Self {
            servers,
            clients,
            duration: None,
            requests_per_client: Some(6),
            mix,
            patch: pb::PatchModelRequest { model: "tiny".into(), ..Default::default() },
            timeout: Duration::from_secs(120),
            token: None,
            tls: super::tls::TlsArgs::default(),
            seed: 0,
        }
    }
}

/// What a load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub clients: usize,
    pub servers: usize,
    /// Requests that ended (any status).
    pub requests: usize,
    /// Requests that ended OK with every image.
    pub ok: usize,
    pub images: usize,
    pub failures: usize,
    /// From the first request to the end of the last.
    pub elapsed: Duration,
    /// End-to-end latency of the OK requests.
    pub latencies: Vec<Duration>,
    /// Time in queue of the OK requests (their `started.queue_seconds`).
    pub queue_times: Vec<Duration>,
    /// `started.batch_rows` of the OK requests (images in the UNet batch each one ran in).
    pub batch_rows: Vec<u32>,
    /// Final status of every request, by gRPC code name (`OK`, `RESOURCE_EXHAUSTED`, …;
    /// `CLIENT_TIMEOUT` when the client gave up, `INCOMPLETE` for a stream that ended OK
    /// without every image).
    pub codes: BTreeMap<String, usize>,
}

/// The `p`-th percentile (nearest rank) of unsorted values; zero when empty.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut v = values.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl LoadReport {
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }

    pub fn queue_percentile(&self, p: f64) -> Duration {
        percentile(&self.queue_times, p)
    }

    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn requests_per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Mean images per UNet batch, as the requests saw it.
    pub fn mean_batch_rows(&self) -> f64 {
        if self.batch_rows.is_empty() {
            return 0.0;
        }
        self.batch_rows.iter().map(|&r| r as f64).sum::<f64>() / self.batch_rows.len() as f64
    }

    fn merge(&mut self, o: LoadReport) {
        self.requests += o.requests;
        self.ok += o.ok;
        self.images += o.images;
        self.failures += o.failures;
        self.latencies.extend(o.latencies);
        self.queue_times.extend(o.queue_times);
        self.batch_rows.extend(o.batch_rows);
        for (k, v) in o.codes {
            *self.codes.entry(k).or_default() += v;
        }
    }

    /// The report as JSON (milliseconds for times).
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        serde_json::json!({
            "clients": self.clients,
            "servers": self.servers,
            "requests": self.requests,
            "ok": self.ok,
            "failures": self.failures,
            "images": self.images,
            "elapsed_s": (self.elapsed.as_secs_f64() * 1e3).round() / 1e3,
            "images_per_s": (self.images_per_second() * 1e3).round() / 1e3,
            "requests_per_s": (self.requests_per_second() * 1e3).round() / 1e3,
            "latency_ms": {"p50": ms(self.percentile(50.0)), "p95": ms(self.percentile(95.0)), "p99": ms(self.percentile(99.0)), "max": ms(self.percentile(100.0))},
            "queue_ms": {"p50": ms(self.queue_percentile(50.0)), "p95": ms(self.queue_percentile(95.0)), "p99": ms(self.queue_percentile(99.0))},
            "mean_batch_rows": (self.mean_batch_rows() * 100.0).round() / 100.0,
            "codes": self.codes,
        })
    }
}

/// Runs a closed-loop load (see [`LoadConfig`]): one session per client, then Generate after
/// Generate until the duration or the request count is reached. Bounded: at least one of the two
/// must be set, and every request has a deadline.
pub async fn load_test(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!cfg.servers.is_empty(), "no server to load");
    anyhow::ensure!(cfg.clients >= 1, "at least one client");
    anyhow::ensure!(cfg.duration.is_some() || cfg.requests_per_client.is_some(), "a load run needs a duration or a request count");
    let n = cfg.servers.len();
    let mut setup = Vec::with_capacity(cfg.clients);
    for c in 0..cfg.clients {
        let mut conns = Vec::with_capacity(n);
        for s in &cfg.servers {
            conns.push(super::tls::connect_with(s, &cfg.tls).await?);
        }
        let who = match &cfg.token {
            Some(t) => Identity { token: Some(t.clone()), client_id: None },
            None => Identity::client(&format!("load-{c}")),
        };
        let home = c % n;
        let session = conns[home]
            .patch_model(who.request(cfg.patch.clone(), Some(cfg.timeout)))
            .await
            .map_err(StatusError::from)
            .with_context(|| format!("PatchModel on {}", cfg.servers[home]))?
            .into_inner()
            .session_id;
        setup.push((conns, who, session));
    }
    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let mut tasks = Vec::with_capacity(cfg.clients);
    for (c, (mut conns, who, session)) in setup.into_iter().enumerate() {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(cfg.seed ^ (c as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut out = LoadReport::default();
            let mut i = 0usize;
            loop {
                if cfg.requests_per_client.is_some_and(|m| i >= m) || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let shape = cfg.mix.draw(&mut rng);
                let req = pb::GenerateRequest {
                    session_id: session.clone(),
                    prompts: (0..shape.images).map(|k| format!("object {k} of client {c}, request {i}, ink drawing")).collect(),
                    seed: Some(rng.next() >> 1),
                    steps: shape.steps,
                    width: shape.size,
                    height: shape.size,
                    sampler: crate::serve::convert::sampler_to_proto(shape.sampler) as i32,
                    ..Default::default()
                };
                let conn = &mut conns[(c + i) % n];
                let mut started: Option<pb::Started> = None;
                let call = generate(conn, &who, req, Some(cfg.timeout), |ev| {
                    if let pb::generate_response::Event::Started(s) = ev {
                        started = Some(*s);
                    }
                });
                let code = match tokio::time::timeout(cfg.timeout + Duration::from_secs(5), call).await {
                    Ok(Ok(r)) if r.images.len() == shape.images as usize => {
                        out.ok += 1;
                        out.images += r.images.len();
                        out.latencies.push(r.elapsed);
                        if let Some(s) = started {
                            out.queue_times.push(Duration::from_secs_f64(s.queue_seconds.max(0.0)));
                            out.batch_rows.push(s.batch_rows);
                        }
                        "OK"
                    }
                    Ok(Ok(_)) => "INCOMPLETE",
                    Ok(Err(s)) => {
                        tracing::debug!(error = %s, "load test request failed");
                        crate::serve::server::code_name(s.code())
                    }
                    Err(_) => "CLIENT_TIMEOUT",
                };
                if code != "OK" {
                    out.failures += 1;
                }
                out.requests += 1;
                *out.codes.entry(code.to_string()).or_default() += 1;
                i += 1;
            }
            (out, conns, who, session)
        }));
    }
    let mut report = LoadReport { clients: cfg.clients, servers: n, ..Default::default() };
    let mut ends = Vec::new();
    for t in tasks {
        let (out, conns, who, session) = t.await?;
        report.merge(out);
        ends.push((conns, who, session));
    }
    report.elapsed = start.elapsed();
    for (c, (mut conns, who, session)) in ends.into_iter().enumerate() {
        let _ = conns[c % n]
            .release_session(who.request(pb::ReleaseSessionRequest { session_id: session }, Some(Duration::from_secs(5))))
            .await;
    }
    Ok(report)
}

/// Where to read a server's resident memory.
#[derive(Clone, Debug)]
pub enum RssSource {
    /// A local process: `/proc/<pid>/status` (`VmRSS`).
    Pid(u32),
    /// An admin listener (`host:port`): `process_resident_memory_bytes` on `/metrics`.
    Metrics(String),
    /// This process (an in-process server; includes the load generator itself).
    ThisProcess,
}

impl std::fmt::Display for RssSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RssSource::Pid(p) => write!(f, "pid {p}"),
            RssSource::Metrics(a) => write!(f, "http://{a}/metrics"),
            RssSource::ThisProcess => write!(f, "this process"),
        }
    }
}

fn proc_rss(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `process_resident_memory_bytes` from a Prometheus text exposition.
pub fn rss_from_metrics(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).and_then(|v| v.trim().parse::<f64>().ok()).map(|v| v as u64)
}

fn metrics_rss(addr: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let addr = addr.trim_start_matches("http://").trim_end_matches('/').trim_end_matches("/metrics");
    let sock = std::net::ToSocketAddrs::to_socket_addrs(addr).ok()?.next()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut body = Vec::new();
    s.take(64 << 20).read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    rss_from_metrics(text.split_once("\r\n\r\n")?.1)
}

/// Reads the resident memory, in bytes (`None`: unreadable).
pub async fn read_rss(src: &RssSource) -> Option<u64> {
    let src = src.clone();
    tokio::task::spawn_blocking(move || match src {
        RssSource::Pid(p) => proc_rss(&p.to_string()),
        RssSource::Metrics(a) => metrics_rss(&a),
        RssSource::ThisProcess => proc_rss("self"),
    })
    .await
    .ok()
    .flatten()
}

/// Resident memory over a soak run, per source.
#[derive(Clone, Debug)]
pub struct RssTrace {
    pub source: String,
    /// (seconds since the start, bytes).
    pub samples: Vec<(f64, u64)>,
}

impl RssTrace {
    pub fn start(&self) -> Option<u64> {
        self.samples.first().map(|s| s.1)
    }

    pub fn end(&self) -> Option<u64> {
        self.samples.last().map(|s| s.1)
    }

    pub fn max(&self) -> Option<u64> {
        self.samples.iter().map(|s| s.1).max()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.source,
            "start_bytes": self.start(),
            "end_bytes": self.end(),
            "max_bytes": self.max(),
            "delta_bytes": match (self.start(), self.end()) { (Some(a), Some(b)) => Some(b as i64 - a as i64), _ => None },
            "samples": self.samples.iter().map(|(t, b)| serde_json::json!([(t * 10.0).round() / 10.0, b])).collect::<Vec<_>>(),
        })
    }
}

/// A soak: one load run while sampling the servers' resident memory (at the start, every
/// `every`, and at the end).
pub async fn soak(cfg: &LoadConfig, sources: &[RssSource], every: Duration) -> anyhow::Result<(LoadReport, Vec<RssTrace>)> {
    anyhow::ensure!(!sources.is_empty(), "a soak needs somewhere to read the server's memory from");
    let t0 = Instant::now();
    let mut traces: Vec<RssTrace> = sources.iter().map(|s| RssTrace { source: s.to_string(), samples: Vec::new() }).collect();
    for (t, s) in traces.iter_mut().zip(sources) {
        let b = read_rss(s).await.with_context(|| format!("reading the resident memory from {s}"))?;
        t.samples.push((0.0, b));
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let srcs = sources.to_vec();
    let sampler = tokio::spawn(async move {
        let mut got: Vec<Vec<(f64, u64)>> = vec![Vec::new(); srcs.len()];
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop_rx.wait_for(|v| *v) => break,
            }
            for (g, s) in got.iter_mut().zip(&srcs) {
                if let Some(b) = read_rss(s).await {
                    g.push((t0.elapsed().as_secs_f64(), b));
                }
            }
        }
        got
    });
    let report = load_test(cfg).await;
    let _ = stop_tx.send(true);
    let mid = sampler.await.unwrap_or_default();
    let report = report?;
    for ((t, s), m) in traces.iter_mut().zip(sources).zip(mid) {
        t.samples.extend(m);
        if let Some(b) = read_rss(s).await {
            t.samples.push((t0.elapsed().as_secs_f64(), b));
        }
    }
    Ok((report, traces))
}

// ---------------------------------------------------------------------------------------------
// The subcommand
// ---------------------------------------------------------------------------------------------

/// In-process server: which batching modes to measure.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BatchingArg {
    On,
    Off,
    Both,
}

/// `stylealign loadtest` flags.
#[derive(clap::Args)]
#[command(
    after_long_help = "Examples:\n  stylealign loadtest                                   # in-process tiny server, batching on and off, 1 and 4 clients\n  stylealign loadtest --server 127.0.0.1:50051,127.0.0.1:50052 --clients 1,4,16 --duration 30s --json\n  stylealign loadtest --server 127.0.0.1:50051 --mix 'sampler=ddim:3,euler_a:1;images=1:1,4:1' --duration 1m\n  stylealign loadtest --server 127.0.0.1:50051 --soak --duration 600s --clients 4 --server-pid 1234\n  stylealign loadtest --server 10.0.0.5:50051 --soak --duration 10m --metrics 10.0.0.5:9090"
)]
pub struct LoadArgs {
    /// Servers (`host:port` or URLs, comma-separated). Each client creates its session on one of
    /// them and sends request i to the next one round-robin (sessions must be valid on every
    /// server: replicas sharing --session-secret-file). Default: an in-process server on the tiny
    /// model (see --batching).
    #[arg(long, value_delimiter = ',')]
    pub server: Vec<String>,
    /// TLS towards --server (not the in-process server).
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    /// Concurrent clients (closed loop: each sends its next request when the last one ended). A
    /// list runs one measurement per count.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub clients: Vec<usize>,
    /// How long each measurement sends requests (`30s`, `2m`, `500ms`, or seconds); requests in
    /// flight at the end are waited for.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Requests per client (default 6 without --duration; with it, an upper bound).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Request mix, e.g. `ddim:3,euler:1` or `sampler=ddim:3,euler_a:1;images=1:1,4:1`.
    #[arg(long, long_help = MIX_HELP)]
    pub mix: Option<String>,
    /// Images (prompts) per request, where --mix does not say.
    #[arg(long, default_value_t = 2)]
    pub images: u32,
    /// Steps, where --mix does not say.
    #[arg(long, default_value_t = 8)]
    pub steps: u32,
    /// Width and height, where --mix does not say.
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Deadline of each request (`120s`, `2m`, or seconds; at most 1h), sent as grpc-timeout.
    #[arg(long, alias = "timeout-secs", value_parser = parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// Bearer token for every client (servers with auth); else client n sends `x-client-id: load-n`.
    #[arg(long, env = "STYLEALIGN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Label of the measurements in the output (default: `server`, or `batching-on` /
    /// `batching-off` in-process).
    #[arg(long)]
    pub label: Option<String>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Soak: one run of --duration (one --clients value) that reports the servers' resident
    /// memory at the start, every --rss-every and at the end (from --server-pid or --metrics; the
    /// in-process server: this process).
    #[arg(long, requires = "duration")]
    pub soak: bool,
    /// Soak: local server processes whose RSS to read from /proc/<pid>/status.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Soak: admin listeners (`host:port`) whose /metrics has process_resident_memory_bytes.
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Soak: RSS sampling interval.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub rss_every: Duration,
    /// In-process server: batching on, off, or both (one measurement each).
    #[arg(long, value_enum, default_value = "both")]
    pub batching: BatchingArg,
    /// In-process server: CPU workers.
    #[arg(long, default_value_t = 1)]
    pub cpu_workers: usize,
    /// Seed of the request mix and the image seeds.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `stylealign loadtest`: the table (or JSON document) goes to standard output, one row per
/// measurement as it ends.
pub async fn run(a: LoadArgs) -> anyhow::Result<()> {
    if a.clients.is_empty() || a.clients.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--clients: 1 to 1024 each");
    }
    if a.requests.is_some_and(|r| r == 0 || r > 1_000_000) {
        bail!("--requests: 1 to 1,000,000");
    }
    if a.timeout > Duration::from_secs(3600) {
        bail!("--timeout: at most 1h");
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
        out(format_args!(
            "mix {}; {}",
            mix.describe(),
            match (a.duration, requests) {
                (Some(d), Some(r)) => format!("{:.0} s or {r} requests per client", d.as_secs_f64()),
                (Some(d), None) => format!("{:.0} s per measurement", d.as_secs_f64()),
                (None, Some(r)) => format!("{r} requests per client"),
                (None, None) => unreachable!(),
            }
        ))?;
        out(format_args!(
            "{:<14} {:>7} {:>8} {:>6} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}  codes",
            "label", "clients", "requests", "ok", "images", "images/s", "p50 ms", "p95 ms", "p99 ms", "q50 ms", "q95 ms", "q99 ms", "rows"
        ))?;
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
        let cfg = LoadConfig {
            duration: a.duration,
            requests_per_client: requests,
            timeout: a.timeout,
            token: a.token.clone(),
            tls: if a.server.is_empty() { super::tls::TlsArgs::default() } else { a.tls.clone() },
            seed: a.seed,
            ..LoadConfig::new(servers, clients, mix.clone())
        };
        let label = a.label.clone().unwrap_or_else(|| match batching {
            Some(true) => "batching-on".into(),
            Some(false) => "batching-off".into(),
            None => "server".into(),
        });
        let r = if a.soak {
            let mut sources: Vec<RssSource> =
                a.server_pid.iter().map(|&p| RssSource::Pid(p)).chain(a.metrics.iter().map(|m| RssSource::Metrics(m.clone()))).collect();
            if sources.is_empty() {
                sources.push(RssSource::ThisProcess);
            }
            let (r, traces) = soak(&cfg, &sources, a.rss_every).await?;
            if !a.json {
                for t in &traces {
                    let mb = |b: Option<u64>| b.map(|b| format!("{:.1} MB", b as f64 / 1048576.0)).unwrap_or_else(|| "?".into());
                    out(format_args!(
                        "soak RSS ({}): start {}, end {}, max {}, {} samples",
                        t.source,
                        mb(t.start()),
                        mb(t.end()),
                        mb(t.max()),
                        t.samples.len()
                    ))?;
                }
            }
            soak_json = Some(
                serde_json::json!({"duration_s": a.duration.map(|d| d.as_secs_f64()), "rss": traces.iter().map(|t| t.to_json()).collect::<Vec<_>>()}),
            );
            r
        } else {
            load_test(&cfg).await?
        };
        let mut j = r.to_json();
        j["label"] = serde_json::json!(label);
        let mut lines = Vec::new();
        if !a.json {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            lines.push(format!(
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
            ));
        }
        if let Some(s) = server {
            let st = s.stats();
            let batches = crate::serve::metrics::Stats::get(&st.batches).max(1);
            let rows = crate::serve::metrics::Stats::get(&st.batch_rows) as f64 / batches as f64;
            if !a.json {
                lines.push(format!("{:<14} ({batches} batches, {rows:.2} rows/batch on average)", ""));
            }
            j["server_batches"] = serde_json::json!(batches);
            s.shutdown().await;
        }
        for l in lines {
            out(l)?;
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
        out(serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_draws_by_weight() {
        let m = Mix::parse("sampler=ddim:3,euler_a:1;images=1:1,4:1;size=32").unwrap();
        assert_eq!(m.sampler.0, vec![(SamplerKind::Ddim, 3), (SamplerKind::EulerAncestral, 1)]);
        assert_eq!(m.images.0, vec![(1, 1), (4, 1)]);
        assert!(m.steps.0.is_empty());
        let m = m.or(&Mix::fixed(SamplerKind::Ddim, 2, 8, 64));
        assert_eq!(m.describe(), "sampler=ddim:3,euler_a:1;images=1:1,4:1;steps=8:1;size=32:1");
        let mut rng = Rng::new(1);
        let n = 4000;
        let ddim = (0..n).filter(|_| m.draw(&mut rng).sampler == SamplerKind::Ddim).count();
        assert!((2800..3200).contains(&ddim), "{ddim}");
        assert_eq!(Mix::parse("ddim:3,euler").unwrap().sampler.0, vec![(SamplerKind::Ddim, 3), (SamplerKind::Euler, 1)]);
        // Older spellings of the samplers too.
        assert_eq!(
            Mix::parse("euler-a,dpmpp2m,dpmpp-2m-karras").unwrap().sampler.0,
            vec![(SamplerKind::EulerAncestral, 1), (SamplerKind::DpmPp2m, 1), (SamplerKind::DpmPp2mKarras, 1)]
        );
        for bad in ["nope", "sampler=ddim;sampler=euler", "size=7", "images=0", "ddim:x", "ddim:0", "colour=red"] {
            assert!(Mix::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles_and_metrics_text() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        let text = "# HELP process_resident_memory_bytes x\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 123456\nstylealign_sessions 2\n";
        assert_eq!(rss_from_metrics(text), Some(123456));
    }
}
