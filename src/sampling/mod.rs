//! Schedulers and the classifier-free-guidance loop.

pub mod ddim;
pub mod noise;
pub mod sampler;
pub mod schedule;

use burn::tensor::{Device, Tensor, TensorData};

use crate::model::ModelError;
use crate::model::unet::{AdditionalResiduals, TextTime, UNet, UNetHooks};

pub use ddim::Ddim;
pub use schedule::{Prediction, SchedulerConfig, Spacing};

/// Conditioning of a CFG batch: rows `[uncond × B | cond × B]`.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// (2B, L, D)
    pub encoder_hidden_states: Tensor<3>,
    /// SDXL's pooled embeddings and time ids, (2B, ·).
    pub text_time: Option<TextTime>,
}

/// Runs the UNet on `[x, x]` and combines `ε = ε_u + w (ε_c − ε_u)`.
pub fn guided_output(
    unet: &UNet,
    x: Tensor<4>,
    t: f32,
    cond: &Conditioning,
    guidance: f32,
    hooks: &dyn UNetHooks,
) -> Result<Tensor<4>, ModelError> {
    guided_output_with(unet, x, t, cond, guidance, hooks, None)
}

/// [`guided_output`] with residuals (over both halves, 2B rows: a ControlNet's) added inside the
/// UNet (see [`UNet::forward_with_residuals`]).
pub fn guided_output_with(
    unet: &UNet,
    x: Tensor<4>,
    t: f32,
    cond: &Conditioning,
    guidance: f32,
    hooks: &dyn UNetHooks,
    residuals: Option<&AdditionalResiduals>,
) -> Result<Tensor<4>, ModelError> {
    let b = x.dims()[0];
    let device = x.device();
    let x_in = Tensor::cat(vec![x.clone(), x], 0);
    let ts = Tensor::<1>::from_data(TensorData::new(vec![t; 2 * b], [2 * b]), &device);
    let out = unet.forward_with_residuals(x_in, ts, &cond.encoder_hidden_states, cond.text_time.as_ref(), hooks, residuals)?;
    let mut halves = out.chunk(2, 0);
    let cond_out = halves.pop().expect("two halves");
    let uncond = halves.pop().expect("two halves");
    Ok(uncond.clone() + (cond_out - uncond) * guidance)
}

/// A plain DDIM + CFG loop; `on_step(i, &latents)` is called after every step (return `false`
/// to stop early with an error).
pub fn ddim_loop(
    unet: &UNet,
    scheduler: &Ddim,
    latents: Tensor<4>,
    cond: &Conditioning,
    guidance: f32,
    hooks: &dyn UNetHooks,
    mut on_step: impl FnMut(usize, &Tensor<4>) -> bool,
) -> Result<Tensor<4>, ModelError> {
    let mut x = latents;
    for (i, &t) in scheduler.timesteps.iter().enumerate() {
        let eps = guided_output(unet, x.clone(), t as f32, cond, guidance, hooks)?;
        x = scheduler.step(eps, t, x).prev_sample;
        if !on_step(i, &x) {
            return Err(ModelError::Input { field: "steps".into(), message: format!("stopped after step {}", i + 1) });
        }
    }
    Ok(x)
}

/// Creates a tensor from host values on `device`.
pub fn tensor4(values: Vec<f32>, shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(values, shape), device)
}
