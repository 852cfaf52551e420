//! Peak-memory estimate of a generation, from the model's configuration alone (no tensor is
//! allocated): what admission ([`crate::serve::admission`]) compares with the memory budget
//! before a request is queued.
//!
//! Activations take the model's element size ([`CostModel::activation_bytes`]: 4 bytes in f32, 2 in
//! f16 and bf16; the VAE's own, [`CostModel::vae_bytes`], f32 for an upcast SDXL VAE); the
//! attention matrices of the explicit path are counted in f32 (its softmax is computed in f32),
//! and what lives outside the models (latents, text conditioning, sampler history) is f32. The
//! estimate is the largest of the phases of a set's life, plus what lives through all of them:
//!
//! - **UNet step** (`2 × rows` batch rows: the CFG halves): the skip connections of every level
//!   (kept until the up path consumes them), plus the working set of the costliest level: a
//!   ResNet block (6 tensors of the level's channels: the up path's concatenated input, norm,
//!   activation, conv, shortcut), or a transformer block (GEGLU feed-forward, 16 channels per
//!   channel; q, k, v and the output with StyleAligned's shared keys and values, 2N tokens), plus
//!   the attention matrices the code allocates: the explicit `softmax(QKᵀ)V` keeps the logits and
//!   their softmax (`2 × heads × Nq × Nk` per row), burn-flex's fused kernel on the CPU none of
//!   them. With `full_attention_share` a set's rows attend over all its rows' tokens (Nq = Nk =
//!   rows × N per group).
//! - **VAE decode** (all of a set's images at once): the full-resolution stage (the previous
//!   stage's channels upsampled, three tensors, and two of the first stage's) or the mid block at
//!   the latent size (four tensors of the top channels, and its single-head attention matrices
//!   when explicit), whichever is larger.
//! - **Reference image** (inversion mode): the VAE encode of the fitted image at full resolution,
//!   and the inversion's UNet steps (one row pair).
//! - **Always**: the latents, text conditioning and sampler history; the decoded reference
//!   image's pixels (RGB, its copy while it is fitted, and the fitted float image) and its
//!   inverted trajectory (`steps + 1` latents); and [`FIXED_BYTES`].

use crate::model::precision::Precision;
use crate::model::unet::UNetConfig;
use crate::model::vae::VaeConfig;

const F32: u64 = 4;

/// What a request costs beyond its tensors, whatever its size: the runtime's per-call buffers,
/// allocator slack, the images' conversion and PNG encoding. Measured on the CPU backend: about
/// 17 MiB, fitted from requests at 256² and 512² (docs/limits.md); counted with room to spare.
pub const FIXED_BYTES: u64 = 32 << 20;

/// The model facts the estimate needs.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    pub latent_channels: usize,
    pub pixel_factor: usize,
    pub unet_channels: Vec<usize>,
    pub unet_layers: Vec<usize>,
    /// Heads per level of the levels that have transformer blocks (`None`: no attention there).
    pub unet_heads: Vec<Option<usize>>,
    pub context_dim: usize,
    pub vae_channels: Vec<usize>,
    pub vae_mid_attention: bool,
    /// Attention runs as a fused kernel (no attention matrices allocated).
    pub fused_attention: bool,
    /// Bytes per element of the UNet's activations (the model's dtype).
    pub activation_bytes: u64,
    /// Bytes per element of the VAE's activations.
    pub vae_bytes: u64,
}

/// What one set asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SetShape {
    /// Images of the set (prompts; a reference image adds its own row on top).
    pub images: usize,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Pixels of the reference image as decoded (`None`: no reference image).
    pub reference_pixels: Option<u64>,
    /// The session's patch attends over the whole group (`full_attention_share`).
    pub full_share: bool,
    /// Other images of the request (img2img init images, control images): how many, and their
    /// pixels as decoded, in all.
    pub input_images: usize,
    pub input_pixels: u64,
    /// Of those, the init images (each VAE-encoded, one at a time).
    pub init_images: usize,
    /// ControlNets on the set's targets.
    pub controls: usize,
}

/// A peak-memory estimate in bytes, by phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    pub unet: u64,
    pub vae: u64,
    pub reference_encode: u64,
    /// Lives through every phase (latents, conditioning, reference pixels, trajectory).
    pub resident: u64,
    /// Of `resident`: the decoded pixels of the reference and input images (what a queued
    /// request holds).
    pub reference_pixels: u64,
    pub total: u64,
}

impl CostModel {
    pub fn new(unet: &UNetConfig, vae: &VaeConfig, pixel_factor: usize, fused_attention: bool) -> Self {
        let n = unet.block_out_channels.len();
        let unet_heads = (0..n)
            .map(|i| {
                // The last level's mid block always has a transformer.
                let attn = unet.down_cross_attn.get(i).copied().unwrap_or(false) || i + 1 == n;
                attn.then(|| unet.num_attention_heads.get(i).copied().unwrap_or(8).max(1))
            })
            .collect();
        Self {
            latent_channels: unet.in_channels,
            pixel_factor: pixel_factor.max(1),
            unet_channels: unet.block_out_channels.clone(),
            unet_layers: unet.layers_per_block.clone(),
            unet_heads,
            context_dim: unet.cross_attention_dim.first().copied().unwrap_or(768),
            vae_channels: vae.block_out_channels.clone(),
            vae_mid_attention: vae.mid_block_add_attention,
            fused_attention,
            activation_bytes: F32,
            vae_bytes: F32,
        }
    }

    /// This model with activations of `unet` and `vae` precision.
    pub fn with_precision(self, unet: Precision, vae: Precision) -> Self {
        Self { activation_bytes: unet.size() as u64, vae_bytes: vae.size() as u64, ..self }
    }

    /// Floats of one UNet call per batch row (`group_rows`: rows that attend together under
    /// full sharing).
    fn unet_floats(&self, h: usize, w: usize, group_rows: usize, full_share: bool) -> (u64, u64) {
        let mut skips = (self.unet_channels.first().copied().unwrap_or(0) * h * w) as u64;
        let mut working = 0u64;
        let mut quadratic = 0u64;
        for (l, &c) in self.unet_channels.iter().enumerate() {
            let n = ((h >> l).max(1) * (w >> l).max(1)) as u64;
            let c = c as u64;
            let layers = self.unet_layers.get(l).copied().unwrap_or(2) as u64;
            skips += (layers + 1) * c * n;
            let mut level = 6 * c * n;
            if let Some(heads) = self.unet_heads[l] {
                // GEGLU: projection (8c), gate and value halves (4c each), their product (4c); or
                // q, k, v, output with shared keys and values (2N tokens for k and v).
                level = level.max(16 * c * n).max(6 * c * n + c * n);
                if !self.fused_attention {
                    let heads = heads as u64;
                    let q = if full_share { n * group_rows as u64 } else { n };
                    let k = 2 * q;
                    // Per group when shared over the whole group: spread over its rows.
                    let per_row = if full_share { 2 * heads * q * k / group_rows as u64 } else { 2 * heads * q * k };
                    quadratic = quadratic.max(per_row);
                }
            }
            working = working.max(level);
        }
        (skips + working, quadratic)
    }

    /// Floats of decoding one image.
    fn vae_decode_floats(&self, h: usize, w: usize) -> u64 {
        let c0 = self.vae_channels.first().copied().unwrap_or(128) as u64;
        let c1 = self.vae_channels.get(1).copied().unwrap_or(c0 as usize) as u64;
        let top = self.vae_channels.last().copied().unwrap_or(512) as u64;
        let (hh, ww) = ((h * self.pixel_factor) as u64, (w * self.pixel_factor) as u64);
        let n = (h * w) as u64;
        let full = (3 * c1 + 2 * c0 + 3) * hh * ww;
        let mut mid = 4 * top * n;
        if self.vae_mid_attention && !self.fused_attention {
            mid += 2 * n * n;
        }
        full.max(mid)
    }

    /// The peak memory of one set, in bytes.
    pub fn estimate(&self, s: &SetShape) -> Estimate {
        let f = self.pixel_factor;
        let (h, w) = ((s.height / f).max(1), (s.width / f).max(1));
        let rows = s.images + usize::from(s.reference_pixels.is_some());
        let batch_rows = 2 * rows as u64;
        let (linear, quadratic) = self.unet_floats(h, w, rows, s.full_share);
        let unet = batch_rows * (linear * self.activation_bytes + quadratic * F32);
        let vae = s.images as u64 * self.vae_decode_floats(h, w) * self.vae_bytes + s.images as u64 * 3 * (s.width * s.height) as u64;
        let latent = (self.latent_channels * h * w) as u64;
        // Latents, model input and output, sampler history: a few latents per batch row; the
        // text conditioning (77 tokens) of both halves.
        let mut resident = (batch_rows * 6 * latent + batch_rows * 77 * self.context_dim as u64) * F32;
        let (mut reference_encode, mut reference_pixels) = (0, 0);
        if let Some(px) = s.reference_pixels {
            // Decoded RGB, its copy while fitted, and the crop; the fitted image as floats.
            reference_pixels = 3 * px * 2 + 3 * (s.width * s.height) as u64 * (1 + F32);
            let trajectory = (s.steps as u64 + 1) * latent * F32;
            resident += reference_pixels + trajectory;
            let c0 = self.vae_channels.first().copied().unwrap_or(128) as u64;
            let encode = 5 * c0 * (s.width * s.height) as u64 * self.vae_bytes;
            let (l1, q1) = self.unet_floats(h, w, 1, false);
            reference_encode = encode.max(2 * (l1 * self.activation_bytes + q1 * F32));
        }
        if s.input_images > 0 {
            // Each decoded image and its copy while fitted; the fitted image as bytes and floats.
            let held = 3 * s.input_pixels * 2 + s.input_images as u64 * 3 * (s.width * s.height) as u64 * (1 + F32);
            reference_pixels += held;
            // An init image's latent and its noise row until it enters.
            resident += held + s.init_images as u64 * 2 * latent * F32;
        }
        if s.init_images > 0 {
            let c0 = self.vae_channels.first().copied().unwrap_or(128) as u64;
            reference_encode = reference_encode.max(5 * c0 * (s.width * s.height) as u64 * self.vae_bytes);
        }
        let mut unet = unet;
        if s.controls > 0 {
            // Each ControlNet's residuals (one tensor per skip connection and the mid block's, for
            // both CFG halves of every row) and their sum live through the UNet's forward; a
            // ControlNet's own forward (a down half) peaks below the UNet's.
            unet += (s.controls as u64 + 1) * batch_rows * self.residual_floats(h, w) * self.activation_bytes;
        }
        let total = unet.max(vae).max(reference_encode) + resident + FIXED_BYTES;
        Estimate { unet, vae, reference_encode, resident, reference_pixels, total }
    }

    /// Floats of one row's ControlNet residuals at latent size `h`×`w`: the skip connections
    /// (`conv_in`'s output, every down resnet's, every downsampler's) and the mid block's output.
    pub fn residual_floats(&self, h: usize, w: usize) -> u64 {
        let (mut hh, mut ww) = (h, w);
        let mut floats = self.unet_channels.first().copied().unwrap_or(0) * hh * ww;
        let n = self.unet_channels.len();
        for (k, &c) in self.unet_channels.iter().enumerate() {
            floats += self.unet_layers.get(k).copied().unwrap_or(1) * c * hh * ww;
            if k + 1 < n {
                (hh, ww) = (hh.div_ceil(2), ww.div_ceil(2));
                floats += c * hh * ww;
            }
        }
        floats += self.unet_channels.last().copied().unwrap_or(0) * hh * ww;
        floats as u64
    }

    /// Bytes a batch row adds at this size (the UNet's linear part), for the batch row cap.
    pub fn row_bytes(&self, width: usize, height: usize) -> u64 {
        let f = self.pixel_factor;
        let (h, w) = ((height / f).max(1), (width / f).max(1));
        let (linear, quadratic) = self.unet_floats(h, w, 1, false);
        2 * (linear * self.activation_bytes + quadratic * F32)
            + 2 * (6 * (self.latent_channels * h * w) as u64 + 77 * self.context_dim as u64) * F32
    }
}

impl super::Pipeline {
    /// The cost model of this model on its device.
    pub fn cost_model(&self) -> CostModel {
        let i = &self.inner;
        CostModel::new(&i.unet.config, &i.vae.config, self.pixel_factor(), crate::model::nn::fused_attention(&i.device))
            .with_precision(self.precision(), self.vae_precision())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15(fused: bool) -> CostModel {
        CostModel {
            latent_channels: 4,
            pixel_factor: 8,
            unet_channels: vec![320, 640, 1280, 1280],
            unet_layers: vec![2, 2, 2, 2],
            unet_heads: vec![Some(8), Some(8), Some(8), Some(8)],
            context_dim: 768,
            vae_channels: vec![128, 256, 512, 512],
            vae_mid_attention: true,
            fused_attention: fused,
            activation_bytes: 4,
            vae_bytes: 4,
        }
    }

    fn shape(images: usize, size: usize) -> SetShape {
        SetShape { images, width: size, height: size, steps: 30, ..Default::default() }
    }

    #[test]
    fn grows_with_rows_size_and_references() {
        let m = sd15(false);
        let a = m.estimate(&shape(2, 512)).total;
        assert!(m.estimate(&shape(4, 512)).total > a);
        assert!(m.estimate(&shape(2, 768)).total > a);
        let r = m.estimate(&SetShape { reference_pixels: Some(1024 * 1024), ..shape(2, 512) });
        assert!(r.total > a && r.reference_pixels >= 6 * 1024 * 1024);
        // Explicit attention allocates the matrices; the fused kernel does not.
        assert!(m.estimate(&shape(2, 512)).unet > sd15(true).estimate(&shape(2, 512)).unet);
        // Full sharing attends over the group's tokens: quadratic in its rows.
        let full = m.estimate(&SetShape { full_share: true, ..shape(4, 512) }).unet;
        assert!(full > m.estimate(&shape(4, 512)).unet);
    }

    #[test]
    fn half_precision_halves_the_activations() {
        let full = sd15(true).estimate(&shape(2, 512));
        let half = sd15(true).with_precision(Precision::F16, Precision::F16).estimate(&shape(2, 512));
        assert_eq!(2 * half.unet, full.unet);
        assert_eq!(half.resident, full.resident, "latents and conditioning stay f32");
        assert!(half.vae < full.vae);
        // An upcast VAE keeps its f32 activations.
        let upcast = sd15(true).with_precision(Precision::Bf16, Precision::F32).estimate(&shape(2, 512));
        assert_eq!(upcast.vae, full.vae);
        assert!(sd15(true).with_precision(Precision::F16, Precision::F16).row_bytes(512, 512) < sd15(true).row_bytes(512, 512));
    }

    #[test]
    fn explicit_attention_dominates_at_high_resolution() {
        // SD1.5 at 1024²: 16384 tokens at the first level, 8 heads, keys doubled by sharing:
        // 2 × 8 × 16384 × 32768 floats per row = 32 GiB for one image's two CFG rows.
        let e = sd15(false).estimate(&shape(1, 1024));
        assert!(e.unet >= 2 * 2 * 8 * 16384 * 32768 * 4, "{e:?}");
    }
}
