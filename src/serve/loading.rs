//! Loading the configured models on every device: weights, the model hash, one warm-up step.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use super::config::{ModelSource, ServeConfig};
use super::service::ModelEntry;
use super::worker::Models;
use crate::device::{self, DeviceSpec};
use crate::pipeline::{BatchSpec, Pipeline, PipelineError, SetSpec};
use crate::sampling::sampler::SamplerKind;
use crate::style_aligned::StyleAligned;

/// SHA-256 of a model's UNet weights file (see [`crate::model::hash`]).
fn model_sha256(src: &ModelSource, dev: &burn::tensor::Device) -> anyhow::Result<Arc<str>> {
    let t = Instant::now();
    let h = match src {
        ModelSource::Tiny => crate::pipeline::tiny::unet_sha256(dev).context("hashing the embedded model")?,
        ModelSource::Dir(d) => crate::model::hash::diffusers_unet_sha256(d).with_context(|| format!("hashing model {}", d.display()))?,
    };
    tracing::info!(model = ?src, sha256 = %h, elapsed_ms = t.elapsed().as_millis() as u64, "model hashed");
    Ok(Arc::from(h))
}

/// Loads every model on every device and warms each up with one step.
pub(super) fn load_all(cfg: &ServeConfig) -> anyhow::Result<Vec<(DeviceSpec, Models, Vec<ModelEntry>)>> {
    let mut out = Vec::new();
    // Model hashes, computed once per model (not per device).
    let mut hashes: Vec<Option<Arc<str>>> = vec![None; cfg.models.len()];
    for spec in &cfg.devices {
        let dev = device::open(spec).with_context(|| format!("opening device {spec}"))?;
        let mut models = Models::new();
        let mut entries = Vec::new();
        for (src, hash) in cfg.models.iter().zip(hashes.iter_mut()) {
            let t = Instant::now();
            let p = match src {
                ModelSource::Tiny => crate::pipeline::tiny::tiny_pipeline(&dev),
                ModelSource::Dir(d) => Pipeline::load(d, &dev),
            }
            .with_context(|| format!("loading model {src:?} on {spec}"))?;
            let sha256 = match hash {
                Some(h) => h.clone(),
                None => hash.insert(model_sha256(src, &dev)?).clone(),
            };
            let name: Arc<str> = Arc::from(p.name());
            if models.contains_key(&name) {
                anyhow::bail!("two models are named {name:?}; serve folders with distinct names");
            }
            tracing::info!(model = %name, family = p.family().as_str(), device = %spec, elapsed_ms = t.elapsed().as_millis() as u64, "model loaded");
            if cfg.warmup {
                let t = Instant::now();
                warm_up(&p).with_context(|| format!("warming up {name} on {spec}"))?;
                tracing::info!(model = %name, device = %spec, elapsed_ms = t.elapsed().as_millis() as u64, "warm-up step done");
            }
            let source = match src {
                ModelSource::Tiny => "<embedded>".to_string(),
                ModelSource::Dir(d) => d.display().to_string(),
            };
            entries.push(ModelEntry {
                name: name.clone(),
                family: p.family(),
                native_size: p.native_size(),
                size_multiple: p.size_multiple(),
                source,
                sha256,
                pipeline: p.clone(),
            });
            models.insert(name, p);
        }
        out.push((spec.clone(), models, entries));
    }
    Ok(out)
}

/// One denoising step of a two-image patched set at the smallest size.
fn warm_up(p: &Pipeline) -> Result<(), PipelineError> {
    let s = p.size_multiple();
    let batch = BatchSpec {
        width: s,
        height: s,
        steps: 1,
        guidance: 5.0,
        sampler: SamplerKind::Ddim,
        patch: Some(StyleAligned::default()),
        scope: Default::default(),
        size_conditioning: None,
    };
    let set = SetSpec { prompts: vec!["warm-up".into(), "warm-up".into()], negative_prompt: String::new(), seed: 0, ..Default::default() };
    p.generate(&batch, &[set], &mut |_, _| vec![true]).map(|_| ())
}
