//! The patch's options: the ComfyUI node's (`share_norm`, `share_attn`, `scale`) and the official
//! google/style-aligned `StyleAlignedArgs`, and their resolution into one set of switches.

use serde::{Deserialize, Serialize};

/// Which norms join the reference's statistics (ComfyUI `share_norm`).
///
/// `Layer` and the layer half of `Both` are accepted for fidelity with the node but cannot change
/// any output: LayerNorm normalises each token over its channels alone, so adding the reference's
/// tokens to the set leaves every own token bitwise unchanged. `Layer` therefore equals
/// `Disabled` and `Both` equals `Group`; no work is spent on the layer half.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ShareNorm {
    #[default]
    Both,
    Group,
    Layer,
    Disabled,
}

impl ShareNorm {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "both" => Self::Both,
            "group" => Self::Group,
            "layer" => Self::Layer,
            "disabled" => Self::Disabled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::Group => "group",
            Self::Layer => "layer",
            Self::Disabled => "disabled",
        }
    }

    pub fn shares_group_norm(self) -> bool {
        matches!(self, Self::Both | Self::Group)
    }

    pub fn shares_layer_norm(self) -> bool {
        matches!(self, Self::Both | Self::Layer)
    }
}

/// Which of the attention inputs get AdaIN (ComfyUI `share_attn`). The reference's keys and values
/// are shared into every row's self-attention whatever this says, as in the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
pub enum ShareAttn {
    #[default]
    #[serde(rename = "q+k")]
    #[value(name = "q+k")]
    QK,
    #[serde(rename = "q+k+v")]
    #[value(name = "q+k+v")]
    QKV,
    #[serde(rename = "disabled")]
    Disabled,
}

impl ShareAttn {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "q+k" => Self::QK,
            "q+k+v" => Self::QKV,
            "disabled" => Self::Disabled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::QK => "q+k",
            Self::QKV => "q+k+v",
            Self::Disabled => "disabled",
        }
    }
}

/// The ComfyUI node's options (`StyleAlignedBatchAlign`). Defaults are the node's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeOptions {
    pub share_norm: ShareNorm,
    pub share_attn: ShareAttn,
    /// Gain on the reference's keys for every non-reference row, in [0, 1].
    pub scale: f32,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self { share_norm: ShareNorm::Both, share_attn: ShareAttn::QK, scale: 1.0 }
    }
}

/// The official `StyleAlignedArgs` (google/style-aligned). Defaults are the official ones.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OfficialArgs {
    pub share_group_norm: bool,
    /// Mathematically a no-op (see [`ShareNorm`]); accepted and reported.
    pub share_layer_norm: bool,
    pub share_attention: bool,
    pub adain_queries: bool,
    pub adain_keys: bool,
    pub adain_values: bool,
    pub full_attention_share: bool,
    pub shared_score_scale: f32,
    pub shared_score_shift: f32,
    pub only_self_level: f32,
}

impl Default for OfficialArgs {
    fn default() -> Self {
        Self {
            share_group_norm: true,
            share_layer_norm: true,
            share_attention: true,
            adain_queries: true,
            adain_keys: true,
            adain_values: false,
            full_attention_share: false,
            shared_score_scale: 1.0,
            shared_score_shift: 0.0,
            only_self_level: 0.0,
        }
    }
}

/// A StyleAligned patch: either the node's options or the official arguments.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "flavour", rename_all = "lowercase")]
pub enum StyleAligned {
    /// ComfyUI node semantics: AdaIN on the attention input, before the projections.
    Node(NodeOptions),
    /// Official semantics: AdaIN on the projected queries / keys / values.
    Official(OfficialArgs),
}

impl Default for StyleAligned {
    fn default() -> Self {
        Self::Node(NodeOptions::default())
    }
}

/// An invalid option value; `field` names the option.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid StyleAligned option `{field}`: {message}")]
pub struct OptionError {
    pub field: String,
    pub message: String,
}

fn opt_err(field: &str, message: impl Into<String>) -> OptionError {
    OptionError { field: field.into(), message: message.into() }
}

/// Where AdaIN acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdainSite {
    /// On the attention input x before to_q / to_k / to_v (ComfyUI).
    Input,
    /// On the projected q / k / v (official).
    Projected,
}

/// Resolved switches, what the hooks execute.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub share_group_norm: bool,
    pub share_layer_norm: bool,
    pub site: AdainSite,
    pub adain_q: bool,
    pub adain_k: bool,
    pub adain_v: bool,
    pub share_attention: bool,
    pub full_attention_share: bool,
    pub score_shift: f32,
    /// Gain on the reference keys of non-reference rows.
    pub gain: f32,
    pub only_self_level: f32,
}

impl StyleAligned {
    /// Checks ranges and resolves the switches.
    pub fn resolve(&self) -> Result<Resolved, OptionError> {
        match *self {
            StyleAligned::Node(o) => {
                if !o.scale.is_finite() || !(0.0..=1.0).contains(&o.scale) {
                    return Err(opt_err("scale", format!("{} is outside [0, 1]", o.scale)));
                }
                let (q, k, v) = match o.share_attn {
                    ShareAttn::QK => (true, true, false),
                    ShareAttn::QKV => (true, true, true),
                    ShareAttn::Disabled => (false, false, false),
                };
                Ok(Resolved {
                    share_group_norm: o.share_norm.shares_group_norm(),
                    share_layer_norm: o.share_norm.shares_layer_norm(),
                    site: AdainSite::Input,
                    adain_q: q,
                    adain_k: k,
                    adain_v: v,
                    share_attention: true,
                    full_attention_share: false,
                    score_shift: 0.0,
                    gain: o.scale,
                    only_self_level: 0.0,
                })
            }
            StyleAligned::Official(a) => {
                if !a.shared_score_scale.is_finite() {
                    return Err(opt_err("shared_score_scale", "must be a finite number"));
                }
                if !a.shared_score_shift.is_finite() {
                    return Err(opt_err("shared_score_shift", "must be a finite number"));
                }
                if !a.only_self_level.is_finite() || !(0.0..=1.0).contains(&a.only_self_level) {
                    return Err(opt_err("only_self_level", format!("{} is outside [0, 1]", a.only_self_level)));
                }
                Ok(Resolved {
                    share_group_norm: a.share_group_norm,
                    share_layer_norm: a.share_layer_norm,
                    site: AdainSite::Projected,
                    adain_q: a.adain_queries,
                    adain_k: a.adain_keys,
                    adain_v: a.adain_values,
                    share_attention: a.share_attention,
                    full_attention_share: a.full_attention_share,
                    score_shift: a.shared_score_shift,
                    gain: a.shared_score_scale,
                    only_self_level: a.only_self_level,
                })
            }
        }
    }
}

/// The official `only_self_level` switch vector over `layers` self-attention layers:
/// `true` keeps that layer unpatched. Level 0 patches every layer, 1 none.
pub fn unshared_layers(level: f32, layers: usize) -> Result<Vec<bool>, OptionError> {
    let level = level as f64;
    if level <= 0.0 {
        return Ok(vec![false; layers]);
    }
    if level >= 1.0 {
        return Ok(vec![true; layers]);
    }
    let flip = level > 0.5;
    let l = if flip { 1.0 - level } else { level };
    let k = (l * layers as f64) as usize;
    if k == 0 {
        return Err(opt_err(
            "only_self_level",
            format!(
                "{level} selects no layer out of {layers} (the official code fails here); use 0 or a level ≥ {:.4}",
                1.0 / layers as f64
            ),
        ));
    }
    let step = layers / k;
    Ok((0..layers).map(|j| (j % step == 0) != flip).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_self_level_matches_official_vectors() {
        assert_eq!(unshared_layers(0.5, 7).unwrap(), vec![true, false, true, false, true, false, true]);
        assert_eq!(unshared_layers(0.3, 7).unwrap(), vec![true, false, false, true, false, false, true]);
        assert_eq!(unshared_layers(0.0, 3).unwrap(), vec![false; 3]);
        assert_eq!(unshared_layers(1.0, 3).unwrap(), vec![true; 3]);
        // flip: level 0.8 -> l = 0.2, k = 1 of 7, step 7: only layer 0 marked, then negated.
        assert_eq!(unshared_layers(0.8, 7).unwrap(), vec![false, true, true, true, true, true, true]);
        assert!(unshared_layers(0.1, 7).unwrap_err().field == "only_self_level");
    }

    #[test]
    fn node_scale_out_of_range_names_field() {
        let e = StyleAligned::Node(NodeOptions { scale: 1.5, ..Default::default() }).resolve().unwrap_err();
        assert_eq!(e.field, "scale");
        let e = StyleAligned::Node(NodeOptions { scale: f32::NAN, ..Default::default() }).resolve().unwrap_err();
        assert_eq!(e.field, "scale");
    }

    #[test]
    fn parse_round_trips() {
        for s in ["both", "group", "layer", "disabled"] {
            assert_eq!(ShareNorm::parse(s).unwrap().as_str(), s);
        }
        for s in ["q+k", "q+k+v", "disabled"] {
            assert_eq!(ShareAttn::parse(s).unwrap().as_str(), s);
        }
        assert!(ShareAttn::parse("qk").is_none());
    }
}
