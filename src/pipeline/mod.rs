//! Text-to-image generation of style-aligned sets: tokenizers, text encoders, the (patched) UNet,
//! a sampler and the VAE, for SD1.x / SD2.x / SDXL diffusers folders and the embedded tiny model.
//!
//! Several sets with the same size, steps, sampler, guidance and patch run as one UNet batch: each
//! set is its own style group (its first prompt is the reference) in each CFG half. Every row's
//! noise comes from its set's seed and its index in the set, so a set's images do not depend on
//! what it is batched with.

pub mod control;
pub mod cost;
pub mod image;
pub mod img2img;
pub mod reference;
pub mod single_file;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Tensor, TensorData};

use crate::model::ModelError;
use crate::model::clip::ClipTextModel;
use crate::model::lora::{self, Active, Adapters, Component, Lora, RowGroup, Targets};
use crate::model::precision::{self, Precision};
use crate::model::tokenizer::{ClipTokenizer, PadMode};
use crate::model::unet::{NoHooks, TextTime, UNet, UNetHooks};
use crate::model::vae::{Vae, VaeConfig};
use crate::sampling::noise::{INITIAL, gaussian_tensor, step_stream};
use crate::sampling::sampler::{Sampler, SamplerKind};
use crate::sampling::{Conditioning, SchedulerConfig, guided_output_with};

use crate::style_aligned::{PatchError, ReferencePlan, StyleAligned, StyleAlignedHooks, StyleScope};
pub use control::{ControlSpec, SetControl};
pub use reference::ReferenceImage;

pub use image::Image;

pub use crate::model::Family;

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid request field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("stopped: {0}")]
    Stopped(String),
}

fn invalid(field: &str, message: impl Into<String>) -> PipelineError {
    PipelineError::Invalid { field: field.into(), message: message.into() }
}

struct Inner {
    family: Family,
    tokenizer: ClipTokenizer,
    tokenizer_2: Option<ClipTokenizer>,
    text_encoder: ClipTextModel,
    text_encoder_2: Option<ClipTextModel>,
    unet: UNet,
    vae: Vae,
    scheduler: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    device: Device,
    source: PathBuf,
    inversions: reference::InversionCache,
}

/// A loaded model. Cloning is cheap (shared weights).
#[derive(Clone)]
pub struct Pipeline {
    name: String,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline({}, {:?})", self.name, self.inner.family)
    }
}

/// One style-aligned set: the first prompt is the set's reference, unless a reference image is
/// given (then every prompt is a target and the image, inverted, is the reference).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SetSpec {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seed: u64,
    pub reference: Option<reference::ReferenceImage>,
    /// img2img targets: `(prompt index, init image)`, prompt indices distinct and not the
    /// reference's (the first prompt, unless a reference image is given).
    pub init_images: Vec<(usize, img2img::InitImage)>,
    /// ControlNets on the set's targets (none: plain generation); see [`ControlSpec`].
    pub controls: Vec<ControlSpec>,
    /// LoRAs of the set with their weights (resolved against this model, see
    /// [`Pipeline::load_lora`]): its text encoding, every UNet row of the set (reference
    /// included) and a reference image's inversion use them.
    pub loras: Adapters,
}

/// What the sets of one batch share.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSpec {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub sampler: SamplerKind,
    /// `None`: plain generation.
    pub patch: Option<StyleAligned>,
    /// Where and when the patch acts (default: every level, every step).
    pub scope: StyleScope,
    /// SDXL only; `None`: [`SizeConditioning::plain`].
    pub size_conditioning: Option<SizeConditioning>,
}

impl BatchSpec {
    /// A square batch at `size` with the default StyleAligned patch (the node's defaults), every
    /// level and step shared, no size conditioning.
    pub fn patched(size: usize, steps: usize, guidance: f32, sampler: SamplerKind) -> Self {
        BatchSpec {
            width: size,
            height: size,
            steps,
            guidance,
            sampler,
            patch: Some(StyleAligned::default()),
            scope: Default::default(),
            size_conditioning: None,
        }
    }
}

/// Text conditioning of some rows: hidden states (B, L, D) and SDXL's pooled embeddings (B, P).
#[derive(Clone, Debug)]
pub struct TextCond {
    pub hidden: Tensor<3>,
    pub pooled: Option<Tensor<2>>,
}

impl TextCond {
    /// The first row repeated `rows` times.
    pub fn repeat(&self, rows: usize) -> TextCond {
        TextCond {
            hidden: self.hidden.clone().narrow(0, 0, 1).repeat_dim(0, rows),
            pooled: self.pooled.as_ref().map(|p| p.clone().narrow(0, 0, 1).repeat_dim(0, rows)),
        }
    }
}

/// SDXL's size conditioning (`add_time_ids`): original size, crop top-left, target size, in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SizeConditioning {
    pub original_size: (usize, usize),
    pub crop_top_left: (usize, usize),
    pub target_size: (usize, usize),
}

impl SizeConditioning {
    /// diffusers' defaults: original = target = the image size (height, width), no crop.
    pub fn plain(width: usize, height: usize) -> Self {
        Self { original_size: (height, width), crop_top_left: (0, 0), target_size: (height, width) }
    }

    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
    pub fn time_ids(&self) -> [f32; 6] {
        [
            self.original_size.0 as f32,
            self.original_size.1 as f32,
            self.crop_top_left.0 as f32,
            self.crop_top_left.1 as f32,
            self.target_size.0 as f32,
            self.target_size.1 as f32,
        ]
    }
}

/// One set in flight: its rows' latents and conditioning.
#[derive(Clone, Debug)]
pub struct SetState {
    /// Index of the set in the request list.
    pub set: usize,
    /// Seed of the ancestral noise.
    pub seed: u64,
    pub x: Tensor<4>,
    pub uncond: TextCond,
    pub cond: TextCond,
    /// Real-image reference: row 0 follows this trajectory.
    pub replay: Option<ReferenceReplay>,
    /// img2img rows, entering the batch at their start step.
    pub entries: Vec<img2img::Entry>,
    /// ControlNets on the target rows (every row but row 0).
    pub controls: Vec<SetControl>,
    /// The set's LoRAs: its UNet rows use them.
    pub loras: Adapters,
}

impl SetState {
    pub fn rows(&self) -> usize {
        self.x.dims()[0]
    }
}

/// The inverted trajectory of a reference image, in google's order: `zts[0]` fully inverted,
/// `zts[k]` at the noise level of generation step k, `zts[steps]` = the image's latent. Row 0
/// starts at `zts[offset]` and after step i becomes `zts[max(offset + 1, i + 1)]`.
#[derive(Clone, Debug)]
pub struct ReferenceReplay {
    pub zts: Vec<Tensor<4>>,
    pub offset: usize,
}

/// What `on_step` sees after a step: the step count, and the latents of the live sets.
pub struct StepView<'a> {
    pub step: usize,
    pub total: usize,
    pub sets: Vec<(usize, &'a Tensor<4>)>,
}

/// The loaded components of a model, however they were stored.
pub(crate) struct Parts {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: Option<ClipTextModel>,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler: SchedulerConfig,
    pub force_zeros_for_empty_prompt: bool,
}

impl Pipeline {
    /// Loads a diffusers folder: `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`
    /// and, for SDXL, `text_encoder_2/` (+ `tokenizer_2/`, else `tokenizer/` padded with `!`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, PipelineError> {
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
        let tok_err = |e: crate::model::tokenizer::TokenizerError| PipelineError::Tokenizer(e.to_string());
        // Every SD1/SD2/SDXL tokenizer is the same CLIP BPE; a folder without one uses the
        // embedded copy.
        let tokenizer = if dir.join("tokenizer").is_dir() {
            ClipTokenizer::from_dir(&dir.join("tokenizer")).map_err(tok_err)?
        } else {
            tiny::embedded_tokenizer()?
        };
        let text_encoder = ClipTextModel::load(&dir.join("text_encoder"), device)?;
        let (text_encoder_2, tokenizer_2) = if dir.join("text_encoder_2").is_dir() {
            let te2 = ClipTextModel::load(&dir.join("text_encoder_2"), device)?;
            let tok2 = if dir.join("tokenizer_2").is_dir() {
                ClipTokenizer::from_dir(&dir.join("tokenizer_2")).map_err(tok_err)?
            } else {
                tokenizer.clone().with_pad_mode(PadMode::Exclamation)
            };
            (Some(te2), Some(tok2))
        } else {
            (None, None)
        };
        let unet = UNet::load(&dir.join("unet"), device)?;
        let vae = if text_encoder_2.is_some() {
            let force_upcast = VaeConfig::from_file(&dir.join("vae").join("config.json"))?.force_upcast;
            precision::loading(precision::sdxl_vae_precision(force_upcast), || Vae::load(&dir.join("vae"), device))?
        } else {
            Vae::load(&dir.join("vae"), device)?
        };
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = if scheduler_path.is_file() { SchedulerConfig::from_file(&scheduler_path)? } else { SchedulerConfig::default() };
        let force_zeros_for_empty_prompt = std::fs::read_to_string(dir.join("model_index.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("force_zeros_for_empty_prompt").and_then(|b| b.as_bool()))
            .unwrap_or(text_encoder_2.is_some());
        let parts = Parts { tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler, force_zeros_for_empty_prompt };
        Self::assemble(name, dir.to_path_buf(), parts, device)
    }

    /// A pipeline of loaded components.
    pub(crate) fn assemble(name: String, source: PathBuf, parts: Parts, device: &Device) -> Result<Self, PipelineError> {
        let Parts { tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler, force_zeros_for_empty_prompt } = parts;
        let family = if text_encoder_2.is_some() {
            Family::Sdxl
        } else if unet.config.use_linear_projection || unet.config.cross_attention_dim[0] == 1024 {
            Family::Sd2
        } else {
            Family::Sd1
        };
        let width = text_encoder.config.hidden_size + text_encoder_2.as_ref().map_or(0, |t| t.config.hidden_size);
        if width != unet.config.cross_attention_dim[0] {
            return Err(invalid(
                "model",
                format!("text encoders give {width} features, the UNet's cross_attention_dim is {}", unet.config.cross_attention_dim[0]),
            ));
        }
        Ok(Self {
            name,
            inner: Arc::new(Inner {
                family,
                tokenizer,
                tokenizer_2,
                text_encoder,
                text_encoder_2,
                unet,
                vae,
                scheduler,
                force_zeros_for_empty_prompt,
                device: device.clone(),
                source,
                inversions: reference::InversionCache::new(64),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same model served under another name.
    pub fn with_name(self, name: &str) -> Self {
        Self { name: name.to_string(), inner: self.inner }
    }

    pub fn family(&self) -> Family {
        self.inner.family
    }

    pub fn source(&self) -> &Path {
        &self.inner.source
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The precision the UNet and text encoders run in (`--dtype`).
    pub fn precision(&self) -> Precision {
        self.inner.unet.precision()
    }

    /// The precision the VAE runs in: the model's, or f32 for an SDXL VAE that asks for
    /// `force_upcast`.
    pub fn vae_precision(&self) -> Precision {
        self.inner.vae.precision()
    }

    pub fn unet(&self) -> &UNet {
        &self.inner.unet
    }

    pub fn vae(&self) -> &Vae {
        &self.inner.vae
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.inner.scheduler
    }

    /// What a LoRA file is resolved against: this model's adaptable layers.
    pub fn lora_targets(&self) -> Targets<'_> {
        Targets {
            unet: self.inner.unet.lora_layers(),
            text_encoder: self.inner.text_encoder.lora_layers(),
            text_encoder_2: self.inner.text_encoder_2.as_ref().map(|t| t.lora_layers()),
            layers_per_block: &self.inner.unet.config.layers_per_block,
        }
    }

    /// Reads a LoRA file for this model (an error when it does not fit the model).
    pub fn load_lora(&self, name: &str, path: &Path) -> Result<Lora, ModelError> {
        // In the model's dtype, as its layers.
        precision::loading(self.precision(), || Lora::load(name, path, &self.lora_targets(), &self.inner.device))
    }

    /// Pixels per latent cell.
    pub fn pixel_factor(&self) -> usize {
        self.inner.vae.config.downscale()
    }

    /// Image sizes must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.pixel_factor() * self.inner.unet.config.latent_multiple()
    }

    /// The model's native image size (square).
    pub fn native_size(&self) -> usize {
        self.inner.unet.config.sample_size * self.pixel_factor()
    }

    /// Token ids of prompts for the first (and second) text encoder, truncated to the encoder's
    /// context (77 for real models).
    pub fn tokenize(&self, prompts: &[&str]) -> (Vec<Vec<u32>>, Option<Vec<Vec<u32>>>) {
        let ids = |tok: &ClipTokenizer, max: usize| -> Vec<Vec<u32>> {
            prompts.iter().map(|p| fit_ids(tok.encode_padded(p), max, tok.eos_id(), tok.pad_id())).collect()
        };
        let first = ids(&self.inner.tokenizer, self.inner.text_encoder.config.max_position_embeddings);
        let second = match (&self.inner.tokenizer_2, &self.inner.text_encoder_2) {
            (Some(t), Some(e)) => Some(ids(t, e.config.max_position_embeddings)),
            _ => None,
        };
        (first, second)
    }

    /// Text conditioning from token ids: `encoder_hidden_states` (B, L, D) and, for SDXL, the
    /// pooled embeddings (B, P). SD1/SD2 use the last hidden state; SDXL the penultimate hidden
    /// states of both encoders, concatenated.
    pub fn encode_ids(&self, ids: &[Vec<u32>], ids_2: Option<&[Vec<u32>]>) -> Result<(Tensor<3>, Option<Tensor<2>>), PipelineError> {
        self.encode_ids_with(ids, ids_2, &Vec::new())
    }

    /// [`encode_ids`](Self::encode_ids) with LoRAs on the text encoders.
    pub fn encode_ids_with(
        &self,
        ids: &[Vec<u32>],
        ids_2: Option<&[Vec<u32>]>,
        adapters: &Adapters,
    ) -> Result<(Tensor<3>, Option<Tensor<2>>), PipelineError> {
        let dev = &self.inner.device;
        let te1 = Active::uniform(Component::TextEncoder, ids.len(), adapters.clone(), dev);
        let out = lora::scoped(te1, || self.inner.text_encoder.forward(ids))?;
        match (&self.inner.text_encoder_2, ids_2) {
            (Some(te2), Some(ids_2)) => {
                let active = Active::uniform(Component::TextEncoder2, ids_2.len(), adapters.clone(), dev);
                let out2 = lora::scoped(active, || te2.forward(ids_2))?;
                let ehs = Tensor::cat(vec![out.penultimate_hidden_state, out2.penultimate_hidden_state], 2);
                let pooled = out2.text_embeds.ok_or_else(|| invalid("model", "text_encoder_2 has no text_projection"))?;
                Ok((ehs, Some(pooled)))
            }
            (Some(_), None) => Err(invalid("input_ids_2", "SDXL needs ids for text_encoder_2")),
            (None, _) => Ok((out.last_hidden_state, None)),
        }
    }

    /// Conditioning of prompts; `zero_if_empty` gives zeros for empty prompts (SDXL's
    /// `force_zeros_for_empty_prompt` for the negative prompt).
    pub fn encode_prompts(&self, prompts: &[&str], zero_if_empty: bool) -> Result<TextCond, PipelineError> {
        self.encode_prompts_with(prompts, zero_if_empty, &Vec::new())
    }

    /// [`encode_prompts`](Self::encode_prompts) with LoRAs on the text encoders.
    pub fn encode_prompts_with(&self, prompts: &[&str], zero_if_empty: bool, adapters: &Adapters) -> Result<TextCond, PipelineError> {
        let (ids, ids_2) = self.tokenize(prompts);
        let (mut hidden, mut pooled) = self.encode_ids_with(&ids, ids_2.as_deref(), adapters)?;
        if zero_if_empty {
            let [b, l, d] = hidden.dims();
            let mask: Vec<f32> = prompts.iter().map(|p| if p.is_empty() { 0.0 } else { 1.0 }).collect();
            if mask.contains(&0.0) {
                let m = Tensor::<1>::from_data(TensorData::new(mask, [b]), &self.inner.device);
                hidden = hidden * m.clone().reshape([b, 1, 1]).expand([b, l, d]);
                pooled = pooled.map(|p| {
                    let pd = p.dims()[1];
                    p * m.reshape([b, 1]).expand([b, pd])
                });
            }
        }
        Ok(TextCond { hidden, pooled })
    }

    /// Conditioning of a set's negative prompt, repeated per row: SDXL with
    /// `force_zeros_for_empty_prompt` gives zeros for an empty negative prompt.
    pub fn encode_negative(&self, negative_prompt: &str, rows: usize) -> Result<TextCond, PipelineError> {
        self.encode_negative_with(negative_prompt, rows, &Vec::new())
    }

    /// [`encode_negative`](Self::encode_negative) with LoRAs on the text encoders.
    pub fn encode_negative_with(&self, negative_prompt: &str, rows: usize, adapters: &Adapters) -> Result<TextCond, PipelineError> {
        let zero = self.inner.family == Family::Sdxl && self.inner.force_zeros_for_empty_prompt;
        if zero && negative_prompt.is_empty() {
            // Nothing is encoded: zeros of the conditioning's shape.
            let te = &self.inner.text_encoder;
            let len = ClipTokenizer::MAX_LEN.min(te.config.max_position_embeddings);
            let dim = self.inner.unet.config.cross_attention_dim[0];
            let pooled = self.inner.text_encoder_2.as_ref().and_then(|t| t.config.projection_dim);
            let dev = &self.inner.device;
            return Ok(TextCond { hidden: Tensor::zeros([rows, len, dim], dev), pooled: pooled.map(|p| Tensor::zeros([rows, p], dev)) });
        }
        let one = self.encode_prompts_with(&[negative_prompt], false, adapters)?;
        Ok(one.repeat(rows))
    }

    /// Checks a batch against the model: sizes are multiples of its size multiple, the sampler
    /// has a schedule at these steps, the patch resolves. The request's own limits are checked
    /// before (`serve::validate`); [`generate`](Self::generate) expects a batch checked here.
    pub fn validate(&self, batch: &BatchSpec, sets: &[SetSpec]) -> Result<(), PipelineError> {
        let m = self.size_multiple();
        for (field, v) in [("width", batch.width), ("height", batch.height)] {
            if v == 0 || v % m != 0 {
                return Err(invalid(field, format!("{v} must be a positive multiple of {m}")));
            }
        }
        if sets.is_empty() || sets.iter().any(|s| s.prompts.is_empty()) {
            return Err(invalid("prompts", "no prompt to generate"));
        }
        for set in sets {
            check_init_images(set, batch)?;
        }
        if let Some(p) = &batch.patch {
            let resolved = p.resolve().map_err(PatchError::from)?;
            batch.scope.resolve(&resolved, &self.inner.unet.levels()).map_err(PatchError::from)?;
        }
        for set in sets {
            self.validate_controls(set)?;
        }
        let targets = self.lora_targets();
        for set in sets {
            for (k, (l, w)) in set.loras.iter().enumerate() {
                if !l.resolved_for(&targets) {
                    return Err(invalid(&format!("loras[{k}]"), format!("LoRA {} was loaded for another model", l.name)));
                }
                if !w.is_finite() {
                    return Err(invalid(&format!("loras[{k}].weight"), format!("{w} is not a number")));
                }
            }
        }
        Sampler::new(batch.sampler, &self.inner.scheduler, batch.steps).map_err(|e| match e {
            ModelError::Input { field, message } => invalid(&field, message),
            other => PipelineError::Model(other),
        })?;
        Ok(())
    }

    /// Generates every set of the batch. `on_step(i, n)` is called after every step and returns
    /// which sets are still wanted; dropped sets stop at once and come back as `None`.
    pub fn generate(
        &self,
        batch: &BatchSpec,
        sets: &[SetSpec],
        on_step: &mut dyn FnMut(usize, usize) -> Vec<bool>,
    ) -> Result<Vec<Option<Vec<Image>>>, PipelineError> {
        let (stop, wanted) = wanted_flags(sets.len());
        self.generate_until(batch, sets, &stop, &mut |e| {
            if let RunEvent::Stepped(v) = e {
                record_wanted(&wanted, on_step(v.step, v.total));
            }
        })
    }

    /// Generates every set of the batch until its stop check says otherwise.
    ///
    /// `stop(set)` (monotonic: once true, always true) is asked before each set is prepared,
    /// between steps, and before and during each set's decode; a set it stops leaves the batch
    /// there (its rows take no part in later steps, the sampler's state follows) and comes back
    /// as `None`. Inside a step, the model asks whether *every* set of the step is stopped (see
    /// [`crate::model::stop`]): then the step is abandoned between UNet blocks or attention
    /// tiles. Stopping some sets never changes the others' images. `on_event` hears every step,
    /// every set dropped and every decode starting.
    pub fn generate_until(
        &self,
        batch: &BatchSpec,
        sets: &[SetSpec],
        stop: &SetStop,
        on_event: &mut dyn FnMut(RunEvent),
    ) -> Result<Vec<Option<Vec<Image>>>, PipelineError> {
        let mut sampler = Sampler::new(batch.sampler, &self.inner.scheduler, batch.steps)?;
        let n = sampler.timesteps().len();
        let mut states = Vec::with_capacity(sets.len());
        for (i, s) in sets.iter().enumerate() {
            match scoped_set(stop, i, || self.prepare_set(i, s, batch, &sampler)) {
                Ok(st) => states.push(st),
                Err(e) if is_stopped(&e) => on_event(RunEvent::Dropped { set: i, steps: 0 }),
                Err(e) => return Err(e),
            }
        }
        let finals = self.denoise_until(batch, &mut sampler, states, stop, on_event)?;
        let mut out: Vec<Option<Vec<Image>>> = vec![None; sets.len()];
        for (set, latents) in finals {
            let skip = usize::from(sets[set].reference.is_some());
            let rows = latents.dims()[0];
            on_event(RunEvent::Decoding { set });
            match scoped_set(stop, set, || self.decode_images(latents.narrow(0, skip, rows - skip))) {
                Ok(images) => out[set] = Some(images),
                Err(e) if is_stopped(&e) => on_event(RunEvent::Dropped { set, steps: n }),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Text conditioning, initial latents and (for a reference image) the inverted trajectory of
    /// one set. Rows: the reference (the first prompt, or the reference image's caption) first.
    pub fn prepare_set(&self, index: usize, set: &SetSpec, batch: &BatchSpec, sampler: &Sampler) -> Result<SetState, PipelineError> {
        let f = self.pixel_factor();
        let (h, w) = (batch.height / f, batch.width / f);
        let c = self.inner.unet.config.in_channels;
        let mut prompts: Vec<&str> = set.prompts.iter().map(String::as_str).collect();
        if let Some(r) = &set.reference {
            prompts.insert(0, r.caption.as_str());
        }
        let rows = prompts.len();
        let cond = self.encode_prompts_with(&prompts, false, &set.loras)?;
        let uncond = self.encode_negative_with(&set.negative_prompt, rows, &set.loras)?;
        let noise = gaussian_tensor(set.seed, INITIAL, [rows, c, h, w], &self.inner.device);
        let skip = usize::from(set.reference.is_some());
        let inits: Vec<(usize, &img2img::InitImage)> = set.init_images.iter().map(|(p, init)| (p + skip, init)).collect();
        let entries = self.img2img_entries(&inits, &noise, sampler.timesteps().len())?;
        let mut x = noise * sampler.init_noise_sigma();
        let replay = match &set.reference {
            Some(r) => {
                let zts = self.inverted_trajectory(r, batch, &set.loras)?;
                x = Tensor::cat(vec![zts[r.offset].clone(), x.narrow(0, 1, rows - 1)], 0);
                Some(ReferenceReplay { zts, offset: r.offset })
            }
            None => None,
        };
        let controls = self.prepare_controls(set, batch)?;
        Ok(SetState { set: index, seed: set.seed, x, uncond, cond, replay, entries, controls, loras: set.loras.clone() })
    }

    /// Runs the sampler over the live sets (one UNet batch per step: all sets' unconditional rows,
    /// then all conditional rows; one style group per set per half). `on_step` returns which sets
    /// are still wanted. Returns the final latents of the sets still wanted at the end.
    pub fn denoise(
        &self,
        batch: &BatchSpec,
        sampler: &mut Sampler,
        live: Vec<SetState>,
        on_step: &mut dyn FnMut(&StepView) -> Vec<bool>,
    ) -> Result<Vec<(usize, Tensor<4>)>, PipelineError> {
        let count = live.iter().map(|l| l.set + 1).max().unwrap_or(0);
        let (stop, wanted) = wanted_flags(count);
        self.denoise_until(batch, sampler, live, &stop, &mut |e| {
            if let RunEvent::Stepped(v) = e {
                record_wanted(&wanted, on_step(v));
            }
        })
    }

    /// [`denoise`](Self::denoise) driven by a stop check (see [`generate_until`](Self::generate_until)).
    /// The StyleAligned plan and hooks are built once, and again only when the batch's sets change.
    pub fn denoise_until(
        &self,
        batch: &BatchSpec,
        sampler: &mut Sampler,
        mut live: Vec<SetState>,
        stop: &SetStop,
        on_event: &mut dyn FnMut(RunEvent),
    ) -> Result<Vec<(usize, Tensor<4>)>, PipelineError> {
        let dev = &self.inner.device;
        let sdxl = self.inner.family == Family::Sdxl;
        let n = sampler.timesteps().len();
        // The hooks and the set sizes they were planned for.
        let mut hooks: Option<(Vec<usize>, Box<dyn UNetHooks>)> = None;
        let scope = match &batch.patch {
            Some(p) => {
                Some(batch.scope.resolve(&p.resolve().map_err(PatchError::from)?, &self.inner.unet.levels()).map_err(PatchError::from)?)
            }
            None => None,
        };
        for i in 0..n {
            drop_stopped(&mut live, sampler, stop, i, on_event);
            if live.is_empty() {
                return Ok(Vec::new());
            }
            enter_rows(&mut live, sampler, i);
            let sizes: Vec<usize> = live.iter().map(|l| l.rows()).collect();
            let x = Tensor::cat(live.iter().map(|l| l.x.clone()).collect(), 0);
            let hidden =
                Tensor::cat(live.iter().map(|l| l.uncond.hidden.clone()).chain(live.iter().map(|l| l.cond.hidden.clone())).collect(), 0);
            let text_time = if sdxl {
                let pooled = live
                    .iter()
                    .map(|l| l.uncond.pooled.clone())
                    .chain(live.iter().map(|l| l.cond.pooled.clone()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid("model", "SDXL conditioning without pooled embeddings"))?;
                let pooled = Tensor::cat(pooled, 0);
                let rows = pooled.dims()[0];
                let ids = batch.size_conditioning.unwrap_or_else(|| SizeConditioning::plain(batch.width, batch.height)).time_ids();
                let ids: Vec<f32> = (0..rows).flat_map(|_| ids).collect();
                Some(TextTime { text_embeds: pooled, time_ids: Tensor::from_data(TensorData::new(ids, [rows, 6]), dev) })
            } else {
                None
            };
            let cond = Conditioning { encoder_hidden_states: hidden, text_time };
            if hooks.as_ref().is_none_or(|(planned, _)| *planned != sizes) {
                let h: Box<dyn UNetHooks> = match &batch.patch {
                    Some(p) => {
                        let gain = p.resolve().map_err(PatchError::from)?.gain;
                        let plan = ReferencePlan::from_groups(&sizes, 2, gain).map_err(PatchError::from)?;
                        let h = StyleAlignedHooks::new(p, plan, self.inner.unet.self_attention_layers(), dev)?;
                        Box::new(match &scope {
                            Some(s) => h.with_scope(s),
                            None => h,
                        })
                    }
                    None => Box::new(NoHooks),
                };
                hooks = Some((sizes.clone(), h));
            }
            let step_hooks = hooks.as_ref().map(|(_, h)| h.as_ref()).expect("hooks were just built");
            // Outside the scope's step window the UNet runs plain.
            let step_hooks = if scope.as_ref().is_none_or(|s| s.window.contains(i, n)) { step_hooks } else { &NoHooks };
            let x_in = sampler.scale_model_input(x.clone(), i);
            let t = sampler.timesteps()[i];
            // Inside the step: give up when every set of it is stopped.
            let ids: Vec<usize> = live.iter().map(|l| l.set).collect();
            let all_stopped = stop.clone();
            let eps = crate::model::stop::scoped(Rc::new(move || ids.iter().all(|&s| all_stopped(s))), || {
                let residuals = self.control_residuals(&live, &x_in, t, &cond, i, n)?;
                // Each set's LoRAs on its own rows (both CFG halves); only around the UNet.
                let active = unet_adapters(&live, dev);
                lora::scoped(active, || {
                    guided_output_with(&self.inner.unet, x_in, t, &cond, batch.guidance, step_hooks, residuals.as_ref())
                })
            });
            let eps = match eps {
                Ok(eps) => eps,
                Err(ModelError::Stopped) => {
                    for l in live.drain(..) {
                        on_event(RunEvent::Dropped { set: l.set, steps: i });
                    }
                    return Ok(Vec::new());
                }
                Err(e) => return Err(e.into()),
            };
            let noise = sampler.needs_noise().then(|| {
                // Each set's rows draw from its own seed, so batching does not change them.
                let [_, ch, h, w] = x.dims();
                Tensor::cat(live.iter().map(|l| gaussian_tensor(l.seed, step_stream(i), [l.rows(), ch, h, w], dev)).collect(), 0)
            });
            let (x_next, _) = sampler.step(eps, i, x, noise);
            let mut offset = 0;
            for l in live.iter_mut() {
                let rows = l.rows();
                l.x = x_next.clone().narrow(0, offset, rows);
                offset += rows;
                if let Some(r) = &l.replay {
                    let k = (r.offset + 1).max(i + 1).min(r.zts.len() - 1);
                    l.x = Tensor::cat(vec![r.zts[k].clone(), l.x.clone().narrow(0, 1, rows - 1)], 0);
                }
            }
            let view = StepView { step: i + 1, total: n, sets: live.iter().map(|l| (l.set, &l.x)).collect() };
            on_event(RunEvent::Stepped(&view));
        }
        drop_stopped(&mut live, sampler, stop, n, on_event);
        Ok(live.into_iter().map(|l| (l.set, l.x)).collect())
    }

    /// Decodes latents to 8-bit RGB images.
    pub fn decode_images(&self, latents: Tensor<4>) -> Result<Vec<Image>, PipelineError> {
        let vae = &self.inner.vae;
        let z = match vae.config.shift_factor {
            Some(s) => latents / vae.config.scaling_factor + s,
            None => latents / vae.config.scaling_factor,
        };
        let img = vae.decode(z)?;
        Ok(Image::from_tensor(img))
    }
}

/// The UNet's adapters for a step of `live`: rows `[uncond of every set, cond of every set]`,
/// each set's rows in both halves use its LoRAs.
fn unet_adapters(live: &[SetState], device: &Device) -> Active {
    let half: usize = live.iter().map(SetState::rows).sum();
    let mut groups = Vec::new();
    let mut offset = 0;
    for l in live {
        let rows = l.rows();
        if !l.loras.is_empty() {
            let rows: Vec<usize> = (offset..offset + rows).chain(half + offset..half + offset + rows).collect();
            groups.push(RowGroup { rows, adapters: l.loras.clone() });
        }
        offset += rows;
    }
    Active::new(Component::Unet, 2 * half, groups, device)
}

/// Which sets must stop, by index in the request list (see [`Pipeline::generate_until`]).
pub type SetStop = Arc<dyn Fn(usize) -> bool + Send + Sync>;

/// What [`Pipeline::generate_until`] reports as it runs.
pub enum RunEvent<'a, 'b> {
    /// A step of the live sets is done.
    Stepped(&'a StepView<'b>),
    /// A set's stop check fired: it left the batch after `steps` completed steps.
    Dropped { set: usize, steps: usize },
    /// The set's decode starts.
    Decoding { set: usize },
}

/// Whether an error is a stop (a stop check fired), not a failure.
pub fn is_stopped(e: &PipelineError) -> bool {
    matches!(e, PipelineError::Model(ModelError::Stopped) | PipelineError::Stopped(_))
}

/// Runs `f` with `stop(set)` as the model's stop check.
fn scoped_set<R>(stop: &SetStop, set: usize, f: impl FnOnce() -> Result<R, PipelineError>) -> Result<R, PipelineError> {
    let stop = stop.clone();
    crate::model::stop::scoped(Rc::new(move || stop(set)), f)
}

/// Drops the stopped sets at a step boundary (`steps` completed); the sampler keeps the rest.
/// A set's img2img targets: distinct prompts that are not the reference, checked images.
fn check_init_images(set: &SetSpec, batch: &BatchSpec) -> Result<(), PipelineError> {
    let first_target = usize::from(set.reference.is_none());
    let mut seen = Vec::new();
    for (k, (p, init)) in set.init_images.iter().enumerate() {
        let field = format!("init_images[{k}]");
        if *p >= set.prompts.len() {
            return Err(invalid(&format!("{field}.index"), format!("{p} is not a prompt of the set (it has {})", set.prompts.len())));
        }
        if *p < first_target {
            return Err(invalid(&format!("{field}.index"), "0 is the set's reference (its first prompt); init images are for targets"));
        }
        if seen.contains(p) {
            return Err(invalid(&format!("{field}.index"), format!("{p} has two init images")));
        }
        seen.push(*p);
        img2img::check(&field, init, batch.steps, batch.width, batch.height)?;
    }
    Ok(())
}

/// Puts the img2img rows that enter at step `i` into their sets' latents and tells the sampler.
fn enter_rows(live: &mut [SetState], sampler: &mut Sampler, i: usize) {
    let mut offset = 0;
    for l in live.iter_mut() {
        let (x, rows) = img2img::enter(&l.entries, sampler, i, l.x.clone());
        l.x = x;
        sampler.enter_rows(&rows.iter().map(|r| offset + r).collect::<Vec<_>>());
        offset += l.rows();
    }
}

fn drop_stopped(live: &mut Vec<SetState>, sampler: &mut Sampler, stop: &SetStop, steps: usize, on_event: &mut dyn FnMut(RunEvent)) {
    let stopped: Vec<bool> = live.iter().map(|l| stop(l.set)).collect();
    if !stopped.contains(&true) {
        return;
    }
    let mut first = 0;
    let mut kept = Vec::new();
    for (l, &gone) in live.iter().zip(&stopped) {
        if gone {
            on_event(RunEvent::Dropped { set: l.set, steps });
        } else {
            kept.push((first, l.rows()));
        }
        first += l.rows();
    }
    sampler.keep_rows(&kept);
    let mut k = 0;
    live.retain(|_| {
        k += 1;
        !stopped[k - 1]
    });
}

/// A stop check from "wanted" flags that a step callback clears (for the `Vec<bool>` callbacks).
fn wanted_flags(n: usize) -> (SetStop, Arc<Mutex<Vec<bool>>>) {
    let wanted = Arc::new(Mutex::new(vec![true; n]));
    let w = wanted.clone();
    let stop: SetStop = Arc::new(move |s| !w.lock().unwrap_or_else(|p| p.into_inner()).get(s).copied().unwrap_or(true));
    (stop, wanted)
}

/// Clears the flags of the sets no longer wanted (never sets one again).
fn record_wanted(wanted: &Mutex<Vec<bool>>, now: Vec<bool>) {
    let mut w = wanted.lock().unwrap_or_else(|p| p.into_inner());
    for (flag, keep) in w.iter_mut().zip(now) {
        *flag &= keep;
    }
}

/// Fits a padded row to an encoder with a shorter context: BOS, the content that fits, EOS, padding.
fn fit_ids(ids: Vec<u32>, max: usize, eos: u32, pad: u32) -> Vec<u32> {
    if ids.len() <= max || max < 2 {
        return ids;
    }
    let end = ids.iter().skip(1).position(|&t| t == eos).map_or(ids.len(), |p| p + 1);
    let content = &ids[1..end];
    let keep = content.len().min(max - 2);
    let mut out = Vec::with_capacity(max);
    out.push(ids[0]);
    out.extend_from_slice(&content[..keep]);
    out.push(eos);
    out.resize(max, pad);
    out
}

#[cfg(test)]
mod tests {
    use super::fit_ids;

    #[test]
    fn fit_ids_keeps_bos_content_eos() {
        let row = vec![1, 5, 6, 7, 2, 0, 0, 0];
        assert_eq!(fit_ids(row.clone(), 8, 2, 0), row);
        assert_eq!(fit_ids(row.clone(), 6, 2, 0), vec![1, 5, 6, 7, 2, 0]);
        assert_eq!(fit_ids(row, 4, 2, 0), vec![1, 5, 6, 2]);
    }
}
