//! ControlNets on a set's targets: the control images are fitted and turned into tensors when
//! the set is prepared, and at every step [`Pipeline::control_residuals`] runs each ControlNet on
//! the rows that use it at that step and sums the residuals for the UNet.
//!
//! Semantics (diffusers' ControlNet pipelines without guess mode): a ControlNet conditions both
//! CFG halves of a target row; the reference row gets no control (its residuals are zero, so the
//! style source stays the plain model's); at step i of n a control is active iff
//! `!(i/n < start || (i+1)/n > end)` (diffusers' `control_guidance_start/end`); its residuals are
//! multiplied by `conditioning_scale`; several ControlNets on a set add their residuals
//! (MultiControlNet).

use std::sync::Arc;

use burn::tensor::{Int, Tensor, TensorData};

use super::reference::ReferenceImage;
use super::{BatchSpec, Image, Pipeline, PipelineError, SetSpec, SetState, invalid};
use crate::model::ModelError;
use crate::model::controlnet::ControlNet;
use crate::model::unet::{AdditionalResiduals, TextTime, UNetConfig, skip_channels, skip_sizes};
use crate::sampling::Conditioning;

/// One ControlNet applied to a set's targets (every row but the reference).
///
/// `images`: one image for every target, or one per target in target order (the prompts after
/// the reference prompt; with a reference image, every prompt). Any size: each is fitted to the
/// request size like a reference image (centre crop to the aspect ratio, then resize), and read
/// as RGB values in [0, 1]. `conditioning_scale` multiplies the residuals; the control is active
/// at step i of n iff `!(i/n < start || (i+1)/n > end)`, with `0 <= start < end <= 1`.
#[derive(Clone, Debug)]
pub struct ControlSpec {
    pub net: Arc<ControlNet>,
    pub images: Vec<Image>,
    pub conditioning_scale: f32,
    pub start: f32,
    pub end: f32,
}

impl PartialEq for ControlSpec {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.net, &other.net)
            && self.images == other.images
            && self.conditioning_scale == other.conditioning_scale
            && self.start == other.start
            && self.end == other.end
    }
}

/// A control of a set in flight: the fitted images as one tensor (targets, 3, H, W) in [0, 1].
#[derive(Clone, Debug)]
pub struct SetControl {
    pub net: Arc<ControlNet>,
    pub images: Tensor<4>,
    pub conditioning_scale: f32,
    pub start: f32,
    pub end: f32,
}

/// Whether a control with window `[start, end]` acts at step `i` of `n` (diffusers' rule
/// `keep = 1 - (i/n < start or (i+1)/n > end)`, computed in f32).
pub fn control_active(i: usize, n: usize, start: f32, end: f32) -> bool {
    let (i, n) = (i as f32, n as f32);
    !(i / n < start || (i + 1.0) / n > end)
}

/// Bytes (f32) of the residuals a ControlNet gives for `rows` UNet rows of a `latent_h`×`latent_w`
/// latent: one tensor per skip connection and the mid block's. They live through the UNet's
/// forward, beside its own skip connections (for the admission estimate, [`super::cost`]).
pub fn residual_bytes(unet: &UNetConfig, rows: usize, latent_h: usize, latent_w: usize) -> u64 {
    let sizes = skip_sizes(unet, latent_h, latent_w);
    let elems: usize = skip_channels(unet).iter().zip(&sizes).map(|(c, (h, w))| c * h * w).sum::<usize>()
        + unet.block_out_channels.last().copied().unwrap_or(0) * sizes.last().map_or(0, |(h, w)| h * w);
    (rows * elems * 4) as u64
}

/// Bytes (f32) a set's prepared controls hold while it runs: per control, one RGB image per target
/// at the request size.
pub fn control_image_bytes(targets: usize, width: usize, height: usize, controls: usize) -> u64 {
    (controls * targets * 3 * width * height * 4) as u64
}

/// Number of target rows of a set (every row but the reference).
pub fn target_count(set: &SetSpec) -> usize {
    if set.reference.is_some() { set.prompts.len() } else { set.prompts.len().saturating_sub(1) }
}

/// A ControlNet's rows of one step: full-batch row indices (over both CFG halves), each row's
/// control image and scale.
struct Pass {
    net: Arc<ControlNet>,
    /// Which use of the net within a set this pass serves (0: the first).
    occurrence: usize,
    rows: Vec<usize>,
    images: Vec<Tensor<4>>,
    scales: Vec<f32>,
}

impl Pipeline {
    /// Checks a set's controls against the model and the batch; errors name the field
    /// (`controls[j].…`).
    pub fn validate_controls(&self, set: &SetSpec) -> Result<(), PipelineError> {
        let targets = target_count(set);
        for (j, c) in set.controls.iter().enumerate() {
            let field = |name: &str| format!("controls[{j}].{name}");
            c.net.check_fits(&self.inner.unet.config).map_err(|m| invalid(&field("net"), m))?;
            let f = c.net.config.hint_factor();
            if f != self.pixel_factor() {
                return Err(invalid(
                    &field("net"),
                    format!("the ControlNet takes images {f} times the latent, this model's VAE scales by {}", self.pixel_factor()),
                ));
            }
            if c.net.config.conditioning_channels != 3 {
                return Err(invalid(
                    &field("net"),
                    format!("the ControlNet takes {}-channel images; control images are RGB", c.net.config.conditioning_channels),
                ));
            }
            if c.images.len() != 1 && c.images.len() != targets {
                return Err(invalid(
                    &field("images"),
                    format!("{} images for {targets} targets (one for all, or one per target)", c.images.len()),
                ));
            }
            if let Some(k) = c.images.iter().position(|im| im.width == 0 || im.height == 0 || im.rgb.len() != im.width * im.height * 3) {
                return Err(invalid(&field("images"), format!("image {k} is empty or malformed")));
            }
            if !c.conditioning_scale.is_finite() {
                return Err(invalid(&field("conditioning_scale"), format!("{} is not a finite number", c.conditioning_scale)));
            }
            if !(c.start >= 0.0 && c.start < c.end && c.end <= 1.0) {
                return Err(invalid(&field("start"), format!("window [{}, {}] must satisfy 0 <= start < end <= 1", c.start, c.end)));
            }
        }
        Ok(())
    }

    /// The controls of a set, images fitted to the batch size (see [`ControlSpec`]).
    pub(super) fn prepare_controls(&self, set: &SetSpec, batch: &BatchSpec) -> Result<Vec<SetControl>, PipelineError> {
        self.validate_controls(set)?;
        let targets = target_count(set);
        let dev = &self.inner.device;
        let mut out = Vec::with_capacity(set.controls.len());
        for c in &set.controls {
            if targets == 0 {
                continue;
            }
            let fitted: Vec<Tensor<4>> =
                c.images.iter().map(|im| image_tensor(&ReferenceImage::fit(im, batch.width, batch.height), dev)).collect();
            let images = if fitted.len() == 1 { fitted[0].clone().repeat_dim(0, targets) } else { Tensor::cat(fitted, 0) };
            out.push(SetControl { net: c.net.clone(), images, conditioning_scale: c.conditioning_scale, start: c.start, end: c.end });
        }
        Ok(out)
    }

    /// The summed ControlNet residuals of step `i` of `n` for the UNet batch of the live sets
    /// (rows: every set's unconditional rows, then every set's conditional rows; `x_in` is one
    /// half, already scaled for the model), or `None` when no control acts at this step. Each
    /// ControlNet runs once on the target rows that use it now (a set using one ControlNet twice
    /// adds a second pass); rows without control get zeros. An img2img target counts the window
    /// over its own steps (from its entry step on) and gets no control before it enters.
    pub fn control_residuals(
        &self,
        live: &[SetState],
        x_in: &Tensor<4>,
        t: f32,
        cond: &Conditioning,
        i: usize,
        n: usize,
    ) -> Result<Option<AdditionalResiduals>, ModelError> {
        let half = x_in.dims()[0];
        let mut passes: Vec<Pass> = Vec::new();
        for h in 0..2 {
            let mut offset = 0;
            for l in live {
                let rows = l.rows();
                let mut seen: Vec<*const ControlNet> = Vec::new();
                for c in &l.controls {
                    // An img2img target counts its own steps, from its entry (diffusers'
                    // ControlNet img2img pipeline keeps the window on the cut schedule).
                    let active: Vec<usize> = (0..rows - 1)
                        .filter(|&target| {
                            let entry = l.entries.iter().find(|e| e.row == target + 1).map_or(0, |e| e.step);
                            i >= entry && control_active(i - entry, n - entry, c.start, c.end)
                        })
                        .collect();
                    if active.is_empty() {
                        continue;
                    }
                    // The k-th use of a net within a set goes to that net's k-th pass.
                    let ptr = Arc::as_ptr(&c.net);
                    let occurrence = seen.iter().filter(|&&p| p == ptr).count();
                    seen.push(ptr);
                    let k = match passes.iter().position(|p| Arc::ptr_eq(&p.net, &c.net) && p.occurrence == occurrence) {
                        Some(k) => k,
                        None => {
                            passes.push(Pass { net: c.net.clone(), occurrence, rows: Vec::new(), images: Vec::new(), scales: Vec::new() });
                            passes.len() - 1
                        }
                    };
                    let p = &mut passes[k];
                    for target in active {
                        p.rows.push(h * half + offset + 1 + target);
                        p.images.push(c.images.clone().narrow(0, target, 1));
                        p.scales.push(c.conditioning_scale);
                    }
                }
                offset += rows;
            }
        }
        let dev = x_in.device();
        let mut total: Option<AdditionalResiduals> = None;
        for p in passes {
            if p.rows.is_empty() {
                continue;
            }
            let m = p.rows.len();
            let index = |rows: Vec<usize>| {
                Tensor::<1, Int>::from_data(TensorData::new(rows.into_iter().map(|r| r as i64).collect::<Vec<_>>(), [m]), &dev)
            };
            let sample = x_in.clone().select(0, index(p.rows.iter().map(|r| r % half).collect()));
            let full = index(p.rows.clone());
            let ehs = cond.encoder_hidden_states.clone().select(0, full.clone());
            let text_time = cond.text_time.as_ref().map(|tt| TextTime {
                text_embeds: tt.text_embeds.clone().select(0, full.clone()),
                time_ids: tt.time_ids.clone().select(0, full.clone()),
            });
            let ts = Tensor::<1>::from_data(TensorData::new(vec![t; m], [m]), &dev);
            let uniform = p.scales.iter().all(|&s| s == p.scales[0]);
            let scales = if uniform { vec![p.scales[0]] } else { p.scales.clone() };
            let r = p.net.forward_scaled(sample, ts, &ehs, text_time.as_ref(), Tensor::cat(p.images, 0), &scales)?;
            // Scatter to the full batch: row r takes residual row position+1, others the zero row 0.
            let mut gather = vec![0i64; 2 * half];
            for (pos, &row) in p.rows.iter().enumerate() {
                gather[row] = pos as i64 + 1;
            }
            let gather = Tensor::<1, Int>::from_data(TensorData::new(gather, [2 * half]), &dev);
            let spread = |x: Tensor<4>| {
                let [_, c, hh, ww] = x.dims();
                // The zero row in the residuals' dtype (the ControlNet's).
                let zero = Tensor::zeros([1, c, hh, ww], (&dev, x.dtype()));
                Tensor::cat(vec![zero, x], 0).select(0, gather.clone())
            };
            let r = AdditionalResiduals { down: r.down.into_iter().map(spread).collect(), mid: spread(r.mid) };
            total = Some(match total {
                None => r,
                Some(acc) => acc + r,
            });
        }
        Ok(total)
    }
}

/// An RGB image as a (1, 3, H, W) tensor of values in [0, 1].
fn image_tensor(img: &Image, dev: &burn::tensor::Device) -> Tensor<4> {
    let (w, h) = (img.width, img.height);
    let mut chw = vec![0f32; 3 * w * h];
    for (p, px) in img.rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * h * w + p] = px[c] as f32 / 255.0;
        }
    }
    Tensor::from_data(TensorData::new(chw, [1, 3, h, w]), dev)
}

#[cfg(test)]
mod tests {
    use super::control_active;

    /// diffusers' window rule: 10 steps, [0.2, 0.8] → steps 2..=7.
    #[test]
    fn window_follows_diffusers_rule() {
        let on: Vec<usize> = (0..10).filter(|&i| control_active(i, 10, 0.2, 0.8)).collect();
        assert_eq!(on, vec![2, 3, 4, 5, 6, 7]);
        assert!((0..7).all(|i| control_active(i, 7, 0.0, 1.0)));
        let on: Vec<usize> = (0..4).filter(|&i| control_active(i, 4, 0.0, 0.5)).collect();
        assert_eq!(on, vec![0, 1]);
        let on: Vec<usize> = (0..3).filter(|&i| control_active(i, 3, 0.5, 1.0)).collect();
        assert_eq!(on, vec![2]);
    }
}
