//! Protocol ↔ domain conversions, the request limits, and [`FieldError`] (a rejected field; the
//! checks themselves live in [`super::validate`]).

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tonic::Status;

use super::pb;
use super::queue::Priority;
use super::session::Session;

use crate::model::unet::Level;
use crate::sampling::sampler::SamplerKind;
use crate::style_aligned::{AdainSite, ShareAttn, ShareNorm, StyleAligned, StyleScope};

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

    /// INVALID_ARGUMENT with this field in `BadRequest` (see [`super::errors`]).
    pub fn status(&self) -> Status {
        super::errors::invalid_fields(std::slice::from_ref(self))
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

/// The session's options as the reply echoes them: `model_levels` are the levels of the
/// session's model (every one is listed, resolved; without them, the levels as given).
pub fn patch_to_proto(p: &StyleAligned, scope: &StyleScope, model_levels: Option<&[Level]>) -> pb::PatchOptions {
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
    let window = Some(pb::StepWindow { start: Some(scope.window.start), end: Some(scope.window.end) });
    let resolved = p.resolve().ok().zip(model_levels).and_then(|(r, levels)| scope.resolve(&r, levels).ok());
    let levels = match resolved {
        Some(r) => r
            .levels
            .iter()
            .map(|l| pb::LevelOptions {
                name: l.level.to_string(),
                enabled: Some(l.enabled),
                gain: Some(l.gain),
                share_group_norm: Some(l.share_group_norm),
                share_attention: Some(l.share_attention),
            })
            .collect(),
        None => scope
            .levels
            .iter()
            .map(|l| pb::LevelOptions {
                name: l.name.clone(),
                enabled: l.enabled,
                gain: l.gain,
                share_group_norm: l.share_group_norm,
                share_attention: l.share_attention,
            })
            .collect(),
    };
    pb::PatchOptions { flavour: Some(flavour), switches, window, levels }
}

pub fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
    pbjson_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// `model_levels`: the levels of the session's model (see [`patch_to_proto`]).
pub fn session_to_proto(s: &Session, ttl: Duration, model_levels: Option<&[Level]>) -> pb::Session {
    pb::Session {
        session_id: s.id.to_string(),
        model: s.model.to_string(),
        options: Some(patch_to_proto(&s.patch, &s.scope, model_levels)),
        created_at: Some(timestamp(s.created)),
        expires_at: Some(timestamp(s.expires)),
        idle_ttl_seconds: ttl.as_secs().min(u32::MAX as u64) as u32,
        loras: s.loras.iter().map(|l| pb::LoraWeight { name: l.name.clone(), weight: l.weight }).collect(),
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
    /// Where and when they act: `window` and `levels`, each absent when it is the default.
    #[serde(flatten)]
    pub scope: &'a StyleScope,
    /// The real-image reference, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceParameters<'a>>,
    /// SDXL size conditioning `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_conditioning: Option<[f32; 6]>,
    /// The set's img2img targets.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub init_images: &'a [InitParameters],
    /// The ControlNets on the set's targets.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub controls: &'a [ControlParameters],
    /// The session's LoRAs.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub loras: &'a [LoraParameters],
}

/// A LoRA of an image's set, as recorded in its parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoraParameters {
    pub name: String,
    pub weight: f32,
    /// SHA-256 of its file.
    pub sha256: String,
}

/// A ControlNet of an image's set, as recorded in its parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControlParameters {
    /// Its name, and the SHA-256 of its weights file.
    pub model: String,
    pub model_sha256: String,
    /// SHA-256 of each control image (one for all targets, or one per target).
    pub images_sha256: Vec<String>,
    pub conditioning_scale: f32,
    pub start: f32,
    pub end: f32,
}

/// An img2img target of an image's set, as recorded in its parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InitParameters {
    /// The target's index in the set.
    pub index: usize,
    pub image_sha256: String,
    pub strength: f32,
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
    use crate::style_aligned::NodeOptions;

    #[test]
    fn patch_defaults_read_back() {
        let p = StyleAligned::Node(NodeOptions { share_norm: ShareNorm::Both, share_attn: ShareAttn::QK, scale: 1.0 });
        let opts = patch_to_proto(&p, &StyleScope::default(), None);
        assert!(matches!(opts.flavour, Some(pb::patch_options::Flavour::Node(pb::NodeOptions { share_norm: 1, share_attn: 1, .. }))));
        assert_eq!(opts.switches.unwrap().adain_site, "input");
    }

    #[test]
    fn echoes_are_bounded() {
        let long = "é".repeat(2000);
        let b = bounded(&long);
        assert!(b.len() <= MAX_ECHO_BYTES + 40, "{}", b.len());
        assert!(b.ends_with("(4000 bytes in all)"));
        assert!(FieldError::new("f", "x".repeat(10_000)).message.len() <= 2 * MAX_ECHO_BYTES + 40);
    }
}
