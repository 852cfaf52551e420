//! Loading the configured models on every device: weights, the model hash, one warm-up step.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use super::config::{ControlNetSource, ModelSource, ServeConfig};
use super::service::{ControlNetEntry, ModelDetails, ModelEntry};
use super::worker::Models;
use crate::device::{self, DeviceSpec};
use crate::model::precision::{self, Precision};
use crate::pipeline::single_file::{self, PredictionOrigin};
use crate::pipeline::{BatchSpec, Pipeline, PipelineError, SetSpec};
use crate::sampling::sampler::SamplerKind;
use crate::style_aligned::StyleAligned;

/// SHA-256 of a model's UNet weights file (see [`crate::model::hash`]).
fn model_sha256(src: &ModelSource, dev: &burn::tensor::Device) -> anyhow::Result<Arc<str>> {
    let t = Instant::now();
    let h = match src {
        ModelSource::Tiny => crate::pipeline::tiny::unet_sha256(dev).context("hashing the embedded model")?,
        ModelSource::Dir(d) => crate::model::hash::diffusers_unet_sha256(d).with_context(|| format!("hashing model {}", d.display()))?,
        // A1111's hash of a single file: the SHA-256 of the whole file.
        ModelSource::File(f) => crate::model::hash::sha256_file(f).with_context(|| format!("hashing model {}", f.display()))?,
    };
    tracing::info!(model = ?src, sha256 = %h, elapsed_ms = t.elapsed().as_millis() as u64, "model hashed");
    Ok(Arc::from(h))
}

/// A model source as logs and ListModels show it.
fn source_label(src: &ModelSource) -> String {
    match src {
        ModelSource::Tiny => "<embedded>".to_string(),
        ModelSource::Dir(d) => d.display().to_string(),
        ModelSource::File(f) => f.display().to_string(),
    }
}

/// Format, weight dtype and prediction type of a loaded model, for ListModels.
fn model_details(src: &ModelSource, p: &Pipeline, file: Option<&single_file::SingleFileInfo>) -> ModelDetails {
    let prediction_type = single_file::prediction_name(p.scheduler_config().prediction);
    match (src, file) {
        (ModelSource::File(_), Some(i)) => ModelDetails {
            format: "single_file",
            dtype: single_file::dtype_name(i.dtype),
            prediction_type,
            prediction_type_source: i.prediction_origin.as_str(),
            ema: i.ema,
        },
        (ModelSource::Dir(d), _) => {
            // The dtype of the UNet weights file (the file the hash covers).
            let dtype = crate::model::weights::weight_file(&d.join("unet"), "diffusion_pytorch_model")
                .ok()
                .and_then(|f| crate::model::weights::Weights::open(&f, p.device()).ok())
                .and_then(|w| w.stored_dtype())
                .map_or("fp32", single_file::dtype_name);
            ModelDetails {
                format: "diffusers",
                dtype,
                prediction_type,
                prediction_type_source: PredictionOrigin::Config.as_str(),
                ema: false,
            }
        }
        _ => ModelDetails {
            format: "embedded",
            dtype: "fp32",
            prediction_type,
            prediction_type_source: PredictionOrigin::Config.as_str(),
            ema: false,
        },
    }
}

/// What one device holds once loaded.
pub(super) struct Loaded {
    pub spec: DeviceSpec,
    /// The opened device.
    pub device: burn::tensor::Device,
    pub models: Models,
    pub entries: Vec<ModelEntry>,
    pub controlnets: Vec<ControlNetEntry>,
}

/// SHA-256 of a ControlNet's weights file (a single file, or a folder's weights file).
fn controlnet_sha256(src: &ControlNetSource, dev: &burn::tensor::Device) -> anyhow::Result<Arc<str>> {
    let h = match src {
        ControlNetSource::Tiny => crate::pipeline::tiny::controlnet_sha256(dev).context("hashing the embedded ControlNet")?,
        ControlNetSource::Path(p) if p.is_dir() => {
            let file = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]
                .iter()
                .map(|f| p.join(f))
                .find(|f| f.is_file())
                .with_context(|| format!("ControlNet {}: no diffusion_pytorch_model[.fp16].safetensors", p.display()))?;
            crate::model::hash::sha256_file(&file).with_context(|| format!("hashing ControlNet {}", file.display()))?
        }
        ControlNetSource::Path(p) => crate::model::hash::sha256_file(p).with_context(|| format!("hashing ControlNet {}", p.display()))?,
    };
    Ok(Arc::from(h))
}

/// Loads every ControlNet on `dev`, each checked against the device's models (a ControlNet that
/// fits none of them is refused: it could never be used).
fn load_controlnets(
    cfg: &ServeConfig,
    spec: &DeviceSpec,
    dev: &burn::tensor::Device,
    models: &mut Models,
    hashes: &mut [Option<Arc<str>>],
) -> anyhow::Result<Vec<ControlNetEntry>> {
    let mut out = Vec::new();
    for (src, hash) in cfg.controlnets.iter().zip(hashes.iter_mut()) {
        let t = Instant::now();
        let net = match src {
            ControlNetSource::Tiny => crate::pipeline::tiny::tiny_controlnet(dev).map_err(anyhow::Error::from),
            ControlNetSource::Path(p) => crate::model::controlnet::ControlNet::load(p, dev).map_err(anyhow::Error::from),
        }
        .with_context(|| format!("loading ControlNet {src:?} on {spec}"))?;
        let name: Arc<str> = Arc::from(src.name());
        if models.controlnets.contains_key(&name) {
            anyhow::bail!("two ControlNets are named {name:?}; serve files and folders with distinct names");
        }
        let fits = models.pipelines.values().any(|p| super::service::fits(&net, p).is_ok());
        if !fits {
            let why: Vec<String> = models
                .pipelines
                .values()
                .filter_map(|p| super::service::fits(&net, p).err().map(|e| format!("{}: {e}", p.name())))
                .collect();
            anyhow::bail!("ControlNet {name} ({}) fits none of the served models ({})", net.family().as_str(), why.join("; "));
        }
        let sha256 = match hash {
            Some(h) => h.clone(),
            None => hash.insert(controlnet_sha256(src, dev)?).clone(),
        };
        tracing::info!(controlnet = %name, family = net.family().as_str(), device = %spec, elapsed_ms = t.elapsed().as_millis() as u64, "ControlNet loaded");
        let source = match src {
            ControlNetSource::Tiny => "<embedded>".to_string(),
            ControlNetSource::Path(p) => p.display().to_string(),
        };
        let net = Arc::new(net);
        out.push(ControlNetEntry { name: name.clone(), family: net.family(), source, sha256, net: net.clone() });
        models.controlnets.insert(name, net);
    }
    Ok(out)
}

/// The dtype models load in on `dev`: `--dtype`, else the device's default; refused when the
/// device cannot compute in it.
fn choose_precision(wanted: Option<Precision>, spec: &str, dev: &burn::tensor::Device) -> anyhow::Result<Precision> {
    let dtype = wanted.unwrap_or_else(|| Precision::default_for(dev));
    if !dtype.supported_on(dev) {
        let usable: Vec<&str> = Precision::ALL.iter().filter(|p| p.supported_on(dev)).map(|p| p.as_str()).collect();
        let origin = if wanted.is_some() { "--dtype" } else { "the default --dtype" };
        anyhow::bail!(
            "{origin} {dtype} is not supported on device {spec}: it cannot compute in {dtype}; pass --dtype {} (what it supports: {})",
            usable.first().copied().unwrap_or("f32"),
            if usable.is_empty() { "none".to_string() } else { usable.join(", ") }
        );
    }
    Ok(dtype)
}

/// Loads every model and ControlNet on every device and warms each model up with one step.
pub(super) fn load_all(cfg: &ServeConfig) -> anyhow::Result<Vec<Loaded>> {
    let mut out = Vec::new();
    let mut net_hashes: Vec<Option<Arc<str>>> = vec![None; cfg.controlnets.len()];
    // Model hashes, computed once per model (not per device).
    let mut hashes: Vec<Option<Arc<str>>> = vec![None; cfg.models.len()];
    for spec in &cfg.devices {
        let dev = device::open(spec).with_context(|| format!("opening device {spec}"))?;
        let dtype = choose_precision(cfg.dtype, &spec.to_string(), &dev)?;
        tracing::info!(device = %spec, dtype = %dtype, explicit = cfg.dtype.is_some(), "model dtype");
        let mut models = Models::default();
        let mut entries = Vec::new();
        for (src, hash) in cfg.models.iter().zip(hashes.iter_mut()) {
            let t = Instant::now();
            // Weights are converted to the dtype as they are read.
            let loaded = precision::loading(dtype, || match src {
                ModelSource::Tiny => crate::pipeline::tiny::tiny_pipeline(&dev).map(|p| (p, None)),
                ModelSource::Dir(d) => Pipeline::load(d, &dev).map(|p| (p, None)),
                ModelSource::File(f) => single_file::load(f, &cfg.single_file, &dev).map(|(p, i)| (p, Some(i))),
            });
            let (p, file_info) = loaded.with_context(|| format!("loading model {} on {spec}", source_label(src)))?;
            let details = model_details(src, &p, file_info.as_ref());
            let sha256 = match hash {
                Some(h) => h.clone(),
                None => hash.insert(model_sha256(src, &dev)?).clone(),
            };
            let name: Arc<str> = Arc::from(p.name());
            if models.pipelines.contains_key(&name) {
                anyhow::bail!("two models are named {name:?}; serve folders and files with distinct names");
            }
            tracing::info!(model = %name, family = p.family().as_str(), device = %spec, dtype = %p.precision(), vae_dtype = %p.vae_precision(),
                elapsed_ms = t.elapsed().as_millis() as u64, "model loaded");
            if cfg.warmup {
                let t = Instant::now();
                warm_up(&p).with_context(|| format!("warming up {name} on {spec}"))?;
                tracing::info!(model = %name, device = %spec, elapsed_ms = t.elapsed().as_millis() as u64, "warm-up step done");
            }
            if details.prediction_type_source == PredictionOrigin::FamilyDefault.as_str() && p.family() == crate::model::Family::Sd2 {
                tracing::warn!(model = %name, prediction_type = details.prediction_type,
                    "SD2 single file without a sidecar prediction_type or --prediction-type: assuming the SD 2.1 default (an SD2 epsilon model needs --prediction-type epsilon)");
            }
            let source = source_label(src);
            entries.push(ModelEntry {
                details,
                name: name.clone(),
                family: p.family(),
                native_size: p.native_size(),
                size_multiple: p.size_multiple(),
                source,
                sha256,
                pipeline: p.clone(),
            });
            models.pipelines.insert(name, p);
        }
        let controlnets = precision::loading(dtype, || load_controlnets(cfg, spec, &dev, &mut models, &mut net_hashes))?;
        out.push(Loaded { spec: spec.clone(), device: dev, models, entries, controlnets });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_takes_every_dtype_and_defaults_to_f32() {
        let dev = burn::tensor::Device::flex();
        assert_eq!(choose_precision(None, "cpu", &dev).unwrap(), Precision::F32);
        for p in Precision::ALL {
            assert_eq!(choose_precision(Some(p), "cpu", &dev).unwrap(), p);
        }
    }

    /// A Vulkan device (lavapipe here) stores bf16 but cannot compute in it.
    #[cfg(feature = "wgpu")]
    #[test]
    fn a_dtype_the_device_cannot_compute_in_is_refused_naming_the_flag() {
        let dev = burn::tensor::Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        if dev.supports_dtype(burn::tensor::FloatDType::BF16) {
            eprintln!("skipped: this wgpu device computes in bf16");
            return;
        }
        let err = choose_precision(Some(Precision::Bf16), "wgpu", &dev).unwrap_err().to_string();
        assert!(err.contains("--dtype bf16 is not supported on device wgpu"), "{err}");
        assert!(!err.contains("bf16)"), "bf16 is not listed as supported: {err}");
        assert_eq!(choose_precision(Some(Precision::F16), "wgpu", &dev).unwrap(), Precision::F16);
    }
}
