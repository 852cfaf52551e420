//! StyleAligned (Hertz et al., CVPR 2024) as a patch on the UNet: the reference's keys and values
//! are shared into every row's self-attention, with AdaIN on queries / keys, and optionally shared
//! GroupNorm statistics. The patch is plain data ([`StyleAligned`] + [`ReferencePlan`]); it touches
//! the model only through [`UNetHooks`], so a patched model is the shared base weights plus this value.

pub mod ops;
pub mod options;
pub mod plan;

use burn::tensor::{Device, Tensor};

use crate::model::nn::{Attention, GroupNorm};
use crate::model::unet::UNetHooks;

pub use options::{AdainSite, NodeOptions, OfficialArgs, OptionError, Resolved, ShareAttn, ShareNorm, StyleAligned, unshared_layers};
pub use plan::{PlanError, ReferencePlan};

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
}

impl StyleAlignedHooks {
    /// Builds the hooks for a batch of `plan.rows()` rows on a UNet with `attention_layers`
    /// self-attention layers.
    pub fn new(options: &StyleAligned, plan: ReferencePlan, attention_layers: usize, device: &Device) -> Result<Self, PatchError> {
        let resolved = options.resolve()?;
        plan.validate(plan.rows())?;
        let unshared = unshared_layers(resolved.only_self_level, attention_layers)?;
        Ok(Self { resolved, plan: DevicePlan::new(plan, device), unshared })
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
    fn group_norm(&self, norm: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
        if self.resolved.share_group_norm { ops::shared_group_norm(norm, x, &self.plan.stats_reference_of) } else { norm.forward(x) }
    }

    fn self_attention(&self, layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        if self.unshared.get(layer).copied().unwrap_or(false) {
            return attn.forward(x, None);
        }
        let r = &self.resolved;
        let switches = AttnSwitches {
            adain_q: r.adain_q,
            adain_k: r.adain_k,
            adain_v: r.adain_v,
            share: r.share_attention,
            score_shift: r.score_shift,
        };
        match r.site {
            AdainSite::Input => ops::node_attention(attn, x, &self.plan, switches),
            AdainSite::Projected if r.full_attention_share => ops::full_share_attention(attn, x, &self.plan),
            AdainSite::Projected => ops::official_attention(attn, x, &self.plan, switches),
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
