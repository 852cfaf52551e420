//! CLIP text encoders: `CLIPTextModel` (SD1.x / SD2.x, SDXL `text_encoder`) and
//! `CLIPTextModelWithProjection` (SDXL `text_encoder_2`), transformers key names
//! (`text_model.…`, `text_projection.weight`).

use std::path::Path;

use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};

use super::ModelError;
use super::config::RawConfig;
use super::nn::{LayerNorm, Linear, attention, join};
use super::weights::{Weights, weight_file};

/// The MLP activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub eos_token_id: u32,
    /// `Some(dim)` for `CLIPTextModelWithProjection`.
    pub projection_dim: Option<usize>,
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_raw(&RawConfig::read(path)?)
    }

    pub fn from_raw(c: &RawConfig) -> Result<Self, ModelError> {
        let with_projection = match c.strings("architectures") {
            Ok(a) => match a.first().map(String::as_str) {
                Some("CLIPTextModel") => false,
                Some("CLIPTextModelWithProjection") => true,
                other => {
                    return Err(c.err("architectures", format!("{other:?} is not supported (CLIPTextModel, CLIPTextModelWithProjection)")));
                }
            },
            Err(_) => false,
        };
        let hidden_act = match c.str_or("hidden_act", "quick_gelu")?.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(c.err("hidden_act", format!("{other} is not supported (quick_gelu, gelu)"))),
        };
        let hidden_size = c.usize("hidden_size")?;
        let num_attention_heads = c.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(
                c.err("num_attention_heads", format!("hidden_size {hidden_size} is not divisible into {num_attention_heads} heads"))
            );
        }
        Ok(Self {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_hidden_layers: c.usize("num_hidden_layers")?,
            num_attention_heads,
            max_position_embeddings: c.usize("max_position_embeddings")?,
            hidden_act,
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
            eos_token_id: c.usize_or("eos_token_id", 2)? as u32,
            projection_dim: if with_projection { Some(c.usize("projection_dim")?) } else { None },
        })
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// All outputs of one encoder call.
#[derive(Clone, Debug)]
pub struct ClipOutput {
    /// After `final_layer_norm` (B, L, D).
    pub last_hidden_state: Tensor<3>,
    /// `hidden_states[-2]`: the output of the second-to-last layer, before the final norm.
    pub penultimate_hidden_state: Tensor<3>,
    /// `last_hidden_state` at the EOS position (B, D).
    pub pooler_output: Tensor<2>,
    /// `text_projection(pooler_output)` for the projection model.
    pub text_embeds: Option<Tensor<2>>,
}

/// A CLIP text encoder. Cloning shares the weights.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub config: ClipConfig,
    token_embedding: Tensor<2>,
    position_embedding: Tensor<2>,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    /// The layers a LoRA can adapt (the encoder layers' projections and MLPs).
    lora_layers: std::sync::Arc<super::lora::LayerIndex>,
}

impl ClipTextModel {
    /// Loads `dir/config.json` and `dir/model[.fp16].safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::open(&weight_file(dir, "model")?, device)?;
        Self::from_weights(config, &w)
    }

    pub fn from_weights(config: ClipConfig, w: &Weights) -> Result<Self, ModelError> {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let p = "text_model";
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let l = format!("{p}.encoder.layers.{i}");
            layers.push(EncoderLayer {
                ln1: LayerNorm::load(w, &join(&l, "layer_norm1"), d, eps)?,
                q: Linear::load(w, &join(&l, "self_attn.q_proj"), d, d, true)?,
                k: Linear::load(w, &join(&l, "self_attn.k_proj"), d, d, true)?,
                v: Linear::load(w, &join(&l, "self_attn.v_proj"), d, d, true)?,
                out: Linear::load(w, &join(&l, "self_attn.out_proj"), d, d, true)?,
                ln2: LayerNorm::load(w, &join(&l, "layer_norm2"), d, eps)?,
                fc1: Linear::load(w, &join(&l, "mlp.fc1"), d, config.intermediate_size, true)?,
                fc2: Linear::load(w, &join(&l, "mlp.fc2"), config.intermediate_size, d, true)?,
            });
        }
        let token_embedding = w.tensor(&format!("{p}.embeddings.token_embedding.weight"), [config.vocab_size, d])?;
        let position_embedding = w.tensor(&format!("{p}.embeddings.position_embedding.weight"), [config.max_position_embeddings, d])?;
        // Some exports store the (unused, constant) position ids buffer.
        let pos_ids_key = format!("{p}.embeddings.position_ids");
        if let Some(shape) = w.shape_of(&pos_ids_key).map(<[usize]>::to_vec) {
            w.read_f32(&pos_ids_key, &shape).ok();
        }
        let final_layer_norm = LayerNorm::load(w, &format!("{p}.final_layer_norm"), d, eps)?;
        let lora_layers = std::sync::Arc::new(w.layer_index());
        let text_projection = match config.projection_dim {
            Some(pd) => Some(Linear::load(w, "text_projection", d, pd, false)?),
            None => None,
        };
        w.finish()?;
        Ok(Self { config, token_embedding, position_embedding, layers, final_layer_norm, text_projection, lora_layers })
    }

    /// The layers a LoRA can adapt, by transformers module name.
    pub fn lora_layers(&self) -> &super::lora::LayerIndex {
        &self.lora_layers
    }

    /// Encodes token ids (B rows of equal length ≤ max_position_embeddings).
    pub fn forward(&self, input_ids: &[Vec<u32>]) -> Result<ClipOutput, ModelError> {
        let cfg = &self.config;
        let device = self.token_embedding.device();
        let b = input_ids.len();
        let input = |message: String| ModelError::Input { field: "input_ids".into(), message };
        if b == 0 {
            return Err(input("no rows".into()));
        }
        let l = input_ids[0].len();
        if l == 0 || l > cfg.max_position_embeddings || input_ids.iter().any(|r| r.len() != l) {
            return Err(input(format!("rows must have one length between 1 and {}", cfg.max_position_embeddings)));
        }
        if let Some(bad) = input_ids.iter().flatten().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(input(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size)));
        }
        let flat: Vec<i64> = input_ids.iter().flatten().map(|&x| x as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, l]), &device);
        let d = cfg.hidden_size;
        let tok = burn::tensor::module::embedding(self.token_embedding.clone(), ids);
        let pos = self.position_embedding.clone().narrow(0, 0, l).reshape([1, l, d]);
        let mut x = tok + pos;

        // Causal mask: position i attends to j ≤ i.
        let mut mask = vec![0f32; l * l];
        for i in 0..l {
            for j in (i + 1)..l {
                mask[i * l + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [1, 1, l, l]), &device);

        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            let h = layer.ln1.forward(x.clone());
            let a = attention(
                layer.q.forward(h.clone()),
                layer.k.forward(h.clone()),
                layer.v.forward(h),
                cfg.num_attention_heads,
                Some(mask.clone()),
            );
            x = x + layer.out.forward(a);
            let h = layer.fc1.forward(layer.ln2.forward(x.clone()));
            let h = match cfg.hidden_act {
                Activation::QuickGelu => h.clone() * sigmoid(h * 1.702),
                Activation::Gelu => gelu(h),
            };
            x = x + layer.fc2.forward(h);
        }
        let last = self.final_layer_norm.forward(x);

        // Pooled output at the EOS position: transformers takes argmax(ids) for the legacy
        // eos_token_id 2, else the first position holding eos_token_id (the last if none).
        let eos_pos: Vec<i64> = input_ids
            .iter()
            .map(|row| {
                let pos = if cfg.eos_token_id == 2 {
                    row.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i).unwrap_or(0)
                } else {
                    row.iter().position(|&t| t == cfg.eos_token_id).unwrap_or(l - 1)
                };
                pos as i64
            })
            .collect();
        let rows: Vec<Tensor<2>> =
            eos_pos.iter().enumerate().map(|(r, &p)| last.clone().narrow(0, r, 1).narrow(1, p as usize, 1).reshape([1, d])).collect();
        let pooled = Tensor::cat(rows, 0);
        let text_embeds = self.text_projection.as_ref().map(|p| p.forward(pooled.clone()).cast(FloatDType::F32));
        // The text conditioning is f32 outside the model (the UNet's projections cast it).
        let f32 = |t: Tensor<3>| t.cast(FloatDType::F32);
        Ok(ClipOutput {
            last_hidden_state: f32(last),
            penultimate_hidden_state: f32(penultimate),
            pooler_output: pooled.cast(FloatDType::F32),
            text_embeds,
        })
    }
}
