//! The LoRAs of `--lora-dir`: every `.safetensors` file, served under its stem, checked against
//! every served model once at startup (from the file's header: no matrix is read), and a cache of
//! loaded LoRAs per device with a memory budget (`--lora-cache-mb`).
//!
//! A LoRA is loaded once per (model, device) and shared by every session and batch that uses it:
//! sessions hold names and weights only; a batch resolves them to the cache's `Arc` handles when
//! it starts and holds them until it ends. Loading one more LoRA evicts the least recently used
//! LoRAs no batch holds; a LoRA larger than the budget, or one that does not fit beside those held
//! by running batches, is refused (RESOURCE_EXHAUSTED naming it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::pb;
use crate::model::Family;
use crate::model::lora::{Lora, LoraSummary};
use crate::pipeline::Pipeline;

/// Most LoRAs per session.
pub const MAX_LORAS: usize = 8;
/// Largest |weight| of a LoRA.
pub const MAX_WEIGHT: f32 = 10.0;

/// A LoRA of a session: its name and weight (plain data, kept in the session token).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraWeight {
    pub name: String,
    pub weight: f32,
}

/// One file of the LoRA folder.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    /// SHA-256 of the file (lower-case hex).
    pub sha256: String,
    /// Per served model: what the file gives for it, or why it does not fit.
    pub models: BTreeMap<String, Result<LoraSummary, String>>,
    /// The family of the models it fits; else what its keys say (SDXL text encoder 2 or SGM
    /// UNet names); else unknown.
    pub family: Option<Family>,
}

impl LoraFile {
    /// The summary for the first model it fits.
    pub fn summary(&self) -> Option<&LoraSummary> {
        self.models.values().find_map(|r| r.as_ref().ok())
    }
}

/// Why a LoRA cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("unknown LoRA {0:?}")]
    Unknown(String),
    #[error("LoRA {name:?} does not fit model {model:?}: {reason}")]
    Incompatible { name: String, model: String, reason: String },
    #[error("LoRA {name:?} needs {bytes} bytes, over the LoRA cache budget of {budget} bytes (--lora-cache-mb)")]
    TooLarge { name: String, bytes: u64, budget: u64 },
    #[error(
        "LoRA {name:?} ({bytes} bytes) does not fit the LoRA cache budget of {budget} bytes beside the {held} bytes of LoRAs running batches use"
    )]
    Busy { name: String, bytes: u64, budget: u64, held: u64 },
    #[error("LoRA {name:?}: {message}")]
    Load { name: String, message: String },
}

struct Cached {
    lora: Arc<Lora>,
    last_used: u64,
}

#[derive(Default)]
struct Cache {
    /// (device, model, LoRA name) → the loaded LoRA.
    entries: BTreeMap<(String, String, String), Cached>,
    tick: u64,
    loads: u64,
    evictions: u64,
}

/// The served LoRAs and the per-device cache of loaded ones.
pub struct LoraLibrary {
    files: BTreeMap<String, LoraFile>,
    budget: u64,
    cache: Mutex<Cache>,
}

/// Counters of the cache (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    pub resident: usize,
    pub resident_bytes: u64,
    pub loads: u64,
    pub evictions: u64,
}

/// The `.safetensors` files of `dir`, sorted. Pickle checkpoints are an error (never read).
pub fn scan_dir(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use super::config::{is_safetensors_file, pickle_in_folder, scan_folder};
    let mut out = scan_folder("--lora-dir", dir, pickle_in_folder, |path| is_safetensors_file(path).then(|| path.to_path_buf()))?;
    out.sort();
    Ok(out)
}

/// The family a LoRA's keys point to when it fits no served model.
fn family_from_keys(path: &Path, device: &burn::tensor::Device) -> Option<Family> {
    let w = crate::model::weights::Weights::open(path, device).ok()?;
    let sdxl = w.keys().any(|k| {
        k.starts_with("lora_te2_")
            || k.starts_with("lora_te1_")
            || k.starts_with("text_encoder_2.")
            || k.starts_with("lora_unet_input_blocks")
            || k.starts_with("lora_unet_output_blocks")
            || k.starts_with("lora_unet_middle_block")
    });
    sdxl.then_some(Family::Sdxl)
}

impl LoraLibrary {
    /// Checks every file of `dir` against `models` (name, pipeline). A file that fits no model is
    /// still listed (with the reasons); using it is INVALID_ARGUMENT.
    pub fn open(dir: &Path, models: &[(String, Pipeline)], budget: u64) -> anyhow::Result<Self> {
        let mut files = BTreeMap::new();
        for path in scan_dir(dir)? {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let size_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let sha256 = crate::model::hash::sha256_file(&path).map_err(|e| anyhow::anyhow!("--lora-dir: {e}"))?;
            let mut fits = BTreeMap::new();
            let mut family = None;
            for (model, pipeline) in models {
                let r = Lora::inspect(&path, &pipeline.lora_targets(), pipeline.device()).map_err(|e| match e {
                    crate::model::ModelError::Lora { message, .. } => message,
                    other => other.to_string(),
                });
                if r.is_ok() && family.is_none() {
                    family = Some(pipeline.family());
                }
                fits.insert(model.clone(), r);
            }
            let family = family.or_else(|| models.first().and_then(|(_, p)| family_from_keys(&path, p.device())));
            tracing::info!(lora = %name, fits = ?fits.iter().filter(|(_, r)| r.is_ok()).map(|(m, _)| m).collect::<Vec<_>>(), "LoRA found");
            files.insert(name.clone(), LoraFile { name, path, size_bytes, sha256, models: fits, family });
        }
        Ok(Self { files, budget, cache: Mutex::new(Cache::default()) })
    }

    pub fn files(&self) -> impl Iterator<Item = &LoraFile> {
        self.files.values()
    }

    pub fn names(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Checks that `name` can be used with `model`: known, fits, within the budget.
    pub fn check(&self, model: &str, name: &str) -> Result<&LoraFile, LoraError> {
        let f = self.files.get(name).ok_or_else(|| LoraError::Unknown(name.to_string()))?;
        match f.models.get(model) {
            Some(Ok(s)) if s.bytes > self.budget => Err(LoraError::TooLarge { name: name.into(), bytes: s.bytes, budget: self.budget }),
            Some(Ok(_)) => Ok(f),
            Some(Err(reason)) => Err(LoraError::Incompatible { name: name.into(), model: model.into(), reason: reason.clone() }),
            None => Err(LoraError::Incompatible { name: name.into(), model: model.into(), reason: "the model is not served".into() }),
        }
    }

    /// The loaded LoRA `name` for `model` on `pipeline`'s device: from the cache, or read now
    /// (evicting least recently used LoRAs no batch holds, to stay within the budget).
    pub fn get(&self, model: &str, pipeline: &Pipeline, name: &str) -> Result<Arc<Lora>, LoraError> {
        let file = self.check(model, name)?;
        let bytes = file.models.get(model).and_then(|r| r.as_ref().ok()).map_or(0, |s| s.bytes);
        let device = format!("{:?}", pipeline.device());
        let key = (device.clone(), model.to_string(), name.to_string());
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        if let Some(hit) = c.entries.get_mut(&key) {
            hit.last_used = tick;
            return Ok(hit.lora.clone());
        }
        // Make room on this device: least recently used first, never one a batch holds.
        loop {
            let used: u64 = c.entries.iter().filter(|(k, _)| k.0 == device).map(|(_, e)| e.lora.bytes).sum();
            if used + bytes <= self.budget {
                break;
            }
            let victim = c
                .entries
                .iter()
                .filter(|(k, e)| k.0 == device && Arc::strong_count(&e.lora) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    c.entries.remove(&k);
                    c.evictions += 1;
                    tracing::info!(lora = %k.2, model = %k.1, "LoRA evicted from the cache");
                }
                None => return Err(LoraError::Busy { name: name.into(), bytes, budget: self.budget, held: used }),
            }
        }
        let lora = pipeline.load_lora(name, &file.path).map_err(|e| LoraError::Load { name: name.into(), message: e.to_string() })?;
        let lora = Arc::new(lora);
        c.loads += 1;
        c.entries.insert(key, Cached { lora: lora.clone(), last_used: tick });
        tracing::info!(lora = %name, model, bytes, "LoRA loaded");
        Ok(lora)
    }

    pub fn stats(&self) -> CacheStats {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        CacheStats {
            resident: c.entries.len(),
            resident_bytes: c.entries.values().map(|e| e.lora.bytes).sum(),
            loads: c.loads,
            evictions: c.evictions,
        }
    }

    /// The files as ListLoras shows them.
    pub fn to_proto(&self) -> Vec<pb::LoraInfo> {
        self.files
            .values()
            .map(|f| {
                let s = f.summary();
                pb::LoraInfo {
                    name: f.name.clone(),
                    family: f.family.map_or(pb::Family::Unspecified, super::service::family_to_proto) as i32,
                    format: s.map_or("", |s| s.format.as_str()).to_string(),
                    rank: s.map_or(0, |s| s.rank as u32),
                    layers: s.map_or(0, |s| s.layers as u32),
                    hash: crate::model::hash::short_hash(&f.sha256).to_string(),
                    size_bytes: f.size_bytes,
                    memory_bytes: s.map_or(0, |s| s.bytes),
                    models: f.models.iter().filter(|(_, r)| r.is_ok()).map(|(m, _)| m.clone()).collect(),
                    problems: f.models.iter().filter_map(|(m, r)| r.as_ref().err().map(|e| format!("{m}: {e}"))).collect(),
                }
            })
            .collect()
    }
}
