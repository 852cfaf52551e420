//! Protocol ↔ domain conversions and request validation. Every rejection names the request
//! field (`FieldError` → INVALID_ARGUMENT "invalid `field`: message").

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tonic::Status;

use super::pb;
use super::queue::Priority;
use super::session::Session;
use crate::pipeline::{Image, ReferenceImage, SizeConditioning};
use crate::sampling::sampler::SamplerKind;
use crate::style_aligned::{AdainSite, NodeOptions, OfficialArgs, ShareAttn, ShareNorm, StyleAligned};

/// A rejected request field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    /// Messages quote client input through [`bounded`]; as a backstop, the whole message is cut
    /// at twice that.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = match bounded_to(&message, 2 * MAX_ECHO_BYTES) {
            std::borrow::Cow::Owned(short) => short,
            std::borrow::Cow::Borrowed(_) => message,
        };
        Self { field: field.into(), message }
    }

    pub fn status(&self) -> Status {
        Status::invalid_argument(self.to_string())
    }
}

/// Most bytes of a status or log message that quotes client input.
pub const MAX_ECHO_BYTES: usize = 1024;

/// `text` cut to [`MAX_ECHO_BYTES`] (at a character boundary) with a note of its full length, so
/// that no client input comes back or goes to a log unbounded.
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    bounded_to(text, MAX_ECHO_BYTES)
}

fn bounded_to(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let cut = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    std::borrow::Cow::Owned(format!("{}… ({} bytes in all)", &text[..cut], text.len()))
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid `{}`: {}", self.field, self.message)
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        e.status()
    }
}

fn enum_err(field: &str, value: i32, allowed: &[&str]) -> FieldError {
    FieldError::new(field, format!("unknown value {value}; expected one of {}", allowed.join(", ")))
}

pub fn share_norm_from_proto(v: i32) -> Result<ShareNorm, FieldError> {
    Ok(match pb::ShareNorm::try_from(v) {
        Ok(pb::ShareNorm::Unspecified) | Ok(pb::ShareNorm::Both) => ShareNorm::Both,
        Ok(pb::ShareNorm::Group) => ShareNorm::Group,
        Ok(pb::ShareNorm::Layer) => ShareNorm::Layer,
        Ok(pb::ShareNorm::Disabled) => ShareNorm::Disabled,
        Err(_) => {
            return Err(enum_err("share_norm", v, &["SHARE_NORM_BOTH", "SHARE_NORM_GROUP", "SHARE_NORM_LAYER", "SHARE_NORM_DISABLED"]));
        }
    })
}

pub fn share_norm_to_proto(v: ShareNorm) -> pb::ShareNorm {
    match v {
        ShareNorm::Both => pb::ShareNorm::Both,
        ShareNorm::Group => pb::ShareNorm::Group,
        ShareNorm::Layer => pb::ShareNorm::Layer,
        ShareNorm::Disabled => pb::ShareNorm::Disabled,
    }
}

pub fn share_attn_from_proto(v: i32) -> Result<ShareAttn, FieldError> {
    Ok(match pb::ShareAttn::try_from(v) {
        Ok(pb::ShareAttn::Unspecified) | Ok(pb::ShareAttn::QK) => ShareAttn::QK,
        Ok(pb::ShareAttn::QKV) => ShareAttn::QKV,
        Ok(pb::ShareAttn::Disabled) => ShareAttn::Disabled,
        Err(_) => return Err(enum_err("share_attn", v, &["SHARE_ATTN_Q_K", "SHARE_ATTN_Q_K_V", "SHARE_ATTN_DISABLED"])),
    })
}

pub fn share_attn_to_proto(v: ShareAttn) -> pb::ShareAttn {
    match v {
        ShareAttn::QK => pb::ShareAttn::QK,
        ShareAttn::QKV => pb::ShareAttn::QKV,
        ShareAttn::Disabled => pb::ShareAttn::Disabled,
    }
}

pub fn sampler_from_proto(v: i32) -> Result<SamplerKind, FieldError> {
    Ok(match pb::Sampler::try_from(v) {
        Ok(pb::Sampler::Unspecified) | Ok(pb::Sampler::Ddim) => SamplerKind::Ddim,
        Ok(pb::Sampler::Euler) => SamplerKind::Euler,
        Ok(pb::Sampler::EulerA) => SamplerKind::EulerAncestral,
        Ok(pb::Sampler::Dpmpp2m) => SamplerKind::DpmPp2m,
        Ok(pb::Sampler::Dpmpp2mKarras) => SamplerKind::DpmPp2mKarras,
        Err(_) => {
            return Err(enum_err(
                "sampler",
                v,
                &["SAMPLER_DDIM", "SAMPLER_EULER", "SAMPLER_EULER_A", "SAMPLER_DPMPP_2M", "SAMPLER_DPMPP_2M_KARRAS"],
            ));
        }
    })
}

pub fn sampler_to_proto(v: SamplerKind) -> pb::Sampler {
    match v {
        SamplerKind::Ddim => pb::Sampler::Ddim,
        SamplerKind::Euler => pb::Sampler::Euler,
        SamplerKind::EulerAncestral => pb::Sampler::EulerA,
        SamplerKind::DpmPp2m => pb::Sampler::Dpmpp2m,
        SamplerKind::DpmPp2mKarras => pb::Sampler::Dpmpp2mKarras,
    }
}

pub fn priority_from_proto(v: i32) -> Result<Priority, FieldError> {
    Ok(match pb::Priority::try_from(v) {
        Ok(pb::Priority::Unspecified) | Ok(pb::Priority::Normal) => Priority::Normal,
        Ok(pb::Priority::Low) => Priority::Low,
        Ok(pb::Priority::High) => Priority::High,
        Err(_) => return Err(enum_err("priority", v, &["PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH"])),
    })
}

pub fn priority_to_proto(v: Priority) -> pb::Priority {
    match v {
        Priority::Low => pb::Priority::Low,
        Priority::Normal => pb::Priority::Normal,
        Priority::High => pb::Priority::High,
    }
}

/// The patch of a PatchModel request (the model is checked by the caller): node options, or
/// the official arguments when `advanced` is set. Ranges are checked (`resolve`).
pub fn patch_from_proto(req: &pb::PatchModelRequest) -> Result<StyleAligned, FieldError> {
    let patch = match &req.advanced {
        Some(a) => {
            if req.share_norm != 0 || req.share_attn != 0 || req.scale.is_some() {
                return Err(FieldError::new(
                    "advanced",
                    "set either the node options (share_norm, share_attn, scale) or `advanced` (the official arguments), not both",
                ));
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
        None => StyleAligned::Node(NodeOptions {
            share_norm: share_norm_from_proto(req.share_norm)?,
            share_attn: share_attn_from_proto(req.share_attn)?,
            scale: req.scale.unwrap_or(NodeOptions::default().scale),
        }),
    };
    patch.resolve().map_err(|e| {
        let field = match patch {
            StyleAligned::Official(_) => format!("advanced.{}", e.field),
            StyleAligned::Node(_) => e.field.clone(),
        };
        FieldError::new(field, e.message)
    })?;
    Ok(patch)
}

pub fn patch_to_proto(p: &StyleAligned) -> pb::PatchOptions {
    let flavour = match *p {
        StyleAligned::Node(o) => pb::patch_options::Flavour::Node(pb::NodeOptions {
            share_norm: share_norm_to_proto(o.share_norm) as i32,
            share_attn: share_attn_to_proto(o.share_attn) as i32,
            scale: o.scale,
        }),
        StyleAligned::Official(a) => pb::patch_options::Flavour::Official(pb::ResolvedOfficialArgs {
            share_group_norm: a.share_group_norm,
            share_layer_norm: a.share_layer_norm,
            share_attention: a.share_attention,
            adain_queries: a.adain_queries,
            adain_keys: a.adain_keys,
            adain_values: a.adain_values,
            full_attention_share: a.full_attention_share,
            shared_score_scale: a.shared_score_scale,
            shared_score_shift: a.shared_score_shift,
            only_self_level: a.only_self_level,
        }),
    };
    let switches = p.resolve().ok().map(|r| pb::Switches {
        share_group_norm: r.share_group_norm,
        share_layer_norm: r.share_layer_norm,
        adain_site: match r.site {
            AdainSite::Input => "input".into(),
            AdainSite::Projected => "projected".into(),
        },
        adain_q: r.adain_q,
        adain_k: r.adain_k,
        adain_v: r.adain_v,
        share_attention: r.share_attention,
        full_attention_share: r.full_attention_share,
        score_shift: r.score_shift,
        gain: r.gain,
        only_self_level: r.only_self_level,
    });
    pb::PatchOptions { flavour: Some(flavour), switches }
}

pub fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
    pbjson_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub fn session_to_proto(s: &Session, ttl: Duration) -> pb::Session {
    pb::Session {
        session_id: s.id.to_string(),
        model: s.model.to_string(),
        options: Some(patch_to_proto(&s.patch)),
        created_at: Some(timestamp(s.created)),
        expires_at: Some(timestamp(s.expires)),
        idle_ttl_seconds: ttl.as_secs().min(u32::MAX as u64) as u32,
    }
}

/// Request limits and defaults.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_prompts: usize,
    pub max_prompt_chars: usize,
    pub max_steps: usize,
    pub max_size: usize,
    pub max_guidance: f32,
    pub default_steps: usize,
    pub default_guidance: f32,
}

/// What validation needs to know about the model.
#[derive(Clone, Debug)]
pub struct ModelFacts {
    pub native_size: usize,
    pub size_multiple: usize,
    /// SDXL takes size conditioning.
    pub sdxl: bool,
}

/// A checked real-image reference.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidReference {
    pub image: Image,
    pub caption: String,
    pub offset: usize,
    pub guidance: f32,
    /// SHA-256 of the encoded image, recorded in the images' parameters.
    pub sha256: String,
}

/// Default CFG scale of a reference image's inversion.
pub const DEFAULT_REFERENCE_GUIDANCE: f32 = 2.0;

/// A checked Generate request, defaults filled in.
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
    pub reference: Option<ValidReference>,
    pub size_conditioning: Option<SizeConditioning>,
}

/// Checks a Generate request against the limits and the model.
pub fn validate_generate(
    req: &pb::GenerateRequest,
    model: &ModelFacts,
    limits: &Limits,
    random_seed: impl FnOnce() -> u64,
) -> Result<ValidRequest, FieldError> {
    if req.prompts.is_empty() {
        return Err(FieldError::new("prompts", "at least one prompt (the first is the set's reference)"));
    }
    let prompts: Vec<String> = if req.count > 1 {
        if req.prompts.len() != 1 {
            return Err(FieldError::new("count", format!("only with exactly one prompt (got {} prompts)", req.prompts.len())));
        }
        if req.count as usize > limits.max_prompts {
            return Err(FieldError::new("count", format!("{} images exceed the limit of {} per set", req.count, limits.max_prompts)));
        }
        vec![req.prompts[0].clone(); req.count as usize]
    } else {
        req.prompts.clone()
    };
    if prompts.len() > limits.max_prompts {
        return Err(FieldError::new("prompts", format!("{} prompts exceed the limit of {} per set", prompts.len(), limits.max_prompts)));
    }
    for (i, p) in req.prompts.iter().enumerate() {
        if p.chars().count() > limits.max_prompt_chars {
            return Err(FieldError::new(format!("prompts[{i}]"), format!("longer than {} characters", limits.max_prompt_chars)));
        }
    }
    if req.negative_prompt.chars().count() > limits.max_prompt_chars {
        return Err(FieldError::new("negative_prompt", format!("longer than {} characters", limits.max_prompt_chars)));
    }
    let steps = if req.steps == 0 { limits.default_steps } else { req.steps as usize };
    if steps > limits.max_steps {
        return Err(FieldError::new("steps", format!("{steps} exceeds the limit of {}", limits.max_steps)));
    }
    let guidance = req.guidance_scale.unwrap_or(limits.default_guidance);
    if !guidance.is_finite() || !(0.0..=limits.max_guidance).contains(&guidance) {
        return Err(FieldError::new("guidance_scale", format!("{guidance} is outside [0, {}]", limits.max_guidance)));
    }
    let m = model.size_multiple.max(1);
    let size = |field: &str, v: u32| -> Result<usize, FieldError> {
        let v = if v == 0 { model.native_size } else { v as usize };
        if v > limits.max_size {
            return Err(FieldError::new(field, format!("{v} exceeds the limit of {}", limits.max_size)));
        }
        if v % m != 0 {
            return Err(FieldError::new(field, format!("{v} is not a multiple of {m} (the model's size multiple)")));
        }
        Ok(v)
    };
    let width = size("width", req.width)?;
    let height = size("height", req.height)?;
    let sampler = sampler_from_proto(req.sampler)?;
    let priority = priority_from_proto(req.priority)?;
    let reference = if req.reference_image.is_empty() {
        for (field, set) in [
            ("reference_caption", !req.reference_caption.is_empty()),
            ("reference_offset", req.reference_offset != 0),
            ("reference_guidance_scale", req.reference_guidance_scale.is_some()),
        ] {
            if set {
                return Err(FieldError::new(field, "only with reference_image"));
            }
        }
        None
    } else {
        let image = ReferenceImage::decode(&req.reference_image).map_err(|e| FieldError::new("reference_image", e))?;
        if req.reference_caption.trim().is_empty() {
            return Err(FieldError::new("reference_caption", "required with reference_image (the image's caption)"));
        }
        if req.reference_caption.chars().count() > limits.max_prompt_chars {
            return Err(FieldError::new("reference_caption", format!("longer than {} characters", limits.max_prompt_chars)));
        }
        if sampler != SamplerKind::Ddim {
            return Err(FieldError::new("sampler", "a reference_image needs the DDIM sampler (its inversion is DDIM)"));
        }
        let offset = req.reference_offset as usize;
        if offset >= steps {
            return Err(FieldError::new("reference_offset", format!("{offset} must be below steps ({steps})")));
        }
        let g = req.reference_guidance_scale.unwrap_or(DEFAULT_REFERENCE_GUIDANCE);
        if !g.is_finite() || !(0.0..=limits.max_guidance).contains(&g) {
            return Err(FieldError::new("reference_guidance_scale", format!("{g} is outside [0, {}]", limits.max_guidance)));
        }
        let sha256 = crate::model::hash::sha256_bytes(&req.reference_image);
        Some(ValidReference { image, caption: req.reference_caption.clone(), offset, guidance: g, sha256 })
    };
    let size_conditioning = match &req.size_conditioning {
        None => None,
        Some(_) if !model.sdxl => return Err(FieldError::new("size_conditioning", "only SDXL models take size conditioning")),
        Some(s) => {
            let or = |v: u32, d: usize| if v == 0 { d } else { v as usize };
            Some(SizeConditioning {
                original_size: (or(s.original_height, height), or(s.original_width, width)),
                crop_top_left: (s.crop_top as usize, s.crop_left as usize),
                target_size: (or(s.target_height, height), or(s.target_width, width)),
            })
        }
    };
    let seed = match req.seed {
        Some(s) => s,
        None => random_seed(),
    };
    Ok(ValidRequest {
        prompts,
        negative_prompt: req.negative_prompt.clone(),
        seed,
        steps,
        guidance,
        width,
        height,
        sampler,
        priority,
        reference,
        size_conditioning,
    })
}

/// Everything needed to reproduce one image: the JSON in the PNG's `stylealign` text chunk (the
/// `parameters` chunk holds the A1111 infotext made from it, [`super::infotext`]).
/// Field order is fixed, so the same request gives the same bytes.
#[derive(Clone, Debug, Serialize)]
pub struct ImageParameters<'a> {
    pub generator: &'a str,
    pub model: &'a str,
    pub model_family: &'a str,
    /// SHA-256 of the model's UNet weights file (its first 10 hex digits are A1111's model hash).
    pub model_sha256: &'a str,
    /// The set's prompts (the first is the reference).
    pub prompts: &'a [String],
    /// This image's position in the set and its prompt.
    pub index: usize,
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub seed: u64,
    pub steps: usize,
    pub sampler: &'a str,
    pub guidance_scale: f32,
    pub width: usize,
    pub height: usize,
    /// The StyleAligned options (`flavour`: `node` or `official`).
    pub options: &'a StyleAligned,
    /// The real-image reference, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceParameters<'a>>,
    /// SDXL size conditioning `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_conditioning: Option<[f32; 6]>,
}

/// The reference image of an image's set, as recorded in its parameters.
#[derive(Clone, Debug, Serialize)]
pub struct ReferenceParameters<'a> {
    pub image_sha256: &'a str,
    pub caption: &'a str,
    pub offset: usize,
    pub guidance_scale: f32,
}

/// The generator string recorded in images.
pub const GENERATOR: &str = concat!("stylealign ", env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use super::*;

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
        ModelFacts { native_size: 64, size_multiple: 16, sdxl: false }
    }

    fn req() -> pb::GenerateRequest {
        pb::GenerateRequest { session_id: "s".into(), prompts: vec!["a cat".into()], seed: Some(3), ..Default::default() }
    }

    fn field_of(r: pb::GenerateRequest) -> String {
        validate_generate(&r, &facts(), &limits(), || 0).unwrap_err().field
    }

    #[test]
    fn defaults_fill_in() {
        let v = validate_generate(&pb::GenerateRequest { seed: None, ..req() }, &facts(), &limits(), || 99).unwrap();
        assert_eq!((v.width, v.height, v.steps, v.guidance, v.seed), (64, 64, 10, 7.5, 99));
        assert_eq!(v.sampler, SamplerKind::Ddim);
        assert_eq!(v.priority, Priority::Normal);
        let v = validate_generate(&pb::GenerateRequest { count: 3, ..req() }, &facts(), &limits(), || 0).unwrap();
        assert_eq!(v.prompts, vec!["a cat".to_string(); 3]);
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(field_of(pb::GenerateRequest { prompts: vec![], ..req() }), "prompts");
        assert_eq!(field_of(pb::GenerateRequest { prompts: vec!["a".into(); 5], ..req() }), "prompts");
        assert_eq!(field_of(pb::GenerateRequest { count: 5, ..req() }), "count");
        assert_eq!(field_of(pb::GenerateRequest { count: 2, prompts: vec!["a".into(), "b".into()], ..req() }), "count");
        assert_eq!(field_of(pb::GenerateRequest { prompts: vec!["a".into(), "x".repeat(51)], ..req() }), "prompts[1]");
        assert_eq!(field_of(pb::GenerateRequest { negative_prompt: "x".repeat(51), ..req() }), "negative_prompt");
        assert_eq!(field_of(pb::GenerateRequest { steps: 21, ..req() }), "steps");
        assert_eq!(field_of(pb::GenerateRequest { guidance_scale: Some(f32::NAN), ..req() }), "guidance_scale");
        assert_eq!(field_of(pb::GenerateRequest { guidance_scale: Some(-1.0), ..req() }), "guidance_scale");
        assert_eq!(field_of(pb::GenerateRequest { width: 65, ..req() }), "width");
        assert_eq!(field_of(pb::GenerateRequest { height: 8, ..req() }), "height");
        assert_eq!(field_of(pb::GenerateRequest { width: 512, ..req() }), "width");
        assert_eq!(field_of(pb::GenerateRequest { sampler: 42, ..req() }), "sampler");
        assert_eq!(field_of(pb::GenerateRequest { priority: -1, ..req() }), "priority");
    }

    #[test]
    fn patch_defaults_are_the_nodes() {
        let p = patch_from_proto(&pb::PatchModelRequest { model: "tiny".into(), ..Default::default() }).unwrap();
        assert_eq!(p, StyleAligned::Node(NodeOptions { share_norm: ShareNorm::Both, share_attn: ShareAttn::QK, scale: 1.0 }));
        let opts = patch_to_proto(&p);
        assert!(matches!(opts.flavour, Some(pb::patch_options::Flavour::Node(pb::NodeOptions { share_norm: 1, share_attn: 1, .. }))));
        assert_eq!(opts.switches.unwrap().adain_site, "input");
    }

    #[test]
    fn patch_errors_name_fields() {
        let e = |r: pb::PatchModelRequest| patch_from_proto(&r).unwrap_err().field;
        assert_eq!(e(pb::PatchModelRequest { scale: Some(1.5), ..Default::default() }), "scale");
        assert_eq!(e(pb::PatchModelRequest { share_norm: 9, ..Default::default() }), "share_norm");
        assert_eq!(e(pb::PatchModelRequest { share_attn: 9, ..Default::default() }), "share_attn");
        let adv = pb::OfficialArgs { only_self_level: Some(2.0), ..Default::default() };
        assert_eq!(e(pb::PatchModelRequest { advanced: Some(adv), ..Default::default() }), "advanced.only_self_level");
        let adv = pb::OfficialArgs::default();
        assert_eq!(e(pb::PatchModelRequest { advanced: Some(adv), scale: Some(0.5), ..Default::default() }), "advanced");
        let ok = patch_from_proto(&pb::PatchModelRequest {
            advanced: Some(pb::OfficialArgs { adain_values: Some(true), ..Default::default() }),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(ok, StyleAligned::Official(OfficialArgs { adain_values: true, share_group_norm: true, .. })));
    }
}
