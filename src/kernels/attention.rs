//! Multi-head attention with StyleAligned's shared keys and values read in place.
//!
//! One cube per (row, head, block of queries), one unit per query. The cube walks its row's keys,
//! then (when sharing) those of row `reference_of[b]` — scaled by the row's gain, their logits
//! shifted by `score_shift` — with the values of `value_reference_of[b]`, a tile of keys and values
//! at a time staged in shared memory; the softmax is online (running maximum and sum,
//! flash-attention style) and everything accumulates in f32. No concatenated K / V and no logits
//! matrix exist. AdaIN of q / k / v is fused into the loads as a
//! per-(row, channel) affine map computed beforehand ([`super::adain::adain_affine_into`]).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::ElemType;
use cubecl::prelude::*;

use super::StyleAttention;
use super::adain::adain_affine_into;
use super::group_norm::{f32_table, u32_table};

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    affine: &Tensor<f32>,
    refs: &Tensor<u32>,
    gain: &Tensor<f32>,
    out: &mut Tensor<F>,
    rows: u32,
    q_tokens: u32,
    k_tokens: u32,
    heads: u32,
    scale: f32,
    score_shift: f32,
    #[comptime] head_dim: usize,
    #[comptime] tile: usize,
    #[comptime] adain_q: bool,
    #[comptime] adain_k: bool,
    #[comptime] adain_v: bool,
    #[comptime] share: bool,
    #[define(F)] _dtype: ElemType,
) {
    let nq = q_tokens as usize;
    let nk = k_tokens as usize;
    let hs = heads as usize;
    let bs = rows as usize;
    let bh = CUBE_POS_Y as usize;
    let h = bh % hs;
    let b = bh / hs;
    let unit = UNIT_POS as usize;
    let i = CUBE_POS_X as usize * tile + unit;
    let valid = i < nq;
    // Units past the last query still load their share of every key tile.
    let i_read = min(i, nq - 1);
    let c_all = hs * head_dim;
    let off = h * head_dim;
    // This unit's scaled query and output accumulator, in registers: the loops over the head
    // dimension are unrolled (constant indices). Unrolled, they also stay clear of Mesa's
    // lavapipe's limit on loop iterations per invocation (about 65 535, all loops together, after
    // which every loop stops after one iteration).
    let mut qa = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    let mut keys = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    let mut vals = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    let q_base = (b * nq + i_read) * c_all + off;
    #[unroll]
    for e in 0..head_dim {
        let mut x = f32::cast_from(q[q_base + e]);
        if comptime!(adain_q) {
            let a = (b * c_all + off + e) * 2;
            x = x * affine[a] + affine[a + 1];
        }
        qa[e] = x * scale;
        acc[e] = f32::new(0.0);
    }
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);
    let passes = comptime!(if share { 2usize } else { 1usize });
    for pass in 0..passes {
        let mut kb = b;
        let mut vb = b;
        let mut g = f32::new(1.0);
        let mut shift = f32::new(0.0);
        if pass == 1 {
            kb = refs[b] as usize;
            vb = refs[bs + b] as usize;
            g = gain[b];
            shift = score_shift;
        }
        let mut j0 = 0usize;
        while j0 < nk {
            // Each unit loads one key and one value of the tile (AdaIN and gain applied).
            let j = j0 + unit;
            if j < nk {
                let k_base = (kb * nk + j) * c_all + off;
                let v_base = (vb * nk + j) * c_all + off;
                #[unroll]
                for e in 0..head_dim {
                    let mut kx = f32::cast_from(k[k_base + e]);
                    if comptime!(adain_k) {
                        let a = ((bs + kb) * c_all + off + e) * 2;
                        kx = kx * affine[a] + affine[a + 1];
                    }
                    keys[unit * head_dim + e] = kx * g;
                    let mut vx = f32::cast_from(v[v_base + e]);
                    if comptime!(adain_v) {
                        let a = ((2 * bs + vb) * c_all + off + e) * 2;
                        vx = vx * affine[a] + affine[a + 1];
                    }
                    vals[unit * head_dim + e] = vx;
                }
            }
            sync_cube();
            let count = min(tile, nk - j0);
            for t in 0..count {
                let mut s = f32::new(0.0);
                #[unroll]
                for e in 0..head_dim {
                    s += qa[e] * keys[t * head_dim + e];
                }
                s += shift;
                let m_new = max(m, s);
                let corr = (m - m_new).exp();
                let p = (s - m_new).exp();
                l = l * corr + p;
                #[unroll]
                for e in 0..head_dim {
                    acc[e] = acc[e] * corr + p * vals[t * head_dim + e];
                }
                m = m_new;
            }
            sync_cube();
            j0 += tile;
        }
    }
    if valid {
        let o_base = (b * nq + i) * c_all + off;
        #[unroll]
        for e in 0..head_dim {
            out[o_base + e] = F::cast_from(acc[e] / l);
        }
    }
}

/// `softmax(q kᵀ / √d) v` per head for q (B, Nq, H·d), k / v (B, Nk, H·d), with the StyleAligned
/// extras of `style` (see [`StyleAttention`]).
pub(crate) fn attention(q: CubeTensor, k: CubeTensor, v: CubeTensor, heads: usize, style: Option<&StyleAttention>) -> CubeTensor {
    let q = into_contiguous(q);
    let k = into_contiguous(k);
    let v = into_contiguous(v);
    let qd: Vec<usize> = q.meta.shape().iter().copied().collect();
    let kd: Vec<usize> = k.meta.shape().iter().copied().collect();
    let (b, nq, c) = (qd[0], qd[1], qd[2]);
    let nk = kd[1];
    let d = c / heads;
    let client = q.client.clone();
    let out = empty_device_dtype(client.clone(), q.device.clone(), q.meta.shape().clone(), q.dtype);
    let total = b * heads * nq;
    if total == 0 {
        return out;
    }
    let (adain_q, adain_k, adain_v) = style.map_or((false, false, false), |s| (s.adain_q, s.adain_k, s.adain_v));
    let affine = if adain_q || adain_k || adain_v {
        let s = style.expect("adain implies a style");
        // Slots 0, 1, 2: q, k, v (a slot that is off is never read).
        let affine = empty_device_dtype(client.clone(), q.device.clone(), Shape::new([3 * b * c * 2]), DType::F32);
        for (slot, (t, on)) in [(&q, adain_q), (&k, adain_k), (&v, adain_v)].into_iter().enumerate() {
            if on {
                adain_affine_into(t, &s.stats_reference_of, s.adain_eps, &affine, slot);
            }
        }
        affine
    } else {
        f32_table(&q, &[0.0])
    };
    let shared = style.and_then(|s| s.share.as_ref());
    let (refs, gain, score_shift) = match shared {
        Some(s) => {
            let mut refs = s.reference_of.clone();
            refs.extend_from_slice(&s.value_reference_of);
            (u32_table(&q, &refs), f32_table(&q, &s.gain), s.score_shift)
        }
        None => (u32_table(&q, &[0]), f32_table(&q, &[1.0]), 0.0),
    };
    // Keys per tile: one per unit; K and V tiles in f32 within 16 KiB of shared memory.
    let tile = (2048 / d).clamp(1, 32);
    let cube_dim = CubeDim::new_1d(tile as u32);
    let cube_count = CubeCount::Static(nq.div_ceil(tile) as u32, (b * heads) as u32, 1);
    let dtype = q.dtype;
    attention_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        affine.into_tensor_arg(),
        refs.into_tensor_arg(),
        gain.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        b as u32,
        nq as u32,
        nk as u32,
        heads as u32,
        (1.0 / (d as f64).sqrt()) as f32,
        score_shift,
        d,
        tile,
        adain_q,
        adain_k,
        adain_v,
        shared.is_some(),
        dtype_to_storage_type(dtype),
    );
    out
}
