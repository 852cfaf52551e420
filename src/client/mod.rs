//! A Rust client of the service: connection, metadata, one Generate call collected, PNG output,
//! contact sheets, and the load generator (closed loop over one or more servers, request mixes,
//! latency / queue-time percentiles, status counts, soak with resident memory). Used by
//! `stylealign generate`, `demo` and `loadtest`.

pub mod demo;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::serve::pb;
use crate::serve::pb::style_align_client::StyleAlignClient;
use crate::pipeline::image::Image;
use crate::sampling::sampler::SamplerKind;

/// Who the client is (sent as metadata).
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Sent as `x-client-id` (servers without auth).
    pub client_id: Option<String>,
}

impl Identity {
    pub fn client(id: &str) -> Self {
        Self { token: None, client_id: Some(id.to_string()) }
    }

    /// Wraps a message with this identity's metadata and an optional deadline (`grpc-timeout`).
    pub fn request<T>(&self, msg: T, timeout: Option<Duration>) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(Ok(v)) = self.token.as_ref().map(|t| format!("Bearer {t}").parse()) {
            r.metadata_mut().insert("authorization", v);
        }
        if let Some(Ok(v)) = self.client_id.as_ref().map(|c| c.parse()) {
            r.metadata_mut().insert("x-client-id", v);
        }
        if let Some(t) = timeout {
            r.set_timeout(t);
        }
        r
    }
}

/// `host:port` or a URL → a URL tonic accepts.
pub fn endpoint_url(server: &str) -> String {
    if server.contains("://") { server.to_string() } else { format!("http://{server}") }
}

pub async fn connect(server: &str) -> anyhow::Result<StyleAlignClient<Channel>> {
    let url = endpoint_url(server);
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad server address {server:?}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(StyleAlignClient::new(channel).max_decoding_message_size(256 << 20))
}

/// Everything one Generate call streamed.
#[derive(Clone, Debug, Default)]
pub struct SetResult {
    pub images: Vec<pb::GeneratedImage>,
    /// Every queue position reported.
    pub positions: Vec<u32>,
    pub started: Option<pb::Started>,
    /// Steps reported.
    pub steps: Vec<u32>,
    pub elapsed: Duration,
}

/// Calls Generate and collects the stream; `on_event` sees every message as it arrives.
pub async fn generate(
    client: &mut StyleAlignClient<Channel>,
    who: &Identity,
    req: pb::GenerateRequest,
    timeout: Option<Duration>,
    mut on_event: impl FnMut(&pb::generate_response::Event),
) -> Result<SetResult, Status> {
    use pb::generate_response::Event;
    let t = Instant::now();
    let mut stream = client.generate(who.request(req, timeout)).await?.into_inner();
    let mut out = SetResult::default();
    while let Some(msg) = stream.message().await? {
        let Some(ev) = msg.event else { continue };
        on_event(&ev);
        match ev {
            Event::Queued(q) => out.positions.push(q.position),
            Event::Started(s) => out.started = Some(s),
            Event::Progress(p) => out.steps.push(p.step),
            Event::Image(img) => out.images.push(img),
        }
    }
    out.elapsed = t.elapsed();
    Ok(out)
}

/// Writes `<prefix>_<index>.png` files; returns their paths.
pub fn write_images(dir: &Path, prefix: &str, images: &[pb::GeneratedImage]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    images
        .iter()
        .map(|img| {
            let path = dir.join(format!("{prefix}_{:02}.png", img.index));
            std::fs::write(&path, &img.png).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// A contact sheet (grid, `cols` per row) of PNG images of equal size, as PNG bytes.
pub fn contact_sheet(pngs: &[&[u8]], cols: usize) -> anyhow::Result<Vec<u8>> {
    let images = pngs.iter().map(|b| Image::from_png(b).map(|(i, _)| i).map_err(anyhow::Error::msg)).collect::<anyhow::Result<Vec<_>>>()?;
    let grid = Image::grid(&images, cols).context("images of different sizes (or none) for the contact sheet")?;
    Ok(grid.to_png(&[("title".to_string(), "stylealign contact sheet".to_string())]))
}

// ---------------------------------------------------------------------------------------------
// Load generator (`stylealign loadtest`)
// ---------------------------------------------------------------------------------------------

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
        Self { sampler: Weighted(vec![(sampler, 1)]), images: Weighted(vec![(images, 1)]), steps: Weighted(vec![(steps, 1)]), size: Weighted(vec![(size, 1)]) }
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
                            .map(|(v, w)| SamplerKind::parse(&v.replace('-', "_")).map(|s| (s, *w)).ok_or_else(|| format!("--mix: unknown sampler `{v}` (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras)")))
                            .collect::<Result<_, _>>()?,
                    )
                }
                "images" | "count" => mix.images = Weighted(items.iter().map(|(v, w)| num(v, 1, 64).map(|n| (n, *w))).collect::<Result<_, _>>()?),
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
            conns.push(connect(s).await?);
        }
        let who = match &cfg.token {
            Some(t) => Identity { token: Some(t.clone()), client_id: None },
            None => Identity::client(&format!("load-{c}")),
        };
        let home = c % n;
        let session = conns[home]
            .patch_model(who.request(cfg.patch.clone(), Some(cfg.timeout)))
            .await
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
        let _ = conns[c % n].release_session(who.request(pb::ReleaseSessionRequest { session_id: session }, Some(Duration::from_secs(5)))).await;
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

/// Parses `500ms`, `30s`, `2m`, `1h` or plain seconds (`90`, `1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?} (e.g. 30s, 2m, 500ms)"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" | "sec" | "secs" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs > 0.0 && secs <= 7.0 * 86400.0) {
        return Err(format!("duration {s:?} out of range (0, 7 days]"));
    }
    Ok(Duration::from_secs_f64(secs))
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
        for bad in ["nope", "sampler=ddim;sampler=euler", "size=7", "images=0", "ddim:x", "ddim:0", "colour=red"] {
            assert!(Mix::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("0").is_err() && parse_duration("3y").is_err() && parse_duration("").is_err());
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
