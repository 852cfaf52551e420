//! `stylealign bench`: one UNet step and the UNet's hot operations, timed on a device, with random
//! shape-accurate weights (no download). The PyTorch side of the same measurement is
//! `tools/gpu_bench_torch.py`; `tools/gpu_bench.sh` runs both and prints one table.
//!
//! ```text
//! stylealign bench --device cuda --dtype f16 --model sd15,sdxl --json
//! stylealign bench --tiny --steps 3      # tiny configs on the CPU (a dry run)
//! ```
//!
//! What is timed, per model (SD1.5 at 512², SDXL at 1024²; `--tiny`: the test fixtures' tiny
//! configs at 128²), batch 8 by default (4 images × CFG, `[uncond × 4 | cond × 4]`):
//!
//! - one UNet step, plain and with StyleAligned in both flavours (`sa-google`: the official
//!   `StyleAlignedArgs` defaults; `sa-node`: the ComfyUI node's defaults), references rows 0 and
//!   B/2 as both upstream codes do. `--warmup` untimed steps first (kernel compilation and
//!   autotuning happen there), then `--steps` timed steps, each ended by reading one scalar of the
//!   output back to the host, so that the device has finished it;
//! - the operations at the UNet's shapes ([`ops`]): GroupNorm at the first level (plain and with
//!   the reference's statistics shared), self-attention at the first level that has one (plain
//!   and both StyleAligned flavours, projections included), a 3×3 convolution at the first level
//!   and the feed-forward's two matmuls. Each runs `--op-iters` times chained (each output is the
//!   next input) after as many untimed calls, then the device is synchronised.
//!
//! Weights come from [`Weights::synthetic`] (deterministic, PyTorch-like scales), inputs from a
//! fixed hash. The JSON (`--json`) has one object: the run's settings, `unet` rows and `ops` rows
//! (the schema of `tools/gpu_bench_torch.py`, plus `notes`; `tools/gpu_bench_table.py` reads both).

mod model_folder;
mod ops;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::device::{self, DeviceSpec};
use crate::model::config::RawConfig;
use crate::model::precision::Precision;
use crate::model::single_file::{DEFAULT_SD1, DEFAULT_SDXL};
use crate::model::unet::{NoHooks, TextTime, UNet, UNetConfig, UNetHooks};
use crate::model::weights::Weights;
use crate::style_aligned::{NodeOptions, OfficialArgs, ReferencePlan, StyleAligned, StyleAlignedHooks};

/// The architectures the bench builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchModel {
    /// Stable Diffusion 1.5's UNet (diffusers config of runwayml/stable-diffusion-v1-5), 512².
    Sd15,
    /// SDXL base's UNet (diffusers config of stabilityai/stable-diffusion-xl-base-1.0), 1024².
    Sdxl,
}

impl BenchModel {
    fn name(self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sdxl => "sdxl",
        }
    }
}

/// A UNet call's StyleAligned setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Variant {
    /// No patch.
    #[value(name = "plain")]
    #[serde(rename = "plain")]
    Plain,
    /// The official google/style-aligned `StyleAlignedArgs` defaults.
    #[value(name = "sa-google")]
    #[serde(rename = "sa-google")]
    SaGoogle,
    /// The ComfyUI node's defaults (share_norm both, share_attn q+k, scale 1).
    #[value(name = "sa-node")]
    #[serde(rename = "sa-node")]
    SaNode,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::SaGoogle => "sa-google",
            Self::SaNode => "sa-node",
        }
    }

    fn patch(self) -> Option<StyleAligned> {
        match self {
            Self::Plain => None,
            Self::SaGoogle => Some(StyleAligned::Official(OfficialArgs::default())),
            Self::SaNode => Some(StyleAligned::Node(NodeOptions::default())),
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Device: `cpu`, `cuda`, `cuda:N` (and what else this build's `--device` accepts).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute dtype: the UNet's weights are loaded in it and the operations are cast to it (what
    /// stays f32 inside the UNet is docs/precision.md's list).
    #[arg(long, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Architectures to measure (comma-separated).
    #[arg(long = "model", value_enum, value_delimiter = ',', default_values_t = [BenchModel::Sd15, BenchModel::Sdxl])]
    pub models: Vec<BenchModel>,
    /// The tiny test configs of the same families instead (a dry run on the CPU).
    #[arg(long)]
    pub tiny: bool,
    /// Image side in pixels (latent = side / 8). Default: 512 for sd15, 1024 for sdxl, 128 with --tiny.
    #[arg(long)]
    pub size: Option<usize>,
    /// Rows per UNet call (4 images × CFG = 8).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// StyleAligned settings of the UNet rows (comma-separated).
    #[arg(long = "variant", value_enum, value_delimiter = ',', default_values_t = [Variant::Plain, Variant::SaGoogle, Variant::SaNode])]
    pub variants: Vec<Variant>,
    /// Untimed UNet steps before timing (kernel compilation, autotuning).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed UNet steps per variant.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Timed calls per operation (after as many untimed ones); 0 skips the operations.
    #[arg(long, default_value_t = 20)]
    pub op_iters: usize,
    /// Skip the UNet steps (operations only).
    #[arg(long)]
    pub no_unet: bool,
    /// Print one JSON object on standard output (the human table goes to standard error).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON document to this file, rewritten after every measured setting (a run
    /// cut short by a time limit keeps what it measured).
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
    /// Instead of measuring: write a diffusers folder with SD1.5's architecture (the tiny test
    /// configs with --tiny) and random weights here, to serve with `stylealign serve --model DIR`.
    #[arg(long, value_name = "DIR")]
    pub write_model: Option<std::path::PathBuf>,
}

/// One timed UNet setting.
#[derive(Debug, Serialize)]
pub struct UnetRow {
    pub model: &'static str,
    pub size: usize,
    pub variant: &'static str,
    pub mode: &'static str,
    /// The dtype the UNet computed in.
    pub dtype: &'static str,
    pub warmup_s: f64,
    pub ms: f64,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Mean |output| of the last step (a sanity check that the output is finite and not zero).
    pub out_abs_mean: f64,
}

/// One timed operation.
#[derive(Debug, Serialize)]
pub struct OpRow {
    pub model: &'static str,
    pub op: &'static str,
    pub variant: &'static str,
    pub shape: Vec<usize>,
    pub dtype: &'static str,
    pub ms: f64,
}

/// Something that failed without ending the run (the other rows are still measured).
#[derive(Debug, Serialize)]
pub struct ErrorRow {
    pub model: &'static str,
    pub what: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub version: &'static str,
    pub device: String,
    pub dtype: &'static str,
    pub batch: usize,
    pub warmup: usize,
    pub steps: usize,
    pub op_iters: usize,
    pub tiny: bool,
    pub unet: Vec<UnetRow>,
    pub ops: Vec<OpRow>,
    pub errors: Vec<ErrorRow>,
    /// What differs from the settings asked for (e.g. a dtype the UNet cannot use in this build).
    pub notes: Vec<String>,
}

impl Report {
    /// Writes the document to `path` (through a temporary file, so a reader never sees half).
    fn save(&self, path: Option<&Path>) -> anyhow::Result<()> {
        let Some(path) = path else { return Ok(()) };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(self)?).with_context(|| format!("--out {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("--out {}", path.display()))?;
        Ok(())
    }
}

const TINY_SD15: &str = include_str!("tiny/unet_sd15.json");
const TINY_SDXL: &str = include_str!("tiny/unet_sdxl.json");

/// The UNet config of `model` (the real one, or the tiny test config with `tiny`).
pub fn unet_config(model: BenchModel, tiny: bool) -> anyhow::Result<UNetConfig> {
    let name = format!("<embedded {}{} unet config>", if tiny { "tiny " } else { "" }, model.name());
    let raw = match (model, tiny) {
        (BenchModel::Sd15, true) => RawConfig::parse(Path::new(&name), TINY_SD15)?,
        (BenchModel::Sdxl, true) => RawConfig::parse(Path::new(&name), TINY_SDXL)?,
        (m, false) => {
            let all: serde_json::Value = serde_json::from_str(if m == BenchModel::Sd15 { DEFAULT_SD1 } else { DEFAULT_SDXL })?;
            let unet = all.get("unet").context("embedded defaults have no `unet` part")?;
            RawConfig::parse(Path::new(&name), &unet.to_string())?
        }
    };
    Ok(UNetConfig::from_raw(&raw)?)
}

/// Deterministic inputs in [-1, 1) from a hash of the index.
fn det(n: usize, salt: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(0x9e37_79b9)) % 2000) as f32 / 1000.0 - 1.0).collect()
}

/// The plan of a batch: two CFG halves with one style group each (references 0 and B/2), or one
/// group for an odd batch.
pub fn batch_plan(batch: usize) -> anyhow::Result<ReferencePlan> {
    let halves = if batch >= 2 && batch.is_multiple_of(2) { 2 } else { 1 };
    Ok(ReferencePlan::from_groups(&[batch / halves], halves, 1.0)?)
}

/// Seconds → milliseconds statistics: (mean, median, min, max).
fn stats(ms: &mut [f64]) -> (f64, f64, f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let n = ms.len();
    let mean = ms.iter().sum::<f64>() / n as f64;
    let median = if !n.is_multiple_of(2) { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
    (mean, median, ms[0], ms[n - 1])
}

/// Waits for the device: reads one scalar derived from `t` back to the host.
fn read_scalar<const D: usize>(t: Tensor<D>) -> anyhow::Result<f32> {
    t.abs().mean().try_into_scalar::<f32>().map_err(|e| anyhow::anyhow!("reading the result back from the device: {e:?}"))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct UnetInputs {
    sample: Tensor<4>,
    timesteps: Tensor<1>,
    ehs: Tensor<3>,
    text_time: Option<TextTime>,
}

fn unet_inputs(cfg: &UNetConfig, batch: usize, latent: usize, device: &Device) -> UnetInputs {
    let seq = 77;
    let d = cfg.cross_attention_dim[0];
    let c = cfg.in_channels;
    let sample = Tensor::<4>::from_data(TensorData::new(det(batch * c * latent * latent, 1), [batch, c, latent, latent]), device);
    let ehs = Tensor::<3>::from_data(TensorData::new(det(batch * seq * d, 2), [batch, seq, d]), device);
    let timesteps = Tensor::<1>::from_data(TensorData::new(vec![421f32; batch], [batch]), device);
    let text_time = cfg.text_embeds_dim().map(|td| {
        let px = (latent * 8) as f32;
        TextTime {
            text_embeds: Tensor::from_data(TensorData::new(det(batch * td, 3), [batch, td]), device),
            time_ids: Tensor::from_data(
                TensorData::new((0..batch).flat_map(|_| [px, px, 0.0, 0.0, px, px]).collect::<Vec<f32>>(), [batch, 6]),
                device,
            ),
        }
    });
    UnetInputs { sample, timesteps, ehs, text_time }
}

/// Times the UNet steps of `model` for every variant.
fn bench_unet(a: &BenchArgs, model: BenchModel, size: usize, device: &Device, report: &mut Report) -> anyhow::Result<()> {
    // The UNet's weights are loaded in the dtype asked for (crate::model::precision).
    let dtype = a.dtype;
    let cfg = unet_config(model, a.tiny)?;
    let latent = size / 8;
    if !size.is_multiple_of(8) || latent == 0 || !latent.is_multiple_of(cfg.latent_multiple()) {
        bail!("--size {size}: the latent side (size / 8) must be a positive multiple of {}", cfg.latent_multiple());
    }
    let t0 = Instant::now();
    let weights = Weights::synthetic(&format!("bench {}", model.name()), 0x5eed, device).with_dtype(dtype.float_dtype());
    let unet = UNet::from_weights(cfg, &weights).context("building the UNet")?;
    drop(weights);
    eprintln!("bench: {} UNet built with synthetic weights in {:.1} s", model.name(), t0.elapsed().as_secs_f64());
    let inputs = unet_inputs(&unet.config, a.batch, latent, device);
    for &variant in &a.variants {
        let hooks: Box<dyn UNetHooks> = match variant.patch() {
            None => Box::new(NoHooks),
            Some(patch) => Box::new(StyleAlignedHooks::new(&patch, batch_plan(a.batch)?, unet.self_attention_layers(), device)?),
        };
        let step = || -> anyhow::Result<f32> {
            let out =
                unet.forward(inputs.sample.clone(), inputs.timesteps.clone(), &inputs.ehs, inputs.text_time.as_ref(), hooks.as_ref())?;
            read_scalar(out)
        };
        let w0 = Instant::now();
        for _ in 0..a.warmup {
            step()?;
        }
        let warmup_s = w0.elapsed().as_secs_f64();
        let mut ms = Vec::with_capacity(a.steps);
        let mut last = f32::NAN;
        for _ in 0..a.steps {
            let t = Instant::now();
            last = step()?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        if !last.is_finite() {
            bail!("{} {}: the UNet output is not finite", model.name(), variant.name());
        }
        let (mean, median, min, max) = stats(&mut ms);
        eprintln!("bench: {} {}: {mean:.2} ms/step (warm-up {warmup_s:.1} s)", model.name(), variant.name());
        report.unet.push(UnetRow {
            model: model.name(),
            size,
            variant: variant.name(),
            mode: "burn",
            dtype: dtype.as_str(),
            warmup_s: round3(warmup_s),
            ms: round3(mean),
            median_ms: round3(median),
            min_ms: round3(min),
            max_ms: round3(max),
            out_abs_mean: f64::from(last),
        });
        report.save(a.out.as_deref())?;
    }
    Ok(())
}

/// Runs the bench and prints its report.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&a)).await.context("the bench thread failed")?
}

fn check_args(a: &BenchArgs) -> anyhow::Result<()> {
    if a.batch == 0 || a.batch > 64 {
        bail!("--batch {}: expected 1 to 64 rows", a.batch);
    }
    if a.steps == 0 && !a.no_unet {
        bail!("--steps 0: at least one timed step (or --no-unet)");
    }
    if a.steps > 10_000 || a.op_iters > 10_000 || a.warmup > 10_000 {
        bail!("--steps, --warmup and --op-iters take at most 10000");
    }
    if a.models.is_empty() {
        bail!("--model: at least one of sd15, sdxl");
    }
    if let Some(s) = a.size
        && (s == 0 || s > 4096 || !s.is_multiple_of(8))
    {
        bail!("--size {s}: expected a multiple of 8 from 8 to 4096 pixels");
    }
    Ok(())
}

fn run_blocking(a: &BenchArgs) -> anyhow::Result<()> {
    check_args(a)?;
    if let Some(dir) = &a.write_model {
        let t0 = Instant::now();
        model_folder::write(dir, a.tiny).with_context(|| format!("--write-model {}", dir.display()))?;
        eprintln!("bench: wrote {} in {:.1} s", dir.display(), t0.elapsed().as_secs_f64());
        return Ok(());
    }
    let device = device::open(&a.device).with_context(|| format!("--device {}", a.device))?;
    if !a.dtype.supported_on(&device) {
        bail!("--dtype {}: device {} does not support it", a.dtype.as_str(), a.device);
    }
    let mut report = Report {
        implementation: "stylealign",
        version: env!("CARGO_PKG_VERSION"),
        device: device::describe(&a.device),
        dtype: a.dtype.as_str(),
        batch: a.batch,
        warmup: a.warmup,
        steps: a.steps,
        op_iters: a.op_iters,
        tiny: a.tiny,
        unet: Vec::new(),
        ops: Vec::new(),
        errors: Vec::new(),
        notes: Vec::new(),
    };
    for &model in &a.models {
        let size = a.size.unwrap_or(match (a.tiny, model) {
            (true, _) => 128,
            (false, BenchModel::Sd15) => 512,
            (false, BenchModel::Sdxl) => 1024,
        });
        if a.op_iters > 0 {
            let cfg = unet_config(model, a.tiny)?;
            if let Err(e) = guarded(|| ops::bench_ops(a, model.name(), &cfg, size / 8, &device, &mut report.ops)) {
                eprintln!("bench: {} operations: {e:#}", model.name());
                report.errors.push(ErrorRow { model: model.name(), what: "ops".into(), error: format!("{e:#}") });
            }
            report.save(a.out.as_deref())?;
        }
        if !a.no_unet
            && let Err(e) = guarded(|| bench_unet(a, model, size, &device, &mut report))
        {
            eprintln!("bench: {} UNet: {e:#}", model.name());
            report.errors.push(ErrorRow { model: model.name(), what: "unet".into(), error: format!("{e:#}") });
        }
        report.save(a.out.as_deref())?;
    }
    let table = human_table(&report);
    if a.json {
        eprint!("{table}");
        crate::client::out(serde_json::to_string(&report)?)?;
    } else {
        print!("{table}");
    }
    if report.unet.is_empty() && report.ops.is_empty() {
        bail!("nothing was measured ({} error(s))", report.errors.len());
    }
    Ok(())
}

/// Runs `f`, turning a panic inside the backend (an out-of-memory, a kernel that fails to
/// compile) into an error, so that the other rows are still measured and reported.
fn guarded(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            bail!("panicked: {message}")
        }
    }
}

fn human_table(r: &Report) -> String {
    let mut s = format!(
        "stylealign bench: {}, {}, batch {}, {} warm-up + {} timed steps, {} calls per operation\n",
        r.device, r.dtype, r.batch, r.warmup, r.steps, r.op_iters
    );
    for u in &r.unet {
        s += &format!(
            "  unet {:5} {:>5}px {:10} {:4} {:9.2} ms/step (median {:.2}, min {:.2}; warm-up {:.1} s)\n",
            u.model, u.size, u.variant, u.dtype, u.ms, u.median_ms, u.min_ms, u.warmup_s
        );
    }
    for o in &r.ops {
        s += &format!("  op   {:5} {:12} {:10} {:4} {:>22} {:9.3} ms\n", o.model, o.op, o.variant, o.dtype, format!("{:?}", o.shape), o.ms);
    }
    for n in &r.notes {
        s += &format!("  note: {n}\n");
    }
    for e in &r.errors {
        s += &format!("  error {} {}: {}\n", e.model, e.what, e.error);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_configs_parse_with_their_real_sizes() {
        let sd15 = unet_config(BenchModel::Sd15, false).unwrap();
        assert_eq!(sd15.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(sd15.cross_attention_dim[0], 768);
        let sdxl = unet_config(BenchModel::Sdxl, false).unwrap();
        assert_eq!(sdxl.transformer_layers_per_block, vec![1, 2, 10]);
        assert_eq!(sdxl.text_embeds_dim(), Some(1280));
        for m in [BenchModel::Sd15, BenchModel::Sdxl] {
            assert!(unet_config(m, true).unwrap().block_out_channels[0] < 64);
        }
    }

    #[test]
    fn batch_plans_use_rows_zero_and_half() {
        assert_eq!(batch_plan(8).unwrap().reference_of, vec![0, 0, 0, 0, 4, 4, 4, 4]);
        assert_eq!(batch_plan(3).unwrap().reference_of, vec![0, 0, 0]);
    }

    #[test]
    fn stats_of_an_even_count() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(stats(&mut v), (2.5, 2.5, 1.0, 4.0));
    }
}
