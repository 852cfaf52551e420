//! StyleAligned's real-image reference (google's inversion mode): the image is VAE-encoded,
//! DDIM-inverted over the request's steps with its own CFG, and its latent trajectory replaces the
//! reference row after every step. Inversions are cached per scope (the client's session), image,
//! caption, size, steps and guidance.

use crate::model::lora::{self, Active, Component};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use burn::tensor::{Tensor, TensorData};
use sha2::{Digest, Sha256};

use super::{BatchSpec, Image, Pipeline, PipelineError, TextCond};
use crate::model::unet::NoHooks;
use crate::sampling::{Conditioning, Ddim, guided_output};

/// Largest accepted encoded reference image.
pub const MAX_REFERENCE_BYTES: usize = 20 * 1024 * 1024;
/// Largest accepted decoded reference image (pixels): 12 Mi (e.g. 4096×3072).
pub const MAX_REFERENCE_PIXELS: u64 = 12 * 1024 * 1024;
/// Largest accepted width or height of a reference image.
pub const MAX_REFERENCE_SIDE: usize = 8192;

/// A reference image and how to use it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceImage {
    /// Decoded RGB image (any size; it is fitted to the request size).
    pub image: Image,
    /// Its caption: the reference row's prompt and the inversion's condition.
    pub caption: String,
    /// Start the reference row `offset` levels cleaner than the batch (google's notebook: 5 of 50).
    pub offset: usize,
    /// CFG scale of the inversion (default 2).
    pub guidance: f32,
    /// Cache scope (e.g. the session id): inversions are reused only within one scope.
    pub scope: String,
}

impl ReferenceImage {
    /// The dimensions a PNG or JPEG declares in its header; nothing is decoded. Errors say what
    /// is wrong (empty, not PNG or JPEG, unreadable header).
    pub fn header(bytes: &[u8]) -> Result<(u32, u32), String> {
        if bytes.is_empty() {
            return Err("is empty".into());
        }
        let reader =
            image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot be read: {e}"))?;
        match reader.format() {
            Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
            Some(other) => return Err(format!("is {other:?}; PNG or JPEG expected")),
            None => return Err("is not a PNG or JPEG image".into()),
        }
        reader.into_dimensions().map_err(|e| format!("cannot be decoded: {e}"))
    }

    /// Decodes PNG or JPEG bytes whose header declared `width`×`height` (see [`Self::header`]);
    /// the decoder may allocate no more than that image needs.
    pub fn decode_within(bytes: &[u8], width: u32, height: u32) -> Result<Image, String> {
        let mut reader =
            image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot be read: {e}"))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(width);
        limits.max_image_height = Some(height);
        // RGBA16 of the declared size, plus room for the decoder's own buffers.
        limits.max_alloc = Some(width as u64 * height as u64 * 8 + (64 << 20));
        reader.limits(limits);
        let img = reader.decode().map_err(|e| format!("cannot be decoded: {e}"))?.into_rgb8();
        Ok(Image { width: img.width() as usize, height: img.height() as usize, rgb: img.into_raw() })
    }

    /// Decodes PNG or JPEG bytes, checking the header first ([`MAX_REFERENCE_BYTES`],
    /// [`MAX_REFERENCE_PIXELS`]); errors say what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Image, String> {
        if bytes.len() > MAX_REFERENCE_BYTES {
            return Err(format!("is {} bytes, the limit is {MAX_REFERENCE_BYTES}", bytes.len()));
        }
        let (w, h) = Self::header(bytes)?;
        if w == 0 || h == 0 || (w as u64) * (h as u64) > MAX_REFERENCE_PIXELS {
            return Err(format!("is {w}x{h}; at most {MAX_REFERENCE_PIXELS} pixels are accepted"));
        }
        Self::decode_within(bytes, w, h)
    }

    /// Fits an image to `width`×`height`: centre crop to the target aspect ratio, then a
    /// Catmull-Rom resize.
    pub fn fit(img: &Image, width: usize, height: usize) -> Image {
        if img.width == width && img.height == height {
            return img.clone();
        }
        let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.rgb.clone()).expect("rgb buffer");
        let (sw, sh) = (img.width as f64, img.height as f64);
        let target = width as f64 / height as f64;
        let (cw, ch) = if sw / sh > target { ((sh * target).round().max(1.0), sh) } else { (sw, (sw / target).round().max(1.0)) };
        let (x0, y0) = (((sw - cw) / 2.0).floor() as u32, ((sh - ch) / 2.0).floor() as u32);
        let cropped = image::imageops::crop_imm(&buf, x0, y0, cw as u32, ch as u32).to_image();
        let out = image::imageops::resize(&cropped, width as u32, height as u32, image::imageops::FilterType::CatmullRom);
        Image { width, height, rgb: out.into_raw() }
    }
}

/// A small LRU cache of inverted trajectories, with hit/miss counters.
pub struct InversionCache {
    capacity: usize,
    inner: Mutex<CacheState>,
}

/// Keys are SHA-256 digests of everything an inversion depends on.
#[derive(Default)]
struct CacheState {
    entries: HashMap<[u8; 32], Arc<Vec<Tensor<4>>>>,
    /// Least recently used first.
    order: VecDeque<[u8; 32]>,
    hits: u64,
    misses: u64,
}

impl InversionCache {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, inner: Mutex::new(CacheState::default()) }
    }

    fn get(&self, key: &[u8; 32]) -> Option<Arc<Vec<Tensor<4>>>> {
        let mut g = self.inner.lock().expect("cache lock");
        let hit = g.entries.get(key).cloned();
        if hit.is_some() {
            g.hits += 1;
            g.order.retain(|k| k != key);
            g.order.push_back(*key);
        } else {
            g.misses += 1;
        }
        hit
    }

    fn put(&self, key: [u8; 32], value: Arc<Vec<Tensor<4>>>) {
        let mut g = self.inner.lock().expect("cache lock");
        if g.entries.insert(key, value).is_none() {
            g.order.push_back(key);
        }
        while g.order.len() > self.capacity {
            if let Some(old) = g.order.pop_front() {
                g.entries.remove(&old);
            }
        }
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        let g = self.inner.lock().expect("cache lock");
        (g.hits, g.misses)
    }
}

impl Pipeline {
    /// (hits, misses) of the inversion cache.
    pub fn inversion_cache_stats(&self) -> (u64, u64) {
        self.inner.inversions.stats()
    }

    /// The image's latent `z0` = VAE posterior mean · scaling factor, for an image already at the
    /// request size.
    pub fn encode_image(&self, img: &Image) -> Result<Tensor<4>, PipelineError> {
        let (w, h) = (img.width, img.height);
        let mut chw = vec![0f32; 3 * h * w];
        for (p, px) in img.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * h * w + p] = px[c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        let x = Tensor::<4>::from_data(TensorData::new(chw, [1, 3, h, w]), &self.inner.device);
        let post = self.inner.vae.encode(x)?;
        Ok(post.mean * self.inner.vae.config.scaling_factor)
    }

    /// DDIM inversion of `z0` (1, C, h, w) over `steps` steps of the model's schedule with the
    /// unpatched UNet and CFG `guidance` between `uncond` and `caption` (one row each). Returns
    /// `steps + 1` latents in google's order (fully inverted first, `z0` last).
    pub fn invert(
        &self,
        z0: Tensor<4>,
        caption: &TextCond,
        uncond: &TextCond,
        steps: usize,
        guidance: f32,
        size: (usize, usize),
    ) -> Result<Vec<Tensor<4>>, PipelineError> {
        let ddim = Ddim::new(self.inner.scheduler.clone(), steps);
        let text_time = caption.pooled.as_ref().map(|p| {
            let pooled = Tensor::cat(vec![uncond.pooled.clone().expect("pooled"), p.clone()], 0);
            let ids = super::SizeConditioning::plain(size.0, size.1).time_ids();
            let ids: Vec<f32> = (0..2).flat_map(|_| ids).collect();
            crate::model::unet::TextTime {
                text_embeds: pooled,
                time_ids: Tensor::from_data(TensorData::new(ids, [2, 6]), &self.inner.device),
            }
        });
        let cond = Conditioning { encoder_hidden_states: Tensor::cat(vec![uncond.hidden.clone(), caption.hidden.clone()], 0), text_time };
        let mut z = z0.clone();
        let mut zts = vec![z0];
        for &t in ddim.timesteps.iter().rev() {
            let eps = guided_output(&self.inner.unet, z.clone(), t as f32, &cond, guidance, &NoHooks)?;
            let (a_to, a_from) = ddim.alphas(t);
            let x0 = (z - eps.clone() * (1.0 - a_from).sqrt()) / a_from.sqrt();
            z = x0 * a_to.sqrt() + eps * (1.0 - a_to).sqrt();
            zts.push(z.clone());
        }
        zts.reverse();
        Ok(zts)
    }

    /// The (cached) inverted trajectory of a set's reference image at the batch's size and steps.
    pub(super) fn inverted_trajectory(
        &self,
        r: &ReferenceImage,
        batch: &BatchSpec,
        adapters: &crate::model::lora::Adapters,
    ) -> Result<Vec<Tensor<4>>, PipelineError> {
        let mut hasher = Sha256::new();
        for (l, w) in adapters {
            hasher.update(l.name.as_bytes());
            hasher.update([0]);
            hasher.update(l.path.as_os_str().as_encoded_bytes());
            hasher.update([0]);
            hasher.update(w.to_le_bytes());
        }
        hasher.update(r.scope.as_bytes());
        hasher.update([0]);
        hasher.update(r.caption.as_bytes());
        hasher.update([0]);
        for v in [r.image.width, r.image.height, batch.width, batch.height, batch.steps] {
            hasher.update((v as u64).to_le_bytes());
        }
        hasher.update(r.guidance.to_le_bytes());
        hasher.update(&r.image.rgb);
        let key: [u8; 32] = hasher.finalize().into();
        if let Some(hit) = self.inner.inversions.get(&key) {
            return Ok(hit.as_ref().clone());
        }
        let fitted = ReferenceImage::fit(&r.image, batch.width, batch.height);
        let z0 = self.encode_image(&fitted)?;
        let caption = self.encode_prompts_with(&[r.caption.as_str()], false, adapters)?;
        let uncond = self.encode_negative_with("", 1, adapters)?;
        // The set's LoRAs act on the inversion's UNet calls too.
        let active = Active::uniform(Component::Unet, 2, adapters.clone(), &self.inner.device);
        let zts = lora::scoped(active, || self.invert(z0, &caption, &uncond, batch.steps, r.guidance, (batch.width, batch.height)))?;
        self.inner.inversions.put(key, Arc::new(zts.clone()));
        Ok(zts)
    }
}
