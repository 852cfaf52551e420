//! Request validation, in one place: the proto requests (`GenerateRequest`, `PatchModelRequest`)
//! become checked values ([`ValidRequest`], a [`StyleAligned`] patch) that the rest of the
//! service consumes without checking again. Every invalid field is collected (not just the
//! first); the service answers them all in one `google.rpc.BadRequest` ([`super::errors`]).
//!
//! Steps of a Generate request:
//! 1. [`generate`]: the limits and what the model's facts say (size multiple, SDXL-only fields);
//!    a reference image is checked from its header only (format, dimensions, pixel count): a
//!    small file declaring a huge image is refused here, never decoded.
//! 2. Admission ([`super::admission`]): the estimated peak memory against the budget.
//! 3. [`decode_reference`]: the reference image is decoded on a blocking thread (never on the
//!    request-handling threads), with the decoder limited to the dimensions the header declared.
//! 4. [`with_model`]: what only the loaded model knows (its sampler schedule), once.

use super::convert::{FieldError, Limits, priority_from_proto, sampler_from_proto, share_attn_from_proto, share_norm_from_proto};
use super::pb;
use super::queue::Priority;
use crate::model::unet::Level;
use crate::pipeline::reference::{MAX_REFERENCE_BYTES, MAX_REFERENCE_PIXELS, MAX_REFERENCE_SIDE};
use crate::pipeline::{BatchSpec, Image, Pipeline, PipelineError, ReferenceImage, SetSpec, SizeConditioning};
use crate::sampling::sampler::SamplerKind;
use crate::style_aligned::{LevelOptions, NodeOptions, OfficialArgs, StepWindow, StyleAligned, StyleScope};

/// What validation needs to know about the model.
#[derive(Clone, Debug, Default)]
pub struct ModelFacts {
    pub native_size: usize,
    pub size_multiple: usize,
    /// SDXL takes size conditioning.
    pub sdxl: bool,
    /// The served ControlNets: fits this model, or why not.
    pub controlnets: std::collections::BTreeMap<String, Result<(), String>>,
}

/// Most ControlNets on one set.
pub const MAX_CONTROLS: usize = 4;
/// Largest |conditioning_scale|.
pub const MAX_CONDITIONING_SCALE: f32 = 10.0;

/// A ControlNet of a request, its images checked from their headers (not decoded yet).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedControl {
    /// A served ControlNet that fits the session's model.
    pub model: String,
    /// One for every target, or one per target.
    pub images: Vec<CheckedImage>,
    pub conditioning_scale: f32,
    pub start: f32,
    pub end: f32,
}

/// A reference image checked from its header (not decoded yet).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedReference {
    /// The encoded PNG or JPEG.
    pub encoded: Vec<u8>,
    /// Dimensions declared by its header.
    pub width: u32,
    pub height: u32,
    pub caption: String,
    pub offset: usize,
    pub guidance: f32,
    /// SHA-256 of the encoded image, recorded in the images' parameters.
    pub sha256: String,
}

impl CheckedReference {
    /// Pixels of the decoded image.
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// An image of a request checked from its header (not decoded yet).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedImage {
    /// The field it came in (e.g. `init_images[0].image`), for errors.
    pub field: String,
    /// The encoded PNG or JPEG.
    pub encoded: Vec<u8>,
    /// Dimensions declared by its header.
    pub width: u32,
    pub height: u32,
    /// SHA-256 of the encoded image, recorded in the images' parameters.
    pub sha256: String,
}

impl CheckedImage {
    /// Checks `bytes` from their header (see [`reference_header`]).
    fn check(field: String, bytes: Vec<u8>) -> Result<Self, FieldError> {
        let (width, height) = image_header(&field, &bytes)?;
        Ok(CheckedImage { sha256: crate::model::hash::sha256_bytes(&bytes), encoded: bytes, width, height, field })
    }

    /// Pixels of the decoded image.
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    /// Decodes it on a blocking thread, held to the dimensions its header declared, and fits it to
    /// `size` (width, height).
    pub async fn decode(self, size: (usize, usize)) -> Result<Image, FieldError> {
        let CheckedImage { field, encoded, width, height, .. } = self;
        let fit = move || ReferenceImage::decode_within(&encoded, width, height).map(|full| ReferenceImage::fit(&full, size.0, size.1));
        match tokio::task::spawn_blocking(fit).await {
            Ok(Ok(image)) => Ok(image),
            Ok(Err(m)) => Err(FieldError::new(field, m)),
            Err(_) => Err(FieldError::new(field, "cannot be decoded (the decoder failed)")),
        }
    }
}

/// An img2img target of a request, its image not decoded yet.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedInit {
    /// The target's index in the set (its prompt).
    pub index: usize,
    pub image: CheckedImage,
    pub strength: f32,
}

/// Strength of an init image whose request leaves it unset (diffusers' img2img default).
pub const DEFAULT_STRENGTH: f32 = 0.8;

/// A decoded real-image reference.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidReference {
    pub image: Image,
    pub caption: String,
    pub offset: usize,
    pub guidance: f32,
    pub sha256: String,
}

/// Default CFG scale of a reference image's inversion.
pub const DEFAULT_REFERENCE_GUIDANCE: f32 = 2.0;

/// A checked Generate request, defaults filled in (its reference image not decoded yet).
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    pub width: usize,
    pub height: usize,
    pub sampler: SamplerKind,
    pub priority: Priority,
    pub reference: Option<CheckedReference>,
    pub size_conditioning: Option<SizeConditioning>,
    /// img2img targets, by index.
    pub init_images: Vec<CheckedInit>,
    /// ControlNets on the targets.
    pub controls: Vec<CheckedControl>,
}

impl ValidRequest {
    /// Rows of the set in the UNet batch (a reference image adds its row).
    pub fn rows(&self) -> usize {
        self.prompts.len() + usize::from(self.reference.is_some())
    }
}

/// Collects field errors.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    fn take<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<FieldError>> {
        if self.0.is_empty() { Ok(value()) } else { Err(self.0) }
    }
}

/// Checks a Generate request against the limits and the model's facts; every invalid field is
/// reported.
pub fn generate(
    req: pb::GenerateRequest,
    model: &ModelFacts,
    limits: &Limits,
    random_seed: impl FnOnce() -> u64,
) -> Result<ValidRequest, Vec<FieldError>> {
    let mut e = Errors::default();
    if req.prompts.is_empty() {
        e.add("prompts", "at least one prompt (the first is the set's reference)");
    }
    let prompts: Vec<String> = if req.count > 1 {
        if req.prompts.len() != 1 {
            e.add("count", format!("only with exactly one prompt (got {} prompts)", req.prompts.len()));
        }
        if req.count as usize > limits.max_prompts {
            e.add("count", format!("{} images exceed the limit of {} per set", req.count, limits.max_prompts));
        }
        if req.prompts.len() == 1 && req.count as usize <= limits.max_prompts {
            vec![req.prompts[0].clone(); req.count as usize]
        } else {
            Vec::new()
        }
    } else {
        if req.prompts.len() > limits.max_prompts {
            e.add("prompts", format!("{} prompts exceed the limit of {} per set", req.prompts.len(), limits.max_prompts));
        }
        req.prompts.clone()
    };
    for (i, p) in req.prompts.iter().enumerate().take(limits.max_prompts.max(1) * 4) {
        if p.chars().count() > limits.max_prompt_chars {
            e.add(format!("prompts[{i}]"), format!("longer than {} characters", limits.max_prompt_chars));
        }
    }
    if req.negative_prompt.chars().count() > limits.max_prompt_chars {
        e.add("negative_prompt", format!("longer than {} characters", limits.max_prompt_chars));
    }
    let steps = if req.steps == 0 { limits.default_steps } else { req.steps as usize };
    if steps > limits.max_steps {
        e.add("steps", format!("{steps} exceeds the limit of {}", limits.max_steps));
    }
    let guidance = req.guidance_scale.unwrap_or(limits.default_guidance);
    if !guidance.is_finite() || !(0.0..=limits.max_guidance).contains(&guidance) {
        e.add("guidance_scale", format!("{guidance} is outside [0, {}]", limits.max_guidance));
    }
    let m = model.size_multiple.max(1);
    let mut size = |field: &str, v: u32| -> usize {
        let v = if v == 0 { model.native_size } else { v as usize };
        if v > limits.max_size {
            e.add(field, format!("{v} exceeds the limit of {}", limits.max_size));
        } else if v % m != 0 {
            e.add(field, format!("{v} is not a multiple of {m} (the model's size multiple)"));
        }
        v
    };
    let width = size("width", req.width);
    let height = size("height", req.height);
    let sampler = e.take(sampler_from_proto(req.sampler)).unwrap_or(SamplerKind::Ddim);
    let priority = e.take(priority_from_proto(req.priority)).unwrap_or(Priority::Normal);
    let has_reference = !req.reference_image.is_empty();
    let reference = if req.reference_image.is_empty() {
        for (field, set) in [
            ("reference_caption", !req.reference_caption.is_empty()),
            ("reference_offset", req.reference_offset != 0),
            ("reference_guidance_scale", req.reference_guidance_scale.is_some()),
        ] {
            if set {
                e.add(field, "only with reference_image");
            }
        }
        None
    } else {
        let header = e.take(reference_header(&req.reference_image));
        if req.reference_caption.trim().is_empty() {
            e.add("reference_caption", "required with reference_image (the image's caption)");
        } else if req.reference_caption.chars().count() > limits.max_prompt_chars {
            e.add("reference_caption", format!("longer than {} characters", limits.max_prompt_chars));
        }
        if sampler != SamplerKind::Ddim {
            e.add("sampler", "a reference_image needs the DDIM sampler (its inversion is DDIM)");
        }
        let offset = req.reference_offset as usize;
        if offset >= steps {
            e.add("reference_offset", format!("{offset} must be below steps ({steps})"));
        }
        let g = req.reference_guidance_scale.unwrap_or(DEFAULT_REFERENCE_GUIDANCE);
        if !g.is_finite() || !(0.0..=limits.max_guidance).contains(&g) {
            e.add("reference_guidance_scale", format!("{g} is outside [0, {}]", limits.max_guidance));
        }
        header.map(|(w, h)| CheckedReference {
            sha256: crate::model::hash::sha256_bytes(&req.reference_image),
            encoded: req.reference_image,
            width: w,
            height: h,
            caption: req.reference_caption,
            offset,
            guidance: g,
        })
    };
    let size_conditioning = match &req.size_conditioning {
        None => None,
        Some(_) if !model.sdxl => {
            e.add("size_conditioning", "only SDXL models take size conditioning");
            None
        }
        Some(s) => {
            let or = |v: u32, d: usize| if v == 0 { d } else { v as usize };
            Some(SizeConditioning {
                original_size: (or(s.original_height, height), or(s.original_width, width)),
                crop_top_left: (s.crop_top as usize, s.crop_left as usize),
                target_size: (or(s.target_height, height), or(s.target_width, width)),
            })
        }
    };
    let targets = (usize::from(!has_reference), prompts.len());
    let init_images = init_images(&mut e, req.init_images, targets, steps);
    let controls = controls(&mut e, req.controls, targets.1 - targets.0.min(targets.1), model);
    let seed = req.seed;
    e.finish(move || ValidRequest {
        prompts,
        negative_prompt: req.negative_prompt,
        seed: seed.unwrap_or_else(random_seed),
        steps,
        guidance,
        width,
        height,
        sampler,
        priority,
        reference,
        size_conditioning,
        init_images,
        controls,
    })
}

/// The ControlNets of a request: at most [`MAX_CONTROLS`], each a served ControlNet that fits the
/// model, with one image or one per target (`targets`), a finite scale within
/// ±[`MAX_CONDITIONING_SCALE`] and a window `0 <= start < end <= 1`.
fn controls(e: &mut Errors, controls: Vec<pb::Control>, targets: usize, model: &ModelFacts) -> Vec<CheckedControl> {
    if controls.len() > MAX_CONTROLS {
        e.add("controls", format!("{} ControlNets; at most {MAX_CONTROLS} per set", controls.len()));
        return Vec::new();
    }
    let mut out = Vec::new();
    for (k, c) in controls.into_iter().enumerate() {
        let field = |name: &str| format!("controls[{k}].{name}");
        match model.controlnets.get(&c.model) {
            _ if c.model.is_empty() => e.add(field("model"), "required: a ControlNet of ListModels"),
            None => {
                let known: Vec<&str> = model.controlnets.keys().map(String::as_str).collect();
                e.add(field("model"), format!("unknown ControlNet {:?}; served: {known:?}", super::convert::bounded(&c.model)))
            }
            Some(Err(why)) => e.add(field("model"), format!("{} does not fit the session's model: {why}", c.model)),
            Some(Ok(())) => {}
        }
        if targets == 0 {
            e.add(field("images"), "the set has no target (only its reference), nothing to control");
        } else if c.images.len() != 1 && c.images.len() != targets {
            e.add(field("images"), format!("{} images for {targets} targets: give one for all, or one per target", c.images.len()));
        }
        let scale = c.conditioning_scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > MAX_CONDITIONING_SCALE {
            e.add(field("conditioning_scale"), format!("{scale} is outside [-{MAX_CONDITIONING_SCALE}, {MAX_CONDITIONING_SCALE}]"));
        }
        let (start, end) = (c.start.unwrap_or(0.0), c.end.unwrap_or(1.0));
        if !(0.0..=1.0).contains(&start) {
            e.add(field("start"), format!("{start} is outside [0, 1]"));
        } else if !(0.0..=1.0).contains(&end) {
            e.add(field("end"), format!("{end} is outside [0, 1]"));
        } else if start >= end {
            e.add(field("end"), format!("{end} must be above start ({start})"));
        }
        let images: Vec<CheckedImage> = c
            .images
            .into_iter()
            .take(targets.max(1))
            .enumerate()
            .filter_map(|(j, bytes)| e.take(CheckedImage::check(field(&format!("images[{j}]")), bytes)))
            .collect();
        out.push(CheckedControl { model: c.model, images, conditioning_scale: scale, start, end });
    }
    out
}

/// The img2img targets of a request: each index a target of the set (`targets` = first target
/// index, images in the set), once; strength in (0, 1] leaving at least one of `steps`; images
/// checked from their headers.
fn init_images(e: &mut Errors, inits: Vec<pb::InitImage>, targets: (usize, usize), steps: usize) -> Vec<CheckedInit> {
    let (first, images) = targets;
    let mut out: Vec<CheckedInit> = Vec::new();
    for (k, init) in inits.into_iter().enumerate() {
        let field = |name: &str| format!("init_images[{k}].{name}");
        let index = init.index as usize;
        if index >= images {
            e.add(field("index"), format!("{index} is not an image of the set (it has {images})"));
        } else if index < first {
            e.add(field("index"), "0 is the set's reference (its first prompt); init images are for targets");
        } else if out.iter().any(|o| o.index == index) {
            e.add(field("index"), format!("{index} already has an init image"));
        }
        let strength = init.strength.unwrap_or(DEFAULT_STRENGTH);
        if let Some(m) = crate::pipeline::img2img::strength_error(steps, strength) {
            e.add(field("strength"), m);
        }
        if let Some(image) = e.take(CheckedImage::check(field("image"), init.image)) {
            out.push(CheckedInit { index, image, strength });
        }
    }
    out
}

/// A reference image's format and dimensions, from its header only (nothing is decoded): PNG or
/// JPEG, at most [`MAX_REFERENCE_BYTES`] encoded, [`MAX_REFERENCE_SIDE`] per side and
/// [`MAX_REFERENCE_PIXELS`] in all.
pub fn reference_header(bytes: &[u8]) -> Result<(u32, u32), FieldError> {
    image_header("reference_image", bytes)
}

/// [`reference_header`] for the image in `field`.
fn image_header(field: &str, bytes: &[u8]) -> Result<(u32, u32), FieldError> {
    let err = |m: String| FieldError::new(field, m);
    if bytes.len() > MAX_REFERENCE_BYTES {
        return Err(err(format!("is {} bytes, the limit is {MAX_REFERENCE_BYTES}", bytes.len())));
    }
    let (w, h) = ReferenceImage::header(bytes).map_err(err)?;
    if w == 0 || h == 0 || w as usize > MAX_REFERENCE_SIDE || h as usize > MAX_REFERENCE_SIDE || w as u64 * h as u64 > MAX_REFERENCE_PIXELS
    {
        return Err(err(format!(
            "declares {w}x{h} pixels; at most {MAX_REFERENCE_SIDE} per side and {MAX_REFERENCE_PIXELS} in all are accepted"
        )));
    }
    Ok((w, h))
}

/// Decodes a checked reference image on a blocking thread (the decoder is held to the
/// dimensions its header declared) and fits it to the request's `size` (width, height), so a
/// queued request holds the pixels it will use, not the upload's.
pub async fn decode_reference(r: CheckedReference, size: (usize, usize)) -> Result<ValidReference, FieldError> {
    let CheckedReference { encoded, width, height, caption, offset, guidance, sha256 } = r;
    let checked = CheckedImage { field: "reference_image".into(), encoded, width, height, sha256 };
    let sha256 = checked.sha256.clone();
    let image = checked.decode(size).await?;
    Ok(ValidReference { image, caption, offset, guidance, sha256 })
}

/// What only the loaded model knows (its sampler schedule at these steps), checked once before
/// the request is queued.
pub fn with_model(pipeline: &Pipeline, batch: &BatchSpec, set: &SetSpec) -> Result<(), Vec<FieldError>> {
    pipeline.validate(batch, std::slice::from_ref(set)).map_err(|e| match e {
        PipelineError::Invalid { field, message } => vec![FieldError::new(field, message)],
        PipelineError::Patch(crate::style_aligned::PatchError::Option(o)) => vec![FieldError::new(o.field, o.message)],
        other => vec![FieldError::new("model", other.to_string())],
    })
}

/// The patch of a PatchModel request (the model is checked by the caller): node options, or
/// the official arguments when `advanced` is set; every invalid field is reported.
pub fn patch(req: &pb::PatchModelRequest) -> Result<StyleAligned, Vec<FieldError>> {
    let mut e = Errors::default();
    let patch = match &req.advanced {
        Some(a) => {
            if req.share_norm != 0 || req.share_attn != 0 || req.scale.is_some() {
                e.add(
                    "advanced",
                    "set either the node options (share_norm, share_attn, scale) or `advanced` (the official arguments), not both",
                );
            }
            let d = OfficialArgs::default();
            StyleAligned::Official(OfficialArgs {
                share_group_norm: a.share_group_norm.unwrap_or(d.share_group_norm),
                share_layer_norm: a.share_layer_norm.unwrap_or(d.share_layer_norm),
                share_attention: a.share_attention.unwrap_or(d.share_attention),
                adain_queries: a.adain_queries.unwrap_or(d.adain_queries),
                adain_keys: a.adain_keys.unwrap_or(d.adain_keys),
                adain_values: a.adain_values.unwrap_or(d.adain_values),
                full_attention_share: a.full_attention_share.unwrap_or(d.full_attention_share),
                shared_score_scale: a.shared_score_scale.unwrap_or(d.shared_score_scale),
                shared_score_shift: a.shared_score_shift.unwrap_or(d.shared_score_shift),
                only_self_level: a.only_self_level.unwrap_or(d.only_self_level),
            })
        }
        None => {
            let d = NodeOptions::default();
            StyleAligned::Node(NodeOptions {
                share_norm: e.take(share_norm_from_proto(req.share_norm)).unwrap_or(d.share_norm),
                share_attn: e.take(share_attn_from_proto(req.share_attn)).unwrap_or(d.share_attn),
                scale: req.scale.unwrap_or(d.scale),
            })
        }
    };
    if let Err(o) = patch.resolve() {
        let field = match patch {
            StyleAligned::Official(_) => format!("advanced.{}", o.field),
            StyleAligned::Node(_) => o.field.clone(),
        };
        e.add(field, o.message);
    }
    e.finish(|| patch)
}

/// The scope of a PatchModel request (the step window and the per-level options), checked
/// against the levels of the session's model; every invalid field is reported.
pub fn scope(req: &pb::PatchModelRequest, model_levels: &[Level]) -> Result<StyleScope, Vec<FieldError>> {
    let d = StepWindow::default();
    let window = req.window.map_or(d, |w| StepWindow { start: w.start.unwrap_or(d.start), end: w.end.unwrap_or(d.end) });
    let levels = req
        .levels
        .iter()
        .map(|l| LevelOptions {
            name: l.name.clone(),
            enabled: l.enabled,
            gain: l.gain,
            share_group_norm: l.share_group_norm,
            share_attention: l.share_attention,
        })
        .collect();
    let scope = StyleScope { window, levels };
    let e = Errors(scope.check(model_levels).into_iter().map(|o| FieldError::new(o.field, o.message)).collect());
    e.finish(|| scope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::style_aligned::{ShareAttn, ShareNorm};

    fn limits() -> Limits {
        Limits {
            max_prompts: 4,
            max_prompt_chars: 50,
            max_steps: 20,
            max_size: 256,
            max_guidance: 30.0,
            default_steps: 10,
            default_guidance: 7.5,
        }
    }

    fn facts() -> ModelFacts {
        ModelFacts { native_size: 64, size_multiple: 16, sdxl: false, ..Default::default() }
    }

    fn req() -> pb::GenerateRequest {
        pb::GenerateRequest { session_id: "s".into(), prompts: vec!["a cat".into()], seed: Some(3), ..Default::default() }
    }

    fn fields_of(r: pb::GenerateRequest) -> Vec<String> {
        generate(r, &facts(), &limits(), || 0).unwrap_err().into_iter().map(|e| e.field).collect()
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::new(w, h);
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    /// A PNG signature, an IHDR declaring `w`×`h` RGB and a one-byte IDAT of junk.
    fn png_declaring(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header().unwrap().write_chunk(png::chunk::IDAT, &[0x5A]).unwrap();
        out
    }

    #[test]
    fn defaults_fill_in() {
        let v = generate(pb::GenerateRequest { seed: None, ..req() }, &facts(), &limits(), || 99).unwrap();
        assert_eq!((v.width, v.height, v.steps, v.guidance, v.seed), (64, 64, 10, 7.5, 99));
        assert_eq!(v.sampler, SamplerKind::Ddim);
        assert_eq!(v.priority, Priority::Normal);
        let v = generate(pb::GenerateRequest { count: 3, ..req() }, &facts(), &limits(), || 0).unwrap();
        assert_eq!(v.prompts, vec!["a cat".to_string(); 3]);
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(fields_of(pb::GenerateRequest { prompts: vec![], ..req() }), ["prompts"]);
        assert_eq!(fields_of(pb::GenerateRequest { prompts: vec!["a".into(); 5], ..req() }), ["prompts"]);
        assert_eq!(fields_of(pb::GenerateRequest { count: 5, ..req() }), ["count"]);
        assert_eq!(fields_of(pb::GenerateRequest { count: 2, prompts: vec!["a".into(), "b".into()], ..req() }), ["count"]);
        assert_eq!(fields_of(pb::GenerateRequest { prompts: vec!["a".into(), "x".repeat(51)], ..req() }), ["prompts[1]"]);
        assert_eq!(fields_of(pb::GenerateRequest { negative_prompt: "x".repeat(51), ..req() }), ["negative_prompt"]);
        assert_eq!(fields_of(pb::GenerateRequest { steps: 21, ..req() }), ["steps"]);
        assert_eq!(fields_of(pb::GenerateRequest { guidance_scale: Some(f32::NAN), ..req() }), ["guidance_scale"]);
        assert_eq!(fields_of(pb::GenerateRequest { guidance_scale: Some(-1.0), ..req() }), ["guidance_scale"]);
        assert_eq!(fields_of(pb::GenerateRequest { width: 65, ..req() }), ["width"]);
        assert_eq!(fields_of(pb::GenerateRequest { height: 8, ..req() }), ["height"]);
        assert_eq!(fields_of(pb::GenerateRequest { width: 512, ..req() }), ["width"]);
        assert_eq!(fields_of(pb::GenerateRequest { sampler: 42, ..req() }), ["sampler"]);
        assert_eq!(fields_of(pb::GenerateRequest { priority: -1, ..req() }), ["priority"]);
    }

    #[test]
    fn all_bad_fields_are_collected() {
        let r = pb::GenerateRequest { width: 65, height: 8, steps: 99, sampler: 42, priority: 9, guidance_scale: Some(-2.0), ..req() };
        let mut f = fields_of(r);
        f.sort();
        assert_eq!(f, ["guidance_scale", "height", "priority", "sampler", "steps", "width"]);
    }

    #[test]
    fn reference_header_checked_without_decoding() {
        assert_eq!(reference_header(&png(40, 30)).unwrap(), (40, 30));
        // A PNG header declaring 4096×4096 followed by garbage: refused from the header.
        let bomb = png_declaring(4096, 4096);
        let e = reference_header(&bomb).unwrap_err();
        assert_eq!(e.field, "reference_image");
        assert!(e.message.contains("4096x4096"), "{}", e.message);
        assert_eq!(reference_header(b"not an image").unwrap_err().field, "reference_image");
    }

    #[test]
    fn patch_defaults_are_the_nodes() {
        let p = patch(&pb::PatchModelRequest { model: "tiny".into(), ..Default::default() }).unwrap();
        assert_eq!(p, StyleAligned::Node(NodeOptions { share_norm: ShareNorm::Both, share_attn: ShareAttn::QK, scale: 1.0 }));
    }

    #[test]
    fn patch_errors_name_fields() {
        let e = |r: pb::PatchModelRequest| patch(&r).unwrap_err().into_iter().map(|e| e.field).collect::<Vec<_>>();
        assert_eq!(e(pb::PatchModelRequest { scale: Some(1.5), ..Default::default() }), ["scale"]);
        assert_eq!(e(pb::PatchModelRequest { share_norm: 9, ..Default::default() }), ["share_norm"]);
        assert_eq!(e(pb::PatchModelRequest { share_norm: 9, share_attn: 9, ..Default::default() }), ["share_norm", "share_attn"]);
        let adv = pb::OfficialArgs { only_self_level: Some(2.0), ..Default::default() };
        assert_eq!(e(pb::PatchModelRequest { advanced: Some(adv), ..Default::default() }), ["advanced.only_self_level"]);
        let adv = pb::OfficialArgs::default();
        assert_eq!(e(pb::PatchModelRequest { advanced: Some(adv), scale: Some(0.5), ..Default::default() }), ["advanced"]);
        let ok = patch(&pb::PatchModelRequest {
            advanced: Some(pb::OfficialArgs { adain_values: Some(true), ..Default::default() }),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(ok, StyleAligned::Official(OfficialArgs { adain_values: true, share_group_norm: true, .. })));
    }
}
