//! GroupNorm in two launches: per-(row, group) statistics in f32 (one read of the input), then one
//! elementwise pass that normalises, applies the affine parameters and, optionally, SiLU.
//!
//! The StyleAligned variant pools each row's group statistics with those of its reference row
//! (`stats_reference_of`) inside the second pass: the pooled mean is the mean of the two means, the
//! pooled variance the biased variance of the two equal-sized groups together — exactly
//! `style_aligned::ops::shared_group_norm`, with nothing concatenated.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, ir::ElemType};

/// Units per statistics cube (a power of two: the tree reduction halves it).
const STATS_UNITS: usize = 256;

/// One cube per (row, group): the `group_len` contiguous elements of that group are summed by the
/// cube's units (shifted by the group's first element, so that a large mean does not cancel the
/// variance), then reduced in shared memory. Writes `[mean, biased variance]` (f32).
#[cube(launch)]
fn group_stats_kernel<F: Float>(
    input: &Tensor<F>,
    stats: &mut Tensor<f32>,
    group_len: u32,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let group = CUBE_POS;
    let len = group_len as usize;
    let base = group * len;
    let unit = UNIT_POS as usize;
    let shift = f32::cast_from(input[base]);
    let mut sum = f32::new(0.0);
    let mut sum_sq = f32::new(0.0);
    let mut i = unit;
    while i < len {
        let v = f32::cast_from(input[base + i]) - shift;
        sum += v;
        sum_sq += v * v;
        i += units;
    }
    let mut shared_sum = Shared::<[f32]>::new_slice(units);
    let mut shared_sq = Shared::<[f32]>::new_slice(units);
    shared_sum[unit] = sum;
    shared_sq[unit] = sum_sq;
    sync_cube();
    let mut stride = (CUBE_DIM as usize) / 2;
    while stride > 0 {
        if unit < stride {
            shared_sum[unit] += shared_sum[unit + stride];
            shared_sq[unit] += shared_sq[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    if unit == 0 {
        let n = f32::cast_from(group_len);
        let mean_shifted = shared_sum[0] / n;
        let var = shared_sq[0] / n - mean_shifted * mean_shifted;
        stats[2 * group] = mean_shifted + shift;
        stats[2 * group + 1] = max(var, f32::new(0.0));
    }
}

/// One unit per element of (B, C, H·W): normalise with the row's (or the pooled) statistics,
/// scale and shift per channel, SiLU when asked.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn group_norm_apply_kernel<F: Float, W: Float>(
    input: &Tensor<F>,
    stats: &Tensor<f32>,
    reference: &Tensor<u32>,
    weight: &Tensor<W>,
    bias: &Tensor<W>,
    output: &mut Tensor<F>,
    channels: u32,
    spatial: u32,
    groups: u32,
    eps: f32,
    #[comptime] shared: bool,
    #[comptime] silu: bool,
    #[define(F, W)] _dtypes: [ElemType; 2],
) {
    let idx = ABSOLUTE_POS;
    if idx >= output.len() {
        terminate!();
    }
    let c_all = channels as usize;
    let hw = spatial as usize;
    let g_all = groups as usize;
    let c = (idx / hw) % c_all;
    let b = idx / (hw * c_all);
    let g = c / (c_all / g_all);
    let own = b * g_all + g;
    let mut mean = stats[2 * own];
    let mut var = stats[2 * own + 1];
    if comptime!(shared) {
        let r = reference[b] as usize;
        let other = r * g_all + g;
        let ref_mean = stats[2 * other];
        let ref_var = stats[2 * other + 1];
        let joint = (mean + ref_mean) * f32::new(0.5);
        let dm = mean - joint;
        let dr = ref_mean - joint;
        var = ((var + dm * dm) + (ref_var + dr * dr)) * f32::new(0.5);
        mean = joint;
    }
    let x = f32::cast_from(input[idx]);
    let mut y = (x - mean) / (var + eps).sqrt() * f32::cast_from(weight[c]) + f32::cast_from(bias[c]);
    if comptime!(silu) {
        y = y / (f32::new(1.0) + (-y).exp());
    }
    output[idx] = F::cast_from(y);
}

/// A small u32 table on the device of `like`.
pub(crate) fn u32_table(like: &CubeTensor, values: &[u32]) -> CubeTensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let handle = like.client.create_from_slice(&bytes);
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), Shape::new([values.len()]), handle, DType::U32)
}

/// A small f32 table on the device of `like`.
pub(crate) fn f32_table(like: &CubeTensor, values: &[f32]) -> CubeTensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let handle = like.client.create_from_slice(&bytes);
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), Shape::new([values.len()]), handle, DType::F32)
}

/// GroupNorm of `x` (B, C, H, W) with `groups` groups; `stats_reference_of` (one entry per row)
/// selects the StyleAligned pooled variant.
pub(crate) fn group_norm(
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    groups: usize,
    eps: f32,
    silu: bool,
    stats_reference_of: Option<&[u32]>,
) -> CubeTensor {
    let x = into_contiguous(x);
    let weight = into_contiguous(weight);
    let bias = into_contiguous(bias);
    let shape = x.meta.shape().clone();
    let dims: Vec<usize> = shape.iter().copied().collect();
    let (b, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    let group_len = (c / groups) * spatial;
    let client = x.client.clone();
    let stats = empty_device_dtype(client.clone(), x.device.clone(), Shape::new([b * groups * 2]), DType::F32);
    let output = empty_device_dtype(client.clone(), x.device.clone(), shape, x.dtype);
    if b * c * spatial == 0 {
        return output;
    }
    let units = STATS_UNITS.min(client.properties().hardware.max_units_per_cube as usize).max(1);
    let units = if units.is_power_of_two() { units } else { units.next_power_of_two() / 2 };
    let dtype = x.dtype;
    group_stats_kernel::launch(
        &client,
        CubeCount::Static((b * groups) as u32, 1, 1),
        CubeDim::new_1d(units as u32),
        x.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        group_len as u32,
        units,
        dtype_to_storage_type(dtype),
    );
    let (shared, reference) = match stats_reference_of {
        Some(r) => (true, u32_table(&x, r)),
        None => (false, u32_table(&x, &[0])),
    };
    let n = b * c * spatial;
    let cube_dim = CubeDim::new(&client, n);
    let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
    let w_dtype = weight.dtype;
    group_norm_apply_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        x.into_tensor_arg(),
        stats.into_tensor_arg(),
        reference.into_tensor_arg(),
        weight.into_tensor_arg(),
        bias.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        c as u32,
        spatial as u32,
        groups as u32,
        eps,
        shared,
        silu,
        [dtype_to_storage_type(dtype), dtype_to_storage_type(w_dtype)],
    );
    output
}
