//! StyleAligned (Hertz et al., CVPR 2024) as a patch on the UNet: the reference's keys and values
//! are shared into every row's self-attention, with AdaIN on queries / keys, and optionally shared
//! GroupNorm statistics. The patch is plain data ([`StyleAligned`] + [`ReferencePlan`], and where
//! and when it acts: [`StyleScope`]); it touches the model only through [`UNetHooks`], so a patched
//! model is the shared base weights plus this value.

pub mod ops;
pub mod options;
pub mod plan;
pub mod scope;

use burn::tensor::{Device, Tensor};

use crate::model::nn::{Attention, GroupNorm};
use crate::model::unet::{Level, Site, UNetHooks};

pub use options::{AdainSite, NodeOptions, OfficialArgs, OptionError, Resolved, ShareAttn, ShareNorm, StyleAligned, unshared_layers};
pub use plan::{PlanError, ReferencePlan};
pub use scope::{LevelOptions, LevelSwitches, ResolvedScope, StepWindow, StyleScope};

use ops::{AttnSwitches, DevicePlan};

/// An error building a patch for a batch.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// The patch applied to one batch: resolved switches plus the batch's plan on the device.
/// Implements [`UNetHooks`].
#[derive(Clone, Debug)]
pub struct StyleAlignedHooks {
    resolved: Resolved,
    plan: DevicePlan,
    /// Per self-attention layer: `true` leaves the layer unpatched (official `only_self_level`).
    unshared: Vec<bool>,
    /// Per-level switches (empty: every level as `resolved` says).
    levels: Vec<LevelHooks>,
}

/// One level's switches, with the plan its self-attentions use when its gain is not 1.
#[derive(Clone, Debug)]
struct LevelHooks {
    switches: LevelSwitches,
    plan: Option<DevicePlan>,
}

impl StyleAlignedHooks {
    /// Builds the hooks for a batch of `plan.rows()` rows on a UNet with `attention_layers`
    /// self-attention layers.
    pub fn new(options: &StyleAligned, plan: ReferencePlan, attention_layers: usize, device: &Device) -> Result<Self, PatchError> {
        let resolved = options.resolve()?;
        plan.validate(plan.rows())?;
        let unshared = unshared_layers(resolved.only_self_level, attention_layers)?;
        Ok(Self { resolved, plan: DevicePlan::new(plan, device), unshared, levels: Vec::new() })
    }

    /// These hooks restricted to the levels of `scope` (its window is the caller's: steps outside
    /// it run without hooks). A level's gain multiplies the key gain of every row that is not
    /// its own reference.
    pub fn with_scope(mut self, scope: &ResolvedScope) -> Self {
        let device = self.plan.gain.device();
        self.levels = scope
            .levels
            .iter()
            .map(|&switches| {
                let plan = (switches.gain != 1.0).then(|| {
                    let mut p = self.plan.plan.clone();
                    for (i, g) in p.gain.iter_mut().enumerate() {
                        if p.reference_of[i] != i {
                            *g *= switches.gain;
                        }
                    }
                    DevicePlan::new(p, &device)
                });
                LevelHooks { switches, plan }
            })
            .collect();
        self
    }

    fn level(&self, level: Level) -> Option<&LevelHooks> {
        self.levels.iter().find(|l| l.switches.level == level)
    }

    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    pub fn plan(&self) -> &ReferencePlan {
        &self.plan.plan
    }

    /// The per-layer "left unpatched" vector.
    pub fn unshared_layers(&self) -> &[bool] {
        &self.unshared
    }
}

impl UNetHooks for StyleAlignedHooks {
    fn group_norm(&self, site: Site, norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
        let share = self.level(site.level).map_or(self.resolved.share_group_norm, |l| l.switches.share_group_norm);
        if share { ops::shared_group_norm_act(norm, x, &self.plan, silu) } else { norm.forward_act(x, silu) }
    }

    fn self_attention(&self, site: Site, layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        let level = self.level(site.level);
        if self.unshared.get(layer).copied().unwrap_or(false) || level.is_some_and(|l| !l.switches.share_attention) {
            return attn.forward(x, None);
        }
        let plan = level.and_then(|l| l.plan.as_ref()).unwrap_or(&self.plan);
        let r = &self.resolved;
        let switches = AttnSwitches {
            adain_q: r.adain_q,
            adain_k: r.adain_k,
            adain_v: r.adain_v,
            share: r.share_attention,
            score_shift: r.score_shift,
        };
        match r.site {
            AdainSite::Input => ops::node_attention(attn, x, plan, switches),
            AdainSite::Projected if r.full_attention_share => ops::full_share_attention(attn, x, plan),
            AdainSite::Projected => ops::official_attention(attn, x, plan, switches),
        }
    }
}

/// A patched model: a clone of a loaded model (sharing its weight tensors) plus the patch as plain
/// data. Creating, changing or dropping one never touches the base model or any other clone.
#[derive(Clone, Debug)]
pub struct Patched<M> {
    pub model: M,
    pub patch: StyleAligned,
}

impl Patched<crate::model::unet::UNet> {
    /// Patches a clone of `base` (validates the options).
    pub fn new(base: &crate::model::unet::UNet, patch: StyleAligned) -> Result<Self, PatchError> {
        patch.resolve()?;
        Ok(Self { model: base.clone(), patch })
    }

    /// The hooks of this patch for one batch laid out by `plan`.
    pub fn hooks(&self, plan: ReferencePlan, device: &Device) -> Result<StyleAlignedHooks, PatchError> {
        StyleAlignedHooks::new(&self.patch, plan, self.model.self_attention_layers(), device)
    }

    /// One patched UNet call on a batch laid out by `plan`.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: &Tensor<3>,
        text_time: Option<&crate::model::unet::TextTime>,
        plan: ReferencePlan,
    ) -> Result<Tensor<4>, PatchError> {
        let hooks = self.hooks(plan, &sample.device())?;
        Ok(self.model.forward(sample, timesteps, encoder_hidden_states, text_time, &hooks)?)
    }
}
