//! AdaIN over the token axis of (B, N, C): per-(row, channel) statistics in f32, turned into an
//! affine map `x · scale + shift` that gives row i the mean and standard deviation of row
//! `stats_reference_of[i]` (semantics of `style_aligned::ops::adain`: unbiased variance plus
//! epsilon). The attention kernel applies the map as it loads q / k / v; [`adain`] applies it alone.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, ir::ElemType};

use super::group_norm::u32_table;

/// One unit per (row, channel): mean and `sqrt(unbiased var + eps)` over the N tokens.
#[cube(launch)]
fn adain_stats_kernel<F: Float>(
    input: &Tensor<F>,
    stats: &mut Tensor<f32>,
    tokens: u32,
    channels: u32,
    eps: f32,
    #[define(F)] _dtype: ElemType,
) {
    let idx = ABSOLUTE_POS;
    let c_all = channels as usize;
    if idx >= stats.len() / 2 {
        terminate!();
    }
    let n = tokens as usize;
    let b = idx / c_all;
    let c = idx % c_all;
    let base = b * n * c_all + c;
    let shift = f32::cast_from(input[base]);
    let mut sum = f32::new(0.0);
    let mut sum_sq = f32::new(0.0);
    for t in 0..n {
        let v = f32::cast_from(input[base + t * c_all]) - shift;
        sum += v;
        sum_sq += v * v;
    }
    let count = f32::cast_from(tokens);
    let mean_shifted = sum / count;
    let centered_sq = max(sum_sq - count * mean_shifted * mean_shifted, f32::new(0.0));
    let denom = f32::cast_from(max(tokens, 2u32) - 1);
    stats[2 * idx] = mean_shifted + shift;
    stats[2 * idx + 1] = (centered_sq / denom + eps).sqrt();
}

/// One unit per (row, channel): `scale = sd_ref / sd`, `shift = mean_ref − mean · scale`.
#[cube(launch)]
fn adain_affine_kernel(stats: &Tensor<f32>, reference: &Tensor<u32>, affine: &mut Tensor<f32>, channels: u32, slot: u32) {
    let idx = ABSOLUTE_POS;
    if idx >= stats.len() / 2 {
        terminate!();
    }
    let c_all = channels as usize;
    let b = idx / c_all;
    let c = idx % c_all;
    let r = reference[b] as usize;
    let other = r * c_all + c;
    let scale = stats[2 * other + 1] / stats[2 * idx + 1];
    let at = slot as usize * (stats.len() / 2) + idx;
    affine[2 * at] = scale;
    affine[2 * at + 1] = stats[2 * other] - stats[2 * idx] * scale;
}

/// Elementwise `x · scale + shift` with the affine map of the element's (row, channel).
#[cube(launch)]
fn adain_apply_kernel<F: Float>(
    input: &Tensor<F>,
    affine: &Tensor<f32>,
    output: &mut Tensor<F>,
    tokens: u32,
    channels: u32,
    #[define(F)] _dtype: ElemType,
) {
    let idx = ABSOLUTE_POS;
    if idx >= output.len() {
        terminate!();
    }
    let c_all = channels as usize;
    let c = idx % c_all;
    let b = idx / (c_all * tokens as usize);
    let a = b * c_all + c;
    output[idx] = F::cast_from(f32::cast_from(input[idx]) * affine[2 * a] + affine[2 * a + 1]);
}

/// Writes the AdaIN affine map of `x` (B, N, C), `[scale, shift]` per (row, channel) in f32, into
/// slot `slot` (of B·C pairs) of `affine`.
pub(crate) fn adain_affine_into(x: &CubeTensor, stats_reference_of: &[u32], eps: f32, affine: &CubeTensor, slot: usize) {
    let dims: Vec<usize> = x.meta.shape().iter().copied().collect();
    let (b, n, c) = (dims[0], dims[1], dims[2]);
    let client = x.client.clone();
    let stats = empty_device_dtype(client.clone(), x.device.clone(), Shape::new([b * c * 2]), DType::F32);
    let units = b * c;
    if units == 0 || n == 0 {
        return;
    }
    let cube_dim = CubeDim::new(&client, units);
    let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
    adain_stats_kernel::launch(
        &client,
        cube_count.clone(),
        cube_dim,
        x.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        n as u32,
        c as u32,
        eps,
        dtype_to_storage_type(x.dtype),
    );
    let reference = u32_table(x, stats_reference_of);
    adain_affine_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        stats.into_tensor_arg(),
        reference.into_tensor_arg(),
        affine.clone().into_tensor_arg(),
        c as u32,
        slot as u32,
    );
}

/// AdaIN of `x` (B, N, C) towards the rows `stats_reference_of`.
pub(crate) fn adain(x: CubeTensor, stats_reference_of: &[u32], eps: f32) -> CubeTensor {
    let x = into_contiguous(x);
    let dims: Vec<usize> = x.meta.shape().iter().copied().collect();
    let client = x.client.clone();
    let affine = empty_device_dtype(client.clone(), x.device.clone(), Shape::new([dims[0] * dims[2] * 2]), DType::F32);
    adain_affine_into(&x, stats_reference_of, eps, &affine, 0);
    let output = empty_device_dtype(client.clone(), x.device.clone(), x.meta.shape().clone(), x.dtype);
    let total: usize = dims.iter().product();
    if total == 0 {
        return output;
    }
    let cube_dim = CubeDim::new(&client, total);
    let cube_count = calculate_cube_count_elemwise(&client, total, cube_dim);
    let dtype = x.dtype;
    adain_apply_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        x.into_tensor_arg(),
        affine.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        dims[1] as u32,
        dims[2] as u32,
        dtype_to_storage_type(dtype),
    );
    output
}
