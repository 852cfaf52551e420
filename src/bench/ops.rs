//! The UNet's hot operations at its own shapes, timed one by one (see the module above).
//!
//! | op | shape | variants |
//! |---|---|---|
//! | `group_norm` | (B, C₀, L, L): the first level's resnet norms | `plain`, `shared` (statistics pooled with the reference row, as StyleAligned's shared GroupNorm) |
//! | `attention` | (B, N, C) at the first level with self-attention, N = its tokens | `plain`, `sa-google`, `sa-node` (q/k/v/out projections included) |
//! | `conv3x3` | (B, C₀, L, L) → C₀ | `plain` |
//! | `ff_matmul` | (B·N, C) → 4C → C at the attention level | `plain` |
//!
//! Layers come from synthetic weights and are cast to the requested dtype, as are the inputs.

use std::time::Instant;

use anyhow::Context as _;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};

use super::{BenchArgs, OpRow, Variant, batch_plan, det, read_scalar, round3};
use crate::model::nn::{Attention, Conv2d, GroupNorm, Linear};
use crate::model::unet::{Level, Site, UNetConfig, UNetHooks};
use crate::model::weights::Weights;
use crate::style_aligned::StyleAlignedHooks;

fn cast_linear(l: &mut Linear, dtype: FloatDType) {
    l.weight = l.weight.clone().cast(dtype);
    l.bias = l.bias.take().map(|b| b.cast(dtype));
}

/// Runs `f` `iters` times untimed, then `iters` times timed, each output the next input; returns
/// ms per call.
fn time_chain<const D: usize>(iters: usize, x: Tensor<D>, f: impl Fn(Tensor<D>) -> Tensor<D>) -> anyhow::Result<f64> {
    let mut x = x;
    for _ in 0..iters {
        x = f(x);
    }
    read_scalar(x.clone())?;
    let t = Instant::now();
    for _ in 0..iters {
        x = f(x);
    }
    read_scalar(x)?;
    Ok(t.elapsed().as_secs_f64() * 1000.0 / iters as f64)
}

/// Times every operation of one model's shapes and appends the rows.
pub(super) fn bench_ops(
    a: &BenchArgs,
    model: &'static str,
    cfg: &UNetConfig,
    latent: usize,
    device: &Device,
    rows: &mut Vec<OpRow>,
) -> anyhow::Result<()> {
    let dtype = a.dtype.float_dtype();
    let b = a.batch;
    let w = Weights::synthetic(&format!("bench {model} ops"), 0x0b5, device);
    let input = |shape: &[usize], salt: u32| -> Tensor<1> {
        let n = shape.iter().product();
        Tensor::<1>::from_data(TensorData::new(det(n, salt), [n]), device).cast(dtype)
    };
    let mut push = |op: &'static str, variant: &'static str, shape: Vec<usize>, ms: f64| {
        eprintln!("bench: {model} {op} {variant} {shape:?}: {ms:.3} ms");
        rows.push(OpRow { model, op, variant, shape, dtype: a.dtype.as_str(), ms: round3(ms) });
    };

    // The first level: GroupNorm and the 3×3 convolution.
    let c0 = cfg.block_out_channels[0];
    let l = latent;
    let shape0 = [b, c0, l, l];
    let mut gn = GroupNorm::load(&w, "gn", cfg.norm_num_groups, c0, cfg.norm_eps)?;
    gn.weight = gn.weight.cast(dtype);
    gn.bias = gn.bias.cast(dtype);
    let x0: Tensor<4> = input(&shape0, 11).reshape(shape0);
    let site0 = Site { level: Level::Down(0) };
    let sa = |variant: Variant, layers: usize| -> anyhow::Result<StyleAlignedHooks> {
        let patch = variant.patch().context("a StyleAligned variant")?;
        Ok(StyleAlignedHooks::new(&patch, batch_plan(b)?, layers, device)?)
    };
    push("group_norm", "plain", shape0.to_vec(), time_chain(a.op_iters, x0.clone(), |x| gn.forward(x))?);
    let shared = sa(Variant::SaGoogle, 1)?;
    push("group_norm", "shared", shape0.to_vec(), time_chain(a.op_iters, x0.clone(), |x| shared.group_norm(site0, &gn, x, false))?);

    let mut conv = Conv2d::load(&w, "conv", c0, c0, 3, 1, 1)?;
    conv.weight = conv.weight.cast(dtype);
    conv.bias = conv.bias.take().map(|t| t.cast(dtype));
    push("conv3x3", "plain", shape0.to_vec(), time_chain(a.op_iters, x0, |x| conv.forward(x))?);

    // The first level with self-attention: attention and the feed-forward's matmuls.
    let Some(level) = (0..cfg.block_out_channels.len()).find(|&i| cfg.down_cross_attn[i]) else {
        anyhow::bail!("the config has no down block with attention");
    };
    let c = cfg.block_out_channels[level];
    let side = l >> level;
    let n = side * side;
    let heads = cfg.num_attention_heads[level];
    let mut attn = Attention::load(&w, "attn", c, c, heads, c / heads, false)?;
    for lin in [&mut attn.to_q, &mut attn.to_k, &mut attn.to_v, &mut attn.to_out] {
        cast_linear(lin, dtype);
    }
    let shape = [b, n, c];
    let x: Tensor<3> = input(&shape, 12).reshape(shape);
    let site = Site { level: Level::Down(level) };
    push("attention", "plain", shape.to_vec(), time_chain(a.op_iters, x.clone(), |x| attn.forward(x, None))?);
    for variant in [Variant::SaGoogle, Variant::SaNode] {
        let hooks = sa(variant, 1)?;
        push("attention", variant.name(), shape.to_vec(), time_chain(a.op_iters, x.clone(), |x| hooks.self_attention(site, 0, &attn, x))?);
    }

    let mut ff1 = Linear::load(&w, "ff1", c, 4 * c, true)?;
    let mut ff2 = Linear::load(&w, "ff2", 4 * c, c, true)?;
    cast_linear(&mut ff1, dtype);
    cast_linear(&mut ff2, dtype);
    let tokens = [b * n, c];
    let x: Tensor<2> = input(&tokens, 13).reshape(tokens);
    push("ff_matmul", "plain", vec![b * n, c, 4 * c], time_chain(a.op_iters, x, |x| ff2.forward(ff1.forward(x)))?);
    Ok(())
}
