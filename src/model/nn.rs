//! Layers shared by the UNet, the VAE and the text encoders, loaded by diffusers key names.
//!
//! GroupNorm is written from plain reductions over a reshaped tensor (burn-cuda's stock
//! GroupNorm measured ~700x slower than PyTorch on an H100), and all attention goes through
//! [`attention`] so a fused kernel can replace it in one place.

use burn::tensor::activation::softmax;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{FloatDType, Tensor, TensorData};

use std::sync::Arc;

use super::ModelError;
use super::lora::{self, LayerShape};
use super::weights::Weights;

fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

/// `nn.Linear`; the weight is kept as `[in, out]`. `name` (its module name) is how active LoRAs
/// find their adapter of it ([`super::lora`]).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
    pub name: Arc<str>,
}

impl Linear {
    pub fn load(w: &Weights, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Self, ModelError> {
        let weight = w.linear_weight(&key(prefix, "weight"), d_out, d_in)?;
        let bias = if bias { Some(w.tensor(&key(prefix, "bias"), [d_out])?) } else { None };
        w.record_layer(prefix, LayerShape::Linear { d_in, d_out });
        Ok(Self { weight, bias, name: Arc::from(prefix) })
    }

    pub fn d_out(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `x·W + b`, plus the side products of the active LoRAs that adapt this layer. `x` is cast
    /// to the weights' dtype first (a no-op when it has it).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = x.cast(self.weight.dtype());
        if !lora::active() {
            return burn::tensor::module::linear(x, self.weight.clone(), self.bias.clone());
        }
        let out = burn::tensor::module::linear(x.clone(), self.weight.clone(), self.bias.clone());
        lora::add_linear(&self.name, x, out)
    }
}

/// `nn.Conv2d` (square kernel, symmetric padding).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor<4>,
    pub bias: Option<Tensor<1>>,
    pub stride: usize,
    pub padding: usize,
    /// The module name (see [`Linear`]).
    pub name: Arc<str>,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self, ModelError> {
        let weight = w.tensor(&key(prefix, "weight"), [c_out, c_in, kernel, kernel])?;
        let bias = Some(w.tensor(&key(prefix, "bias"), [c_out])?);
        w.record_layer(prefix, LayerShape::Conv { c_in, c_out, kernel, stride, padding });
        Ok(Self { weight, bias, stride, padding, name: Arc::from(prefix) })
    }

    /// The convolution, plus the side products of the active LoRAs that adapt this layer. `x` is
    /// cast to the kernel's dtype first (a no-op when it has it).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = x.cast(self.weight.dtype());
        let options = ConvOptions::new([self.stride, self.stride], [self.padding, self.padding], [1, 1], 1);
        if !lora::active() {
            return conv2d(x, self.weight.clone(), self.bias.clone(), options);
        }
        let out = conv2d(x.clone(), self.weight.clone(), self.bias.clone(), options);
        lora::add_conv(&self.name, x, out)
    }
}

/// `nn.GroupNorm` with affine parameters.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(w: &Weights, prefix: &str, groups: usize, channels: usize, eps: f64) -> Result<Self, ModelError> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(ModelError::Config {
                file: w.path().to_path_buf(),
                field: "norm_num_groups".into(),
                message: format!("{channels} channels at `{prefix}` are not divisible into {groups} groups"),
            });
        }
        Ok(Self { weight: w.tensor(&key(prefix, "weight"), [channels])?, bias: w.tensor(&key(prefix, "bias"), [channels])?, groups, eps })
    }

    /// Per-sample, per-group mean and biased variance of `x` (B, C, H, W): two (B, G, 1) f32
    /// tensors (computed in f32 whatever `x`'s dtype, as PyTorch's GroupNorm does).
    pub fn group_stats(&self, x: Tensor<4>) -> (Tensor<3>, Tensor<3>) {
        let [b, c, h, w] = x.dims();
        let g = self.groups;
        let x = x.cast(FloatDType::F32).reshape([b, g, (c / g) * h * w]);
        let mean = x.clone().mean_dim(2);
        let var = (x - mean.clone()).square().mean_dim(2);
        (mean, var)
    }

    /// Normalises `x` with the given (f32) group statistics and applies the affine parameters,
    /// in f32; the result has `x`'s dtype.
    pub fn apply_stats(&self, x: Tensor<4>, mean: Tensor<3>, var: Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let g = self.groups;
        let dtype = x.dtype();
        let xg = x.cast(FloatDType::F32).reshape([b, g, (c / g) * h * w]);
        let xn = (xg - mean.cast(FloatDType::F32)) / (var.cast(FloatDType::F32) + self.eps).sqrt();
        let xn = xn.reshape([b, c, h, w]);
        let weight = self.weight.clone().cast(FloatDType::F32).reshape([1, c, 1, 1]);
        let bias = self.bias.clone().cast(FloatDType::F32).reshape([1, c, 1, 1]);
        (xn * weight + bias).cast(dtype)
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_act(x, false)
    }

    /// GroupNorm then SiLU (one fused kernel on GPU devices).
    pub fn forward_silu(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_act(x, true)
    }

    /// GroupNorm, then SiLU when `silu`: the fused kernel where [`crate::kernels::active`], the
    /// burn-op composition ([`Self::reference_forward`]) elsewhere.
    pub fn forward_act(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        if crate::kernels::active(&x.device())
            && let Some(out) = crate::kernels::group_norm(x.clone(), &self.weight, &self.bias, self.groups, self.eps, silu, None)
        {
            return out;
        }
        self.reference_forward(x, silu)
    }

    /// GroupNorm (then SiLU when `silu`) composed of burn ops: the CPU path and the kernels'
    /// reference.
    pub fn reference_forward(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        let (mean, var) = self.group_stats(x.clone());
        let y = self.apply_stats(x, mean, var);
        if silu { burn::tensor::activation::silu(y) } else { y }
    }
}

/// `nn.LayerNorm` over the last axis.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self { weight: w.tensor(&key(prefix, "weight"), [dim])?, bias: w.tensor(&key(prefix, "bias"), [dim])?, eps })
    }

    /// Computed in f32 whatever `x`'s dtype; the result has `x`'s dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(D - 1);
        let xn = centered / (var + self.eps).sqrt();
        let weight = self.weight.clone().cast(FloatDType::F32).unsqueeze::<D>();
        let bias = self.bias.clone().cast(FloatDType::F32).unsqueeze::<D>();
        (xn * weight + bias).cast(dtype)
    }
}

/// Multi-head scaled dot-product attention: `softmax(q kᵀ / √d + bias) v` per head.
///
/// `q` is (B, Nq, H·d), `k` and `v` are (B, Nk, H·d) — Nk may differ from Nq. `bias`, when
/// given, is added to the logits and broadcasts from (1, 1, 1, Nk) or (B, 1, Nq, Nk).
/// This is the one place attention is computed. On the CPU backend it runs burn-flex's fused
/// kernel (tiled, online softmax); elsewhere the explicit softmax(QKᵀ)V, which measured faster
/// than burn-cuda's fused attention, with the softmax computed in f32 whatever the inputs'
/// dtype. `k`, `v` and `bias` are cast to `q`'s dtype.
///
/// On the CPU, the queries are computed in tiles of at most [`QUERY_TILE`] queries, fewer when the
/// keys are many (about [`TILE_WORK`] multiply-adds per tile), with a stop check
/// ([`super::stop`]) between tiles: a large image's first-level self-attention is then many
/// bounded pieces (bounded memory, and a bounded time to notice a stop). Each query's result
/// depends on its own row only, so tiling does not change it (test `tiled_attention_equals_whole`).
/// After a stop the remaining tiles are zeros; the caller's next [`super::stop::check`] fails, so
/// they are never used.
///
/// On GPU devices ([`crate::kernels::active`]) an attention without `bias` is our fused kernel.
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, bias: Option<Tensor<4>>) -> Tensor<3> {
    if bias.is_none()
        && crate::kernels::active(&q.device())
        && let Some(out) = crate::kernels::attention(q.clone(), k.clone(), v.clone(), heads, None)
    {
        return out;
    }
    reference_attention(q, k, v, heads, bias)
}

/// [`attention`] composed of burn ops (burn-flex's fused attention on the CPU): the kernels'
/// reference.
pub fn reference_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, bias: Option<Tensor<4>>) -> Tensor<3> {
    let [b, _, c] = q.dims();
    let tile = (TILE_WORK / (b * k.dims()[1] * c).max(1)).clamp(16, QUERY_TILE);
    attention_tiled(q, k, v, heads, bias, tile)
}

/// Most queries per attention tile on the CPU (see [`attention`]).
pub const QUERY_TILE: usize = 4096;
/// Multiply-adds of `q kᵀ` per attention tile on the CPU (see [`attention`]).
pub const TILE_WORK: usize = 1 << 29;

fn attention_tiled(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, bias: Option<Tensor<4>>, tile: usize) -> Tensor<3> {
    let [b, nq, c] = q.dims();
    let nk = k.dims()[1];
    let d = c / heads;
    let dtype = q.dtype();
    let (k, v, bias) = (k.cast(dtype), v.cast(dtype), bias.map(|b| b.cast(dtype)));
    let q = q.reshape([b, nq, heads, d]).swap_dims(1, 2);
    let k = k.reshape([b, nk, heads, d]).swap_dims(1, 2);
    let v = v.reshape([b, nk, heads, d]).swap_dims(1, 2);
    let out = if fused_attention(&q.device()) {
        let bias = bias.map(|bias| {
            let [bb, bh, _, _] = bias.dims();
            bias.expand([bb, bh, nq, nk])
        });
        if nq <= tile {
            burn::tensor::module::attention(q, k, v, None, bias, Default::default())
        } else {
            let mut parts = Vec::with_capacity(nq.div_ceil(tile));
            let mut start = 0;
            while start < nq {
                let len = tile.min(nq - start);
                if super::stop::should_stop() {
                    parts.push(Tensor::zeros([b, heads, nq - start, d], (&q.device(), dtype)));
                    break;
                }
                let qt = q.clone().narrow(2, start, len);
                let bt = bias.as_ref().map(|bias| bias.clone().narrow(2, start, len));
                parts.push(burn::tensor::module::attention(qt, k.clone(), v.clone(), None, bt, Default::default()));
                start += len;
            }
            Tensor::cat(parts, 2)
        }
    } else {
        let scale = 1.0 / (d as f64).sqrt();
        let mut logits = q.matmul(k.swap_dims(2, 3)) * scale;
        if let Some(bias) = bias {
            logits = logits + bias;
        }
        softmax(logits.cast(FloatDType::F32), 3).cast(dtype).matmul(v)
    };
    out.swap_dims(1, 2).reshape([b, nq, c])
}

/// Whether `device` has a fused attention kernel worth using (burn-flex on CPU). The environment
/// variable `STYLEALIGN_ATTENTION=explicit` forces the explicit form (for benchmarks).
pub fn fused_attention(device: &burn::tensor::Device) -> bool {
    static EXPLICIT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *EXPLICIT.get_or_init(|| std::env::var("STYLEALIGN_ATTENTION").is_ok_and(|v| v == "explicit")) {
        return false;
    }
    #[cfg(feature = "cpu")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "cpu"))]
    {
        let _ = device;
        false
    }
}

/// diffusers `Attention` as used by the UNet's transformer blocks and the VAE's mid block:
/// `to_q`, `to_k`, `to_v` (bias optional), `to_out.0`.
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        prefix: &str,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self, ModelError> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(w, &key(prefix, "to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(w, &key(prefix, "to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(w, &key(prefix, "to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(w, &key(prefix, "to_out.0"), inner, query_dim, true)?,
            heads,
        })
    }

    /// Plain attention of `x` (B, N, C) over `context` (or itself).
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let ctx = context.unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(ctx.clone());
        let v = self.to_v.forward(ctx);
        self.to_out.forward(attention(q, k, v, self.heads, None))
    }
}

/// diffusers `get_timestep_embedding`: sinusoidal features of `timesteps` (N,) → (N, dim),
/// frequencies computed in f32 as diffusers does, `[cos, sin]` when `flip_sin_to_cos`. Always
/// f32 (the following linear layer casts to its own dtype, as diffusers' `.to(dtype)` does).
pub fn timestep_embedding(timesteps: Tensor<1>, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor<2> {
    let device = timesteps.device();
    let timesteps = timesteps.cast(FloatDType::F32);
    let n = timesteps.dims()[0];
    let half = dim / 2;
    let ln_max = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let e = -ln_max * (i as f32);
            (e / (half as f32 - freq_shift as f32)).exp()
        })
        .collect();
    let freqs = Tensor::<2>::from_data(TensorData::new(freqs, [1, half]), &device);
    let args = timesteps.reshape([n, 1]) * freqs;
    let (sin, cos) = (args.clone().sin(), args.cos());
    let mut parts = if flip_sin_to_cos { vec![cos, sin] } else { vec![sin, cos] };
    if dim % 2 == 1 {
        parts.push(Tensor::zeros([n, 1], &device));
    }
    Tensor::cat(parts, 1)
}

/// diffusers `TimestepEmbedding`: linear, SiLU, linear.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(w: &Weights, prefix: &str, d_in: usize, d_out: usize) -> Result<Self, ModelError> {
        Ok(Self {
            linear_1: Linear::load(w, &key(prefix, "linear_1"), d_in, d_out, true)?,
            linear_2: Linear::load(w, &key(prefix, "linear_2"), d_out, d_out, true)?,
        })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(burn::tensor::activation::silu(self.linear_1.forward(x)))
    }
}

/// Joins a prefix and a name with a dot.
pub fn join(prefix: &str, name: impl std::fmt::Display) -> String {
    let name = name.to_string();
    key(prefix, &name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Query tiles give the same attention as one pass (with and without a bias), and a stop
    /// between tiles zeroes the rest.
    #[test]
    fn tiled_attention_equals_whole() {
        let dev = burn::tensor::Device::flex();
        let q = Tensor::<3>::random([2, 70, 16], Distribution::Default, &dev);
        let k = Tensor::<3>::random([2, 90, 16], Distribution::Default, &dev);
        let v = Tensor::<3>::random([2, 90, 16], Distribution::Default, &dev);
        let bias = Tensor::<4>::random([2, 1, 70, 90], Distribution::Default, &dev);
        for bias in [None, Some(bias)] {
            let whole = attention_tiled(q.clone(), k.clone(), v.clone(), 2, bias.clone(), 4096);
            let tiled = attention_tiled(q.clone(), k.clone(), v.clone(), 2, bias, 16);
            assert_eq!(whole.dims(), tiled.dims());
            let a = whole.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let b = tiled.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(a == b, "tiled attention differs by up to {max}");
        }
        let stopped = std::rc::Rc::new(std::cell::Cell::new(0usize));
        let calls = stopped.clone();
        // Fires from the second tile on: tile 1 computed, the rest zeros.
        let out = super::super::stop::scoped(
            std::rc::Rc::new(move || {
                calls.set(calls.get() + 1);
                calls.get() > 1
            }),
            || attention_tiled(q.clone(), k.clone(), v.clone(), 2, None, 16),
        );
        assert_eq!(out.dims(), [2, 70, 16]);
        let rest = out.narrow(1, 16, 54).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        assert!(rest.iter().all(|x| *x == 0.0));
        assert_eq!(stopped.get(), 2, "checked before each tile until it fired");
    }
}
