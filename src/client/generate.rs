//! `stylealign generate`: one style-aligned set through a running server. The request comes from
//! the flags, the call has a deadline (`--timeout`, default 10 minutes), progress goes to standard
//! error (bars with an ETA on a terminal, one plain line per event otherwise), and the PNGs are
//! written under names that never overwrite a file ([`write_set`]).

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::{Identity, StatusError, err_line, format_duration, generate, out, parse_duration};
use crate::sampling::sampler::SamplerKind;
use crate::serve::convert::{priority_to_proto, sampler_to_proto, share_attn_to_proto, share_norm_to_proto};
use crate::serve::pb;
use crate::serve::pb::generate_response::Event;
use crate::serve::queue::Priority;
use crate::style_aligned::{NodeOptions, ShareAttn, ShareNorm};

/// One set: its prompts, sampling and StyleAligned options.
#[derive(clap::Args, Clone, Debug)]
pub struct SetArgs {
    /// Prompts of the set; the first is the style reference. Repeat the flag.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// With one prompt: how many images.
    #[arg(long, default_value_t = 0)]
    pub count: u32,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Default: random (reported in the PNGs and their file names).
    #[arg(long)]
    pub seed: Option<u64>,
    /// 0: the server's default.
    #[arg(long, default_value_t = 0)]
    pub steps: u32,
    #[arg(long)]
    pub guidance: Option<f32>,
    /// 0: the model's native size.
    #[arg(long, default_value_t = 0)]
    pub width: u32,
    #[arg(long, default_value_t = 0)]
    pub height: u32,
    #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
    pub sampler: SamplerKind,
    #[arg(long, value_enum, default_value_t = Priority::default())]
    pub priority: Priority,
    #[arg(long, default_value = "tiny")]
    pub model: String,
    #[arg(long, value_enum, default_value_t = NodeOptions::default().share_norm)]
    pub share_norm: ShareNorm,
    #[arg(long, value_enum, default_value_t = NodeOptions::default().share_attn)]
    pub share_attn: ShareAttn,
    #[arg(long, default_value_t = NodeOptions::default().scale)]
    pub scale: f32,
    /// The steps the patch acts on, as fractions of the schedule: `START,END` (e.g. `0,0.6`:
    /// the first 60 %). Default: every step. See docs/style-sharing.md.
    #[arg(long, value_name = "START,END", value_parser = parse_style_window)]
    pub style_window: Option<pb::StepWindow>,
    /// Options of one UNet level: `NAME[:OPT,...]`, NAME `down.K`, `mid`, `up.K` or `out`, OPT
    /// `off`, `on`, `gain=X`, `norm=on|off`, `attn=on|off` (e.g. `up.1:off`,
    /// `down.2:gain=0.5,norm=off`). Repeat the flag, once per level.
    #[arg(long, value_name = "LEVEL[:OPTS]", value_parser = parse_style_level)]
    pub style_level: Vec<pb::LevelOptions>,
    /// A LoRA of the server's LoRA folder (see `ListLoras`) and its weight: `NAME[:WEIGHT]`
    /// (weight 1 when left out; negative weights allowed, e.g. `detail:-0.5`). Repeat the flag,
    /// once per LoRA.
    #[arg(long = "lora", value_name = "NAME[:WEIGHT]", value_parser = parse_lora, allow_hyphen_values = true)]
    pub loras: Vec<pb::LoraWeight>,
    /// A PNG or JPEG to use as the set's style reference (real-image mode; every prompt is then
    /// a target). Needs `--reference-caption` and the ddim sampler.
    #[arg(long)]
    pub reference_image: Option<PathBuf>,
    /// The reference image's caption.
    #[arg(long, default_value = "")]
    pub reference_caption: String,
    /// Noise levels the reference starts ahead of the batch (below steps).
    #[arg(long, default_value_t = 0)]
    pub reference_offset: u32,
    /// img2img: a PNG or JPEG a target starts from, as `PATH` (the next target in order: from the
    /// second prompt, or the first with --reference-image) or `INDEX=PATH`. Repeatable.
    #[arg(long = "init-image", value_name = "[INDEX=]PATH")]
    pub init_images: Vec<String>,
    /// img2img strength of every --init-image, in (0, 1] (unset: the server's default, 0.8).
    #[arg(long)]
    pub strength: Option<f32>,
    /// A ControlNet on the targets (a name of ListModels' controlnets); its images are --control.
    #[arg(long, requires = "control")]
    pub controlnet: Option<String>,
    /// The --controlnet's image (PNG or JPEG): once for every target, or once per target in order.
    #[arg(long = "control", value_name = "PATH", requires = "controlnet")]
    pub control: Vec<PathBuf>,
    /// Multiplies the ControlNet's residuals (unset: 1.0).
    #[arg(long)]
    pub control_scale: Option<f32>,
    /// The ControlNet acts from this fraction of the steps (unset: 0).
    #[arg(long)]
    pub control_start: Option<f32>,
    /// The ControlNet acts up to this fraction of the steps (unset: 1).
    #[arg(long)]
    pub control_end: Option<f32>,
}

/// The img2img targets of `--init-image` values: `(index, path)`, unindexed values taking the
/// targets in order from `first`.
fn init_image_targets(values: &[String], first: u32) -> anyhow::Result<Vec<(u32, PathBuf)>> {
    let mut next = first;
    let mut out: Vec<(u32, PathBuf)> = Vec::new();
    for v in values {
        let (index, path) = match v.split_once('=') {
            Some((i, p)) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => {
                (i.parse::<u32>().with_context(|| format!("--init-image {v}: index {i} is too large"))?, p)
            }
            _ => (next, v.as_str()),
        };
        if out.iter().any(|(i, _)| *i == index) {
            anyhow::bail!("--init-image {v}: image {index} already has an init image");
        }
        next = index + 1;
        out.push((index, PathBuf::from(path)));
    }
    Ok(out)
}

impl SetArgs {
    /// The PatchModel request (the session's options).
    pub fn patch(&self) -> pb::PatchModelRequest {
        pb::PatchModelRequest {
            model: self.model.clone(),
            share_norm: share_norm_to_proto(self.share_norm) as i32,
            share_attn: share_attn_to_proto(self.share_attn) as i32,
            scale: Some(self.scale),
            advanced: None,
            window: self.style_window,
            levels: self.style_level.clone(),
            loras: self.loras.clone(),
        }
    }

    /// The Generate request on `session_id` (reads `--reference-image`).
    pub fn generate(&self, session_id: String) -> anyhow::Result<pb::GenerateRequest> {
        let reference_image = match &self.reference_image {
            Some(p) => std::fs::read(p).with_context(|| format!("reading --reference-image {}", p.display()))?,
            None => Vec::new(),
        };
        let first = u32::from(self.reference_image.is_none());
        let mut init_images = Vec::new();
        for (index, path) in init_image_targets(&self.init_images, first)? {
            let image = std::fs::read(&path).with_context(|| format!("reading --init-image {}", path.display()))?;
            init_images.push(pb::InitImage { index, image, strength: self.strength });
        }
        let mut controls = Vec::new();
        if let Some(model) = &self.controlnet {
            let images = self
                .control
                .iter()
                .map(|p| std::fs::read(p).with_context(|| format!("reading --control {}", p.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            controls.push(pb::Control {
                model: model.clone(),
                images,
                conditioning_scale: self.control_scale,
                start: self.control_start,
                end: self.control_end,
            });
        }
        Ok(pb::GenerateRequest {
            controls,
            init_images,
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
            sampler: sampler_to_proto(self.sampler) as i32,
            priority: priority_to_proto(self.priority) as i32,
            ..Default::default()
        })
    }
}

/// `--style-window START,END`: two numbers; the server checks their range.
pub fn parse_style_window(s: &str) -> Result<pb::StepWindow, String> {
    let (a, b) = s.split_once(',').ok_or_else(|| format!("expected START,END (e.g. 0,0.6), got {s:?}"))?;
    let num = |v: &str| v.trim().parse::<f32>().map_err(|_| format!("{v:?} is not a number"));
    Ok(pb::StepWindow { start: Some(num(a)?), end: Some(num(b)?) })
}

/// `--lora NAME[:WEIGHT]` (weight 1 when left out).
pub fn parse_lora(s: &str) -> Result<pb::LoraWeight, String> {
    let (name, weight) = match s.rsplit_once(':') {
        Some((n, w)) => (n, w.trim().parse::<f32>().map_err(|_| format!("weight {w:?} is not a number (expected NAME[:WEIGHT])"))?),
        None => (s, 1.0),
    };
    if name.is_empty() {
        return Err(format!("expected NAME[:WEIGHT] (e.g. ink:0.8), got {s:?}"));
    }
    Ok(pb::LoraWeight { name: name.to_string(), weight })
}

/// `--style-level NAME[:OPT,...]` (OPT: `off`, `on`, `gain=X`, `norm=on|off`, `attn=on|off`);
/// the server checks the level name against the model.
pub fn parse_style_level(s: &str) -> Result<pb::LevelOptions, String> {
    let (name, opts) = s.split_once(':').unwrap_or((s, ""));
    if name.is_empty() {
        return Err(format!("expected LEVEL[:OPTS] (e.g. up.1:off, down.2:gain=0.5,norm=off), got {s:?}"));
    }
    let mut level = pb::LevelOptions { name: name.to_string(), ..Default::default() };
    let switch = |v: &str| match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{v:?} is not on or off")),
    };
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            None if opt == "on" || opt == "off" => level.enabled = Some(opt == "on"),
            Some(("gain", v)) => level.gain = Some(v.parse::<f32>().map_err(|_| format!("gain {v:?} is not a number"))?),
            Some(("norm", v)) => level.share_group_norm = Some(switch(v)?),
            Some(("attn", v)) => level.share_attention = Some(switch(v)?),
            _ => return Err(format!("unknown level option {opt:?} (off, on, gain=X, norm=on|off, attn=on|off)")),
        }
    }
    Ok(level)
}

/// `stylealign generate` flags.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// `host:port`, `http://host:port` or `https://host:port`.
    #[arg(long, env = "STYLEALIGN_SERVER", default_value = "127.0.0.1:50051")]
    pub server: String,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    /// Output folder; images are written as `NNNNN-<seed>-<index>.png`, NNNNN one more than the
    /// highest number already there (existing files are never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub set: SetArgs,
    /// Bearer token (servers with auth).
    #[arg(long, env = "STYLEALIGN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// `x-client-id` (servers without auth).
    #[arg(long, env = "STYLEALIGN_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Deadline of the call (`10m`, `90s`, `500ms`, or seconds), sent as grpc-timeout: the server
    /// drops the request when it passes, queued or running.
    #[arg(long, alias = "timeout-secs", value_parser = parse_duration, default_value = "10m")]
    pub timeout: Duration,
}

/// How long the client waits beyond the deadline for the server's DEADLINE_EXCEEDED.
const GRACE: Duration = Duration::from_secs(5);
/// Deadline of PatchModel and ReleaseSession (quick calls; `--timeout` is Generate's).
const SESSION_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `stylealign generate`: PatchModel, Generate with progress, ReleaseSession, then writes the
/// images and prints their paths on standard output.
pub async fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let who = Identity { token: a.token.clone(), client_id: a.client_id.clone() };
    // Read the reference image before anything goes over the wire.
    let mut req = a.set.generate(String::new())?;
    let mut c = super::tls::connect_with(&a.server, &a.tls).await?;
    let session = c
        .patch_model(who.request(a.set.patch(), Some(SESSION_CALL_DEADLINE)))
        .await
        .map_err(StatusError::from)
        .context("PatchModel")?
        .into_inner();
    req.session_id = session.session_id.clone();
    let mut view = ProgressView::new(std::io::stderr().is_terminal());
    let start = Instant::now();
    let result = tokio::time::timeout(a.timeout + GRACE, generate(&mut c, &who, req, Some(a.timeout), |ev| view.event(ev))).await;
    view.finish();
    let _ = c.release_session(who.request(pb::ReleaseSessionRequest { session_id: session.session_id }, Some(SESSION_CALL_DEADLINE))).await;
    let result = match result {
        Ok(Ok(r)) => r,
        // tonic reports its own end of the deadline (before the server's answer) as CANCELLED.
        Ok(Err(s)) if s.code() == tonic::Code::Cancelled && start.elapsed() >= a.timeout => {
            bail!("Generate: DEADLINE_EXCEEDED: --timeout {} passed", format_duration(a.timeout))
        }
        Ok(Err(s)) => return Err(anyhow::Error::new(StatusError(s)).context("Generate")),
        Err(_) => bail!("Generate: DEADLINE_EXCEEDED: no answer within --timeout {}", format_duration(a.timeout)),
    };
    if result.images.is_empty() {
        bail!("Generate: the server sent no image");
    }
    for p in write_set(&a.out, &result.images)? {
        out(p.display())?;
    }
    Ok(())
}

/// Shows a Generate call's events on standard error: on a terminal a spinner while queued
/// (position), then a step bar with ETA for the set; elsewhere one plain line per event.
pub struct ProgressView {
    tty: bool,
    queued: Option<ProgressBar>,
    steps: Option<ProgressBar>,
}

impl ProgressView {
    pub fn new(tty: bool) -> Self {
        Self { tty, queued: None, steps: None }
    }

    /// The plain line of an event.
    pub fn line(ev: &Event) -> String {
        match ev {
            Event::Queued(q) => format!("queued: position {} of {}", q.position, q.queue_depth),
            Event::Started(s) => {
                format!("started: batch of {} images ({} requests) after {:.2}s in queue", s.batch_rows, s.batch_sets, s.queue_seconds)
            }
            Event::Progress(p) => format!("step {}/{}", p.step, p.total_steps),
            Event::Image(i) => format!("image {} ({}x{}, seed {}): {}", i.index, i.width, i.height, i.seed, i.prompt),
        }
    }

    pub fn event(&mut self, ev: &Event) {
        if !self.tty {
            err_line(Self::line(ev));
            return;
        }
        match ev {
            Event::Queued(q) => {
                let bar = self.queued.get_or_insert_with(|| {
                    let b = ProgressBar::new_spinner().with_style(style("{spinner} queued: {msg} ({elapsed})"));
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                });
                bar.set_message(format!("position {} of {}", q.position, q.queue_depth));
            }
            Event::Started(_) => {
                if let Some(b) = self.queued.take() {
                    b.finish_and_clear();
                }
                err_line(Self::line(ev));
                self.steps_bar();
            }
            Event::Progress(p) => {
                let bar = self.steps_bar();
                bar.set_length(p.total_steps as u64);
                bar.set_position(p.step as u64);
            }
            Event::Image(_) => match &self.steps {
                Some(b) => b.println(Self::line(ev)),
                None => err_line(Self::line(ev)),
            },
        }
    }

    fn steps_bar(&mut self) -> &ProgressBar {
        self.steps.get_or_insert_with(|| {
            ProgressBar::new(0).with_style(style("set  [{bar:32}] {pos}/{len} steps  {elapsed} elapsed, ETA {eta}").progress_chars("=> "))
        })
    }

    /// Ends the bars (the step bar stays on screen).
    pub fn finish(&mut self) {
        if let Some(b) = self.queued.take() {
            b.finish_and_clear();
        }
        if let Some(b) = self.steps.take() {
            b.abandon();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Writes a set's images as `<dir>/NNNNN-<seed>-<index>.png` and returns their paths. NNNNN (five
/// digits or more) is shared by the set's images and is one more than the highest number of the
/// PNGs already in `dir` (00000 in an empty folder), so a folder collects run after run. Files are
/// created exclusively: a number another process took meanwhile moves the set to the next one,
/// and no existing file is ever overwritten.
pub fn write_set(dir: &Path, images: &[pb::GeneratedImage]) -> anyhow::Result<Vec<PathBuf>> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut number = next_number(dir)?;
    'attempt: for _ in 0..1000 {
        let mut written = Vec::with_capacity(images.len());
        for img in images {
            let path = dir.join(format!("{number:05}-{}-{}.png", img.seed, img.index));
            let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
            match file {
                Ok(mut f) => {
                    written.push(path.clone());
                    f.write_all(&img.png).with_context(|| format!("writing {}", path.display()))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    for p in &written {
                        let _ = std::fs::remove_file(p);
                    }
                    number = next_number(dir)?.max(number + 1);
                    continue 'attempt;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("creating {}", path.display()))),
            }
        }
        return Ok(written);
    }
    bail!("{}: no free file number found", dir.display())
}

/// One more than the highest `NNNNN-…png` number in `dir` (0 when there is none).
fn next_number(dir: &Path) -> anyhow::Result<u64> {
    let mut next = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry.with_context(|| format!("reading {}", dir.display()))?.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(".png") {
            continue;
        }
        let digits: &str = &name[..name.find(|c: char| !c.is_ascii_digit()).unwrap_or(name.len())];
        if digits.len() >= 5
            && name[digits.len()..].starts_with('-')
            && let Ok(n) = digits.parse::<u64>()
        {
            next = next.max(n.saturating_add(1));
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(index: u32, seed: u64, png: &[u8]) -> pb::GeneratedImage {
        pb::GeneratedImage { index, seed, png: png.to_vec(), ..Default::default() }
    }

    #[test]
    fn init_images_take_targets_in_order_or_by_index() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let got = init_image_targets(&v(&["a.png", "3=b.png", "c.png"]), 1).unwrap();
        assert_eq!(got, [(1, "a.png".into()), (3, "b.png".into()), (4, "c.png".into())]);
        // With a reference image every prompt is a target; a path holding '=' stays a path.
        assert_eq!(init_image_targets(&v(&["x=y.png"]), 0).unwrap(), [(0, PathBuf::from("x=y.png"))]);
        let err = init_image_targets(&v(&["2=a.png", "1=b.png", "c.png"]), 1).unwrap_err().to_string();
        assert!(err.contains("image 2 already has an init image"), "{err}");
    }

    #[test]
    fn file_names_continue_the_numbering_and_never_overwrite() {
        let dir = std::env::temp_dir().join(format!("stylealign-write-set-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = write_set(&dir, &[image(0, 7, b"a"), image(1, 7, b"b")]).unwrap();
        let names = |v: &[PathBuf]| v.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>();
        assert_eq!(names(&first), ["00000-7-0.png", "00000-7-1.png"]);
        // Other files do not count; a higher number in the folder is continued.
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        std::fs::write(dir.join("00041-3-0.png"), "old").unwrap();
        let second = write_set(&dir, &[image(0, 9, b"c")]).unwrap();
        assert_eq!(names(&second), ["00042-9-0.png"]);
        assert_eq!(std::fs::read(&first[0]).unwrap(), b"a");
        assert_eq!(std::fs::read(dir.join("00041-3-0.png")).unwrap(), b"old");
        assert_eq!(std::fs::read(&second[0]).unwrap(), b"c");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plain_progress_is_one_line_per_event() {
        let ev = Event::Progress(pb::Progress { step: 3, total_steps: 8 });
        assert_eq!(ProgressView::line(&ev), "step 3/8");
        let ev = Event::Queued(pb::Queued { position: 2, queue_depth: 5 });
        assert_eq!(ProgressView::line(&ev), "queued: position 2 of 5");
    }
}
