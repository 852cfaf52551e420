//! A [`Pipeline`] from one single-file checkpoint (see [`crate::model::single_file`]).
//!
//! Configs: the embedded defaults of the family the weights show (SD 1.5, SD 2.1, SDXL base),
//! unless a sidecar `<stem>.json` beside the file holds diffusers configs: an object with any of
//! `unet`, `vae`, `text_encoder`, `text_encoder_2`, `scheduler` (each a diffusers /
//! transformers config), `force_zeros_for_empty_prompt` and `prediction_type`; components it
//! does not name use the family defaults. The tokenizers are the embedded CLIP BPE (padded with
//! `!` for OpenCLIP text encoders, as SD2's and SDXL's second tokenizer are).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::{Map, Value};

use super::{Parts, Pipeline, PipelineError, tiny};
use crate::model::clip::ClipConfig;
use crate::model::config::RawConfig;
use crate::model::single_file::{self, Checkpoint, TextLayout, pickle_refusal};
use crate::model::tokenizer::PadMode;
use crate::model::unet::UNetConfig;
use crate::model::vae::VaeConfig;
use crate::model::weights::{StoredDType, Weights};
use crate::model::{Family, ModelError};
use crate::sampling::SchedulerConfig;
use crate::sampling::schedule::Prediction;

/// Per-server options for single files.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SingleFileOptions {
    /// The prediction type of files whose sidecar does not name one (the weights cannot tell
    /// an SD2 ε model from a v model).
    pub prediction_type: Option<Prediction>,
    /// The VAE of files without one baked in: a diffusers VAE folder or a `.safetensors` file.
    pub vae: Option<PathBuf>,
}

/// Where a model's prediction type comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionOrigin {
    /// The scheduler config of a diffusers folder (or the embedded model).
    Config,
    /// The file's sidecar `<stem>.json`.
    Sidecar,
    /// The server's `--prediction-type`.
    Option,
    /// The family's default (SD2: v-prediction, as SD 2.1; the weights cannot tell).
    FamilyDefault,
}

impl PredictionOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionOrigin::Config => "config",
            PredictionOrigin::Sidecar => "sidecar",
            PredictionOrigin::Option => "option",
            PredictionOrigin::FamilyDefault => "family_default",
        }
    }
}

/// What ListModels reports about a single-file model beside the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct SingleFileInfo {
    pub ema: bool,
    pub dtype: StoredDType,
    pub prediction_origin: PredictionOrigin,
    /// Where the VAE came from: the file itself, or the `--vae` path.
    pub vae: Option<PathBuf>,
}

/// `epsilon`, `v_prediction`, `sample`.
pub fn prediction_name(p: Prediction) -> &'static str {
    match p {
        Prediction::Epsilon => "epsilon",
        Prediction::VPrediction => "v_prediction",
        Prediction::Sample => "sample",
    }
}

/// Parses `epsilon`, `v_prediction` (or `v`), `sample`.
pub fn parse_prediction(s: &str) -> Result<Prediction, String> {
    match s {
        "epsilon" | "eps" => Ok(Prediction::Epsilon),
        "v_prediction" | "v" => Ok(Prediction::VPrediction),
        "sample" => Ok(Prediction::Sample),
        other => Err(format!("{other:?} is not a prediction type (epsilon, v_prediction, sample)")),
    }
}

const SIDECAR_KEYS: [&str; 7] =
    ["unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "force_zeros_for_empty_prompt", "prediction_type"];

/// Loads a single-file checkpoint; the model is named after the file's stem.
pub fn load(path: &Path, opts: &SingleFileOptions, device: &Device) -> Result<(Pipeline, SingleFileInfo), PipelineError> {
    let io = |message: String| PipelineError::Model(ModelError::Io { path: path.to_path_buf(), message });
    match crate::model::weights::extension(path).as_str() {
        "safetensors" => {}
        _ if crate::model::weights::is_pickle(path) => return Err(pickle_refusal(path).into()),
        _ if !path.exists() => return Err(io("does not exist".into())),
        _ => return Err(io("is neither a diffusers folder nor a .safetensors checkpoint".into())),
    }
    let ckpt = {
        let w = Weights::open(path, device)?;
        Checkpoint::inspect(&w)?
    };
    // Sidecar configs, then the family's defaults for what it does not name.
    let sidecar_path = path.with_extension("json");
    let sidecar: Map<String, Value> = if sidecar_path.is_file() {
        let text =
            std::fs::read_to_string(&sidecar_path).map_err(|e| ModelError::Io { path: sidecar_path.clone(), message: e.to_string() })?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(ModelError::Io { path: sidecar_path, message: "is not a JSON object".into() }.into()),
            Err(e) => return Err(ModelError::Io { path: sidecar_path, message: format!("invalid JSON: {e}") }.into()),
        }
    } else {
        Map::new()
    };
    if let Some(bad) = sidecar.keys().find(|k| !SIDECAR_KEYS.contains(&k.as_str())) {
        return Err(ModelError::Config {
            file: sidecar_path,
            field: bad.clone(),
            message: format!("unknown key (known: {})", SIDECAR_KEYS.join(", ")),
        }
        .into());
    }
    let complete = ["unet", "vae", "text_encoder", "scheduler"].iter().all(|k| sidecar.contains_key(*k))
        && (sidecar.contains_key("text_encoder_2") || ckpt.text_2.is_none());
    let defaults: Option<(Family, Map<String, Value>)> = if complete {
        None
    } else {
        let family = ckpt.family.clone().map_err(io)?;
        match serde_json::from_str(single_file::default_configs(family)) {
            Ok(Value::Object(m)) => Some((family, m)),
            _ => return Err(io(format!("the embedded {} default configs are not a JSON object", family.as_str()))),
        }
    };
    let section = |name: &str| -> Option<(String, Value)> {
        if let Some(v) = sidecar.get(name) {
            return Some((format!("{}: {name}", sidecar_path.display()), v.clone()));
        }
        let (family, d) = defaults.as_ref()?;
        d.get(name).map(|v| (format!("<embedded default {} {name} config>", family.as_str()), v.clone()))
    };
    let raw = |name: &str| -> Result<RawConfig, PipelineError> {
        let (label, v) = section(name).ok_or_else(|| io(format!("no `{name}` config (none in the sidecar, none for the family)")))?;
        Ok(RawConfig::parse(Path::new(&label), &v.to_string())?)
    };

    let unet_config = UNetConfig::from_raw(&raw("unet")?)?;
    let unet = ckpt.unet(unet_config, device)?;
    let vae_config = VaeConfig::from_raw(&raw("vae")?)?;
    // An SDXL checkpoint (a second text encoder) keeps a `force_upcast` VAE in f32, as diffusers does.
    let vae_precision = if ckpt.text_2.is_some() {
        crate::model::precision::sdxl_vae_precision(vae_config.force_upcast)
    } else {
        crate::model::precision::load_precision()
    };
    let (vae, vae_path) = match (&ckpt.has_vae, &opts.vae) {
        (true, _) => (crate::model::precision::loading(vae_precision, || ckpt.vae(vae_config, device))?, None),
        (false, Some(v)) => {
            (crate::model::precision::loading(vae_precision, || single_file::load_vae(v, vae_config, device))?, Some(v.clone()))
        }
        (false, None) => {
            return Err(io(
                "holds no VAE (`first_stage_model.*`); give one with --vae (a diffusers VAE folder or .safetensors file)".into()
            ));
        }
    };
    let Some(text) = ckpt.text.clone() else {
        return Err(io("holds no text encoder (`cond_stage_model.*` or `conditioner.embedders.*`); single files are served with their \
                       text encoders baked in"
            .into()));
    };
    let te_config = ClipConfig::from_raw(&raw("text_encoder")?)?;
    let text_encoder = ckpt.text_encoder(&text, te_config, device)?;
    let wants_second = section("text_encoder_2").is_some();
    let text_encoder_2 = match (&ckpt.text_2, wants_second) {
        (Some(layout), true) => Some(ckpt.text_encoder(layout, ClipConfig::from_raw(&raw("text_encoder_2")?)?, device)?),
        (None, false) => None,
        (Some(_), false) => return Err(io("holds a second text encoder (`conditioner.embedders.1`) but its config has none".into())),
        (None, true) => {
            return Err(io("holds no second text encoder (`conditioner.embedders.1.model.*`), which an SDXL model needs".into()));
        }
    };
    let tokenizer = tiny::embedded_tokenizer()?;
    let pad = |layout: &TextLayout| if matches!(layout, TextLayout::OpenClip { .. }) { PadMode::Exclamation } else { PadMode::Eos };
    let tokenizer_1 = tokenizer.clone().with_pad_mode(pad(&text));
    let tokenizer_2 = ckpt.text_2.as_ref().map(|l| tokenizer.with_pad_mode(pad(l)));

    let mut scheduler = SchedulerConfig::from_raw(&raw("scheduler")?)?;
    let from_sidecar = match sidecar.get("prediction_type") {
        Some(Value::String(s)) => Some(parse_prediction(s).map_err(|m| ModelError::Config {
            file: sidecar_path.clone(),
            field: "prediction_type".into(),
            message: m,
        })?),
        Some(v) => {
            return Err(ModelError::Config {
                file: sidecar_path,
                field: "prediction_type".into(),
                message: format!("expected a string, found {v}"),
            }
            .into());
        }
        None => None,
    };
    let scheduler_in_sidecar = sidecar.get("scheduler").is_some_and(|s| s.get("prediction_type").is_some());
    let prediction_origin = match (from_sidecar, opts.prediction_type) {
        (Some(p), _) => {
            scheduler.prediction = p;
            PredictionOrigin::Sidecar
        }
        (None, _) if scheduler_in_sidecar => PredictionOrigin::Sidecar,
        (None, Some(p)) => {
            scheduler.prediction = p;
            PredictionOrigin::Option
        }
        (None, None) => PredictionOrigin::FamilyDefault,
    };
    let force_zeros = match section("force_zeros_for_empty_prompt") {
        Some((_, Value::Bool(b))) => b,
        Some((label, v)) => return Err(io(format!("{label}: force_zeros_for_empty_prompt must be true or false, found {v}"))),
        None => text_encoder_2.is_some(),
    };
    let name = path.file_stem().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    let parts = Parts {
        tokenizer: tokenizer_1,
        tokenizer_2,
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        scheduler,
        force_zeros_for_empty_prompt: force_zeros,
    };
    let pipe = Pipeline::assemble(name, path.to_path_buf(), parts, device)?;
    Ok((pipe, SingleFileInfo { ema: ckpt.ema, dtype: ckpt.dtype, prediction_origin, vae: vae_path }))
}

/// `fp32`, `fp16`, `bf16` (`other` for integer files).
pub fn dtype_name(d: StoredDType) -> &'static str {
    match d {
        StoredDType::F32 => "fp32",
        StoredDType::F16 => "fp16",
        StoredDType::BF16 => "bf16",
        StoredDType::Other => "other",
    }
}
