//! stylealign: style-aligned Stable Diffusion image generation (StyleAligned, Hertz et al.,
//! CVPR 2024) on burn, served over gRPC.
//!
//! - [`model`]: UNet, CLIP text encoders, VAE, tokenizer, configs and weight loading.
//! - [`style_aligned`]: the patch (options, reference plan, AdaIN, shared attention, shared GroupNorm).
//! - [`sampling`]: schedulers and the CFG loop.
//! - [`device`]: choosing the compute device.
//! - [`kernels`]: our fused CubeCL kernels (GroupNorm, StyleAligned attention) for GPU devices.
//! - [`serve`]: the gRPC service; [`client`]: the client behind `stylealign generate` / `demo` / `loadtest`.
//! - [`bench`]: `stylealign bench`, the UNet step and its operations timed on a device.
//! - [`telemetry`]: OpenTelemetry traces (OTLP), off unless configured.

pub mod bench;
pub mod client;
pub mod device;
pub mod device_memory;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod sampling;
pub mod serve;
pub mod style_aligned;
pub mod telemetry;
