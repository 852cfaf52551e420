//! The patch's tensor operations: AdaIN, shared GroupNorm, reference features and the shared
//! self-attention of both flavours.

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};

use crate::kernels::{self, SharedKeys, StyleAttention};
use crate::model::nn::{Attention, GroupNorm, reference_attention};

use super::plan::ReferencePlan;

/// AdaIN epsilon (added to the unbiased variance).
pub const ADAIN_EPS: f64 = 1e-5;

/// The plan as device tensors.
#[derive(Clone, Debug)]
pub struct DevicePlan {
    pub plan: ReferencePlan,
    pub reference_of: Tensor<1, Int>,
    pub value_reference_of: Tensor<1, Int>,
    pub stats_reference_of: Tensor<1, Int>,
    /// (B, 1, 1)
    pub gain: Tensor<3>,
    /// Whether every gain is exactly 1 (no multiply needed).
    pub unit_gain: bool,
}

fn index(list: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = list.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [list.len()]), device)
}

impl DevicePlan {
    pub fn new(plan: ReferencePlan, device: &Device) -> Self {
        let b = plan.rows();
        Self {
            reference_of: index(&plan.reference_of, device),
            value_reference_of: index(&plan.value_reference_of, device),
            stats_reference_of: index(&plan.stats_reference_of, device),
            gain: Tensor::from_data(TensorData::new(plan.gain.clone(), [b, 1, 1]), device),
            unit_gain: plan.gain.iter().all(|&g| g == 1.0),
            plan,
        }
    }
}

/// AdaIN over the token axis of `t` (B, N, C): every row is normalised with its own mean and
/// unbiased standard deviation and given those of row `stats_reference_of[i]`. Computed in f32
/// whatever `t`'s dtype; the result has `t`'s dtype.
pub fn adain(t: Tensor<3>, stats_reference_of: &Tensor<1, Int>) -> Tensor<3> {
    let n = t.dims()[1];
    let dtype = t.dtype();
    let t = t.cast(FloatDType::F32);
    let mean = t.clone().mean_dim(1);
    let centered = t - mean.clone();
    let var = centered.clone().square().sum_dim(1) / ((n.max(2) - 1) as f64);
    let sd = (var + ADAIN_EPS).sqrt();
    let ref_mean = mean.select(0, stats_reference_of.clone());
    let ref_sd = sd.clone().select(0, stats_reference_of.clone());
    (centered / sd * ref_sd + ref_mean).cast(dtype)
}

/// The reference features of every row: `gain[i] · t[reference_of[i]]`, (B, N, C).
pub fn reference_features(t: Tensor<3>, reference_of: &Tensor<1, Int>, gain: Option<&Tensor<3>>) -> Tensor<3> {
    let r = t.select(0, reference_of.clone());
    match gain {
        Some(g) => {
            let dtype = r.dtype();
            r * g.clone().cast(dtype)
        }
        None => r,
    }
}

/// `concat_tokens(t, gain · t[reference_of])`: (B, N, C) → (B, 2N, C).
pub fn with_reference(t: Tensor<3>, reference_of: &Tensor<1, Int>, gain: Option<&Tensor<3>>) -> Tensor<3> {
    let r = reference_features(t.clone(), reference_of, gain);
    Tensor::cat(vec![t, r], 1)
}

/// GroupNorm where row i is normalised with the group statistics of its own elements and those
/// of row `stats_reference_of[i]` together (equal sizes: the mean of the means, and the pooled
/// biased variance). A row that is its own reference gets plain GroupNorm. Statistics in f32
/// ([`GroupNorm::group_stats`]).
pub fn shared_group_norm(norm: &GroupNorm, x: Tensor<4>, stats_reference_of: &Tensor<1, Int>) -> Tensor<4> {
    let (mean, var) = norm.group_stats(x.clone());
    let ref_mean = mean.clone().select(0, stats_reference_of.clone());
    let ref_var = var.clone().select(0, stats_reference_of.clone());
    let joint_mean = (mean.clone() + ref_mean.clone()) * 0.5;
    let joint_var = ((var + (mean - joint_mean.clone()).square()) + (ref_var + (ref_mean - joint_mean.clone()).square())) * 0.5;
    norm.apply_stats(x, joint_mean, joint_var)
}

/// [`shared_group_norm`], then SiLU when `silu`: one fused kernel where [`kernels::active`], the
/// burn-op composition elsewhere.
pub fn shared_group_norm_act(norm: &GroupNorm, x: Tensor<4>, plan: &DevicePlan, silu: bool) -> Tensor<4> {
    if kernels::active(&x.device())
        && let Some(out) =
            kernels::group_norm(x.clone(), &norm.weight, &norm.bias, norm.groups, norm.eps, silu, Some(&plan.plan.stats_reference_of))
    {
        return out;
    }
    let y = shared_group_norm(norm, x, &plan.stats_reference_of);
    if silu { burn::tensor::activation::silu(y) } else { y }
}

fn u32s(list: &[usize]) -> Vec<u32> {
    list.iter().map(|&i| i as u32).collect()
}

/// The reference keys / values of `plan` for the attention kernel.
fn shared_keys(plan: &DevicePlan, score_shift: f32) -> SharedKeys {
    SharedKeys {
        reference_of: u32s(&plan.plan.reference_of),
        value_reference_of: u32s(&plan.plan.value_reference_of),
        gain: plan.plan.gain.clone(),
        score_shift,
    }
}

/// The switches of one self-attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnSwitches {
    pub adain_q: bool,
    pub adain_k: bool,
    pub adain_v: bool,
    pub share: bool,
    pub score_shift: f32,
}

/// ComfyUI node: AdaIN on the attention input x, before the projections; the reference's
/// (AdaIN-ed) inputs are appended to keys (with the row's gain) and values.
pub fn node_attention(attn: &Attention, x: Tensor<3>, plan: &DevicePlan, s: AttnSwitches) -> Tensor<3> {
    // The kernel scales the projected reference keys by the gain: the same as projecting scaled
    // inputs unless `to_k` has a bias and some gain is not 1.
    if kernels::active(&x.device()) && (attn.to_k.bias.is_none() || plan.unit_gain) {
        let adain_x = if s.adain_q || s.adain_k || s.adain_v {
            kernels::adain(x.clone(), &plan.plan.stats_reference_of, ADAIN_EPS)
        } else {
            Some(x.clone())
        };
        if let Some(adain_x) = adain_x {
            let pick = |on: bool| if on { adain_x.clone() } else { x.clone() };
            let q = attn.to_q.forward(pick(s.adain_q));
            let k = attn.to_k.forward(pick(s.adain_k));
            let v = attn.to_v.forward(pick(s.adain_v));
            let style = StyleAttention {
                adain_q: false,
                adain_k: false,
                adain_v: false,
                stats_reference_of: u32s(&plan.plan.stats_reference_of),
                adain_eps: ADAIN_EPS as f32,
                share: Some(shared_keys(plan, 0.0)),
            };
            if let Some(out) = kernels::attention(q, k, v, attn.heads, Some(&style)) {
                return attn.to_out.forward(out);
            }
        }
    }
    node_attention_reference(attn, x, plan, s)
}

/// [`node_attention`] composed of burn ops (concatenated keys / values): the CPU path and the
/// kernel's reference.
pub fn node_attention_reference(attn: &Attention, x: Tensor<3>, plan: &DevicePlan, s: AttnSwitches) -> Tensor<3> {
    let adain_x = if s.adain_q || s.adain_k || s.adain_v { Some(adain(x.clone(), &plan.stats_reference_of)) } else { None };
    let pick = |on: bool| if on { adain_x.clone().expect("computed") } else { x.clone() };
    let q = attn.to_q.forward(pick(s.adain_q));
    let gain = (!plan.unit_gain).then_some(&plan.gain);
    let k_in = pick(s.adain_k);
    let k = if attn.to_k.bias.is_none() {
        // Without a bias, projecting then scaling equals scaling then projecting.
        with_reference(attn.to_k.forward(k_in), &plan.reference_of, gain)
    } else {
        attn.to_k.forward(with_reference(k_in, &plan.reference_of, gain))
    };
    let v = attn.to_v.forward(pick(s.adain_v));
    let v = with_reference(v, &plan.value_reference_of, None);
    attn.to_out.forward(reference_attention(q, k, v, attn.heads, None))
}

/// Official code: AdaIN on the projected q / k / v; with sharing, the reference's keys (with the
/// row's gain) and values are appended and `score_shift` is added to the logits of the appended keys.
pub fn official_attention(attn: &Attention, x: Tensor<3>, plan: &DevicePlan, s: AttnSwitches) -> Tensor<3> {
    let q = attn.to_q.forward(x.clone());
    let k = attn.to_k.forward(x.clone());
    let v = attn.to_v.forward(x);
    if kernels::active(&q.device()) {
        // AdaIN fused into the kernel's loads, the reference keys / values read in place.
        let style = StyleAttention {
            adain_q: s.adain_q,
            adain_k: s.adain_k,
            adain_v: s.adain_v,
            stats_reference_of: u32s(&plan.plan.stats_reference_of),
            adain_eps: ADAIN_EPS as f32,
            share: s.share.then(|| shared_keys(plan, s.score_shift)),
        };
        if let Some(out) = kernels::attention(q.clone(), k.clone(), v.clone(), attn.heads, Some(&style)) {
            return attn.to_out.forward(out);
        }
    }
    official_attention_projected(attn, q, k, v, plan, s)
}

/// [`official_attention`] composed of burn ops (AdaIN, concatenated keys / values, a logit bias):
/// the CPU path and the kernel's reference.
pub fn official_attention_reference(attn: &Attention, x: Tensor<3>, plan: &DevicePlan, s: AttnSwitches) -> Tensor<3> {
    let q = attn.to_q.forward(x.clone());
    let k = attn.to_k.forward(x.clone());
    let v = attn.to_v.forward(x);
    official_attention_projected(attn, q, k, v, plan, s)
}

fn official_attention_projected(
    attn: &Attention,
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    plan: &DevicePlan,
    s: AttnSwitches,
) -> Tensor<3> {
    let (mut q, mut k, mut v) = (q, k, v);
    if s.adain_q {
        q = adain(q, &plan.stats_reference_of);
    }
    if s.adain_k {
        k = adain(k, &plan.stats_reference_of);
    }
    if s.adain_v {
        v = adain(v, &plan.stats_reference_of);
    }
    let out = if s.share {
        let n = k.dims()[1];
        let gain = (!plan.unit_gain).then_some(&plan.gain);
        let k = with_reference(k, &plan.reference_of, gain);
        let v = with_reference(v, &plan.value_reference_of, None);
        let bias = (s.score_shift != 0.0).then(|| {
            let mut b = vec![0f32; 2 * n];
            b[n..].fill(s.score_shift);
            Tensor::<4>::from_data(TensorData::new(b, [1, 1, 1, 2 * n]), &q.device())
        });
        reference_attention(q, k, v, attn.heads, bias)
    } else {
        reference_attention(q, k, v, attn.heads, None)
    };
    attn.to_out.forward(out)
}

/// Official `full_attention_share`: the rows of each key group attend jointly to all tokens of
/// that group (plain attention over the group's concatenated tokens).
pub fn full_share_attention(attn: &Attention, x: Tensor<3>, plan: &DevicePlan) -> Tensor<3> {
    let [b, n, c] = x.dims();
    let device = x.device();
    let groups = plan.plan.key_groups();
    let mut outputs = Vec::with_capacity(groups.len());
    let mut order = Vec::with_capacity(b);
    for rows in &groups {
        let idx = index(rows, &device);
        let g = x.clone().select(0, idx).reshape([1, rows.len() * n, c]);
        // The group's rows joined into one: the adapters of a LoRA context are those rows'.
        let out = crate::model::lora::with_joined_rows(rows, &device, || attn.forward(g, None));
        outputs.push(out.reshape([rows.len(), n, c]));
        order.extend(rows.iter().copied());
    }
    let joined = Tensor::cat(outputs, 0);
    if order.iter().enumerate().all(|(i, &r)| i == r) {
        return joined;
    }
    let mut inverse = vec![0usize; b];
    for (pos, &row) in order.iter().enumerate() {
        inverse[row] = pos;
    }
    joined.select(0, index(&inverse, &device))
}
