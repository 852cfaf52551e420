//! A Rust client of the service. This module: the connection, the caller's identity (metadata),
//! one Generate call collected, PNG output, contact sheets, and what the subcommands share
//! (durations, standard output that may be closed). The subcommands live next to it:
//! [`generate`](mod@generate) (`stylealign generate`), [`loadtest`] (`stylealign loadtest`: the load
//! generator, request mixes, soak), [`demo`] (`stylealign demo`); [`status`] prints errors.

pub mod demo;
pub mod generate;
pub mod loadtest;
pub mod status;
pub mod tls;

pub use status::StatusError;

use std::fmt::Display;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::serve::pb;
use crate::serve::pb::style_align_client::StyleAlignClient;

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

/// Connects to `server` (`host:port`, `http://…`, or `https://…` verified against the public web
/// roots); see [`tls::connect_with`] for the TLS options.
pub async fn connect(server: &str) -> anyhow::Result<StyleAlignClient<Channel>> {
    tls::connect_with(server, &tls::TlsArgs::default()).await
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

/// Standard output was closed by its reader (`stylealign loadtest | head -1`): the command stops
/// quietly.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Prints one line on standard output. A closed pipe is [`StdoutClosed`], not a panic.
pub fn out(line: impl Display) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    match writeln!(o, "{line}").and_then(|_| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Prints one line on standard error; a closed standard error is ignored.
pub fn err_line(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
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

/// A duration the way [`parse_duration`] reads it (`10m`, `30s`, `1.5s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 && s % 3600.0 == 0.0 {
        format!("{}h", s as u64 / 3600)
    } else if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{}m", s as u64 / 60)
    } else if s >= 1.0 {
        format!("{}s", (s * 1000.0).round() / 1000.0)
    } else {
        format!("{}ms", (s * 1e6).round() / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("0").is_err() && parse_duration("3y").is_err() && parse_duration("").is_err());
        for d in ["10m", "2h", "30s", "1.5s", "250ms"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }
}
