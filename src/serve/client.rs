//! A Rust client of the service: connection, metadata, one Generate call collected, PNG output,
//! contact sheets and a small load test. Used by `stylealign generate`, `demo` and `loadtest`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::pb;
use super::pb::style_align_client::StyleAlignClient;
use crate::pipeline::image::Image;

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

/// Latency and throughput of a load run.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: usize,
    pub images: usize,
    pub failures: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl LoadReport {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut v = self.latencies.clone();
        v.sort();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `clients` concurrent clients each send `per_client` Generate requests (one after the
/// other) built by `make(client, i)` on `session` (each client's own session is made by
/// `patch`).
pub async fn load_test(server: &str, clients: usize, per_client: usize, patch: pb::PatchModelRequest, make: impl Fn(usize, usize) -> pb::GenerateRequest + Send + Sync + 'static) -> anyhow::Result<LoadReport> {
    let make = std::sync::Arc::new(make);
    let mut tasks = Vec::new();
    let mut conns = Vec::new();
    for c in 0..clients {
        let mut client = connect(server).await?;
        let who = Identity::client(&format!("load-{c}"));
        let session = client.patch_model(who.request(patch.clone(), None)).await?.into_inner().session_id;
        conns.push((client, who, session));
    }
    let t = Instant::now();
    for (c, (mut client, who, session)) in conns.into_iter().enumerate() {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut images, mut failures) = (0, 0);
            for i in 0..per_client {
                let req = pb::GenerateRequest { session_id: session.clone(), ..make(c, i) };
                match generate(&mut client, &who, req, None, |_| {}).await {
                    Ok(r) => {
                        images += r.images.len();
                        lat.push(r.elapsed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "load test request failed");
                        failures += 1;
                    }
                }
            }
            (lat, images, failures)
        }));
    }
    let mut report = LoadReport { clients, requests: 0, images: 0, failures: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for t in tasks {
        let (lat, images, failures) = t.await?;
        report.requests += lat.len();
        report.images += images;
        report.failures += failures;
        report.latencies.extend(lat);
    }
    report.elapsed = t.elapsed();
    Ok(report)
}
