//! LoRAs applied unmerged, as low-rank side products: a layer computes `x·W + Σ s·(x·A)·B`,
//! the base weights are never copied or changed.
//!
//! A [`Lora`] is read from a safetensors file in the kohya / A1111 format (`lora_unet_*`,
//! `lora_te_*`, SDXL `lora_te1_*` / `lora_te2_*`, `.lora_down.weight` / `.lora_up.weight` /
//! `.alpha`, LoCon convolutions, SDXL UNet layers under their SGM names `input_blocks_*`,
//! `middle_block_*`, `output_blocks_*`) or the diffusers / PEFT format (`unet.<module>.lora_A.weight`
//! / `lora_B.weight`, `text_encoder.…`, `text_encoder_2.…`). Its keys are resolved against the
//! layers of one model ([`Targets`]): a key that names no layer of the model, or whose shapes do not
//! fit the layer, makes the LoRA incompatible with that model (an error naming the key).
//!
//! Scale per layer: kohya `alpha / rank` (no alpha: 1, as diffusers); PEFT `lora_alpha / r` from
//! the adapter config diffusers saves in the file's metadata (`lora_adapter_metadata`), else 1.
//!
//! Which LoRAs a forward pass uses is a scoped, per-thread context ([`scoped`]), like the stop
//! check of [`super::stop`]: the caller installs, for one component (UNet, text encoder), groups of
//! batch rows with their adapters and weights; [`super::nn::Linear`] and [`super::nn::Conv2d`] add
//! each group's side products to that group's rows only (rows of no group pay nothing), so rows of
//! different LoRA sets share one batch and each row's result is the same as when its group runs
//! alone. Without a context the layers do nothing extra. The caller installs a context only around
//! the component it is meant for (never around a ControlNet, which has the UNet's layer names, nor
//! the VAE).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::ModelError;
use super::weights::Weights;

/// The components a LoRA adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// The kind and shape of a layer a LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerShape {
    Linear { d_in: usize, d_out: usize },
    Conv { c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize },
}

/// The adaptable layers of one component, by diffusers / transformers module name.
#[derive(Clone, Debug, Default)]
pub struct LayerIndex {
    pub layers: BTreeMap<String, LayerShape>,
}

/// What a LoRA file is resolved against: the layers of a model's components, and (for SDXL
/// kohya files with SGM names) the UNet's `layers_per_block`.
pub struct Targets<'a> {
    pub unet: &'a LayerIndex,
    pub text_encoder: &'a LayerIndex,
    pub text_encoder_2: Option<&'a LayerIndex>,
    pub layers_per_block: &'a [usize],
}

impl Targets<'_> {
    /// A hash of every layer's component, name and shape (and `layers_per_block`).
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (k, index) in [Some(self.unet), Some(self.text_encoder), self.text_encoder_2].into_iter().enumerate() {
            k.hash(&mut h);
            for (name, shape) in index.map(|i| &i.layers).into_iter().flatten() {
                name.hash(&mut h);
                format!("{shape:?}").hash(&mut h);
            }
        }
        self.layers_per_block.hash(&mut h);
        h.finish()
    }
}

/// The file format of a LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
}

impl LoraFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "peft",
        }
    }
}

#[derive(Clone, Debug)]
enum Delta {
    /// `a` [in, r], `b` [r, out].
    Linear { a: Tensor<2>, b: Tensor<2> },
    /// `down` [r, c_in, k, k] with the layer's stride and padding, `up` [c_out, r, 1, 1].
    Conv { down: Tensor<4>, up: Tensor<4>, stride: usize, padding: usize },
}

/// One adapted layer: its low-rank pair and its scale (alpha / rank).
#[derive(Clone, Debug)]
pub struct LoraLayer {
    delta: Delta,
    pub scale: f32,
    pub rank: usize,
}

impl LoraLayer {
    /// The pair's dtype (a LoRA is read in f32, or in the dtype of the scope it is loaded in).
    fn dtype(&self) -> burn::tensor::DType {
        match &self.delta {
            Delta::Linear { a, .. } => a.dtype(),
            Delta::Conv { down, .. } => down.dtype(),
        }
    }

    /// The side product for `x`, computed in the pair's dtype and returned in `x`'s.
    fn linear<const D: usize>(&self, x: Tensor<D>) -> Option<Tensor<D>> {
        let dtype = x.dtype();
        let x = x.cast(self.dtype());
        match &self.delta {
            Delta::Linear { a, b } => {
                let h = burn::tensor::module::linear(x, a.clone(), None);
                Some(burn::tensor::module::linear(h, b.clone(), None).cast(dtype))
            }
            Delta::Conv { .. } => None,
        }
    }

    /// Like [`LoraLayer::linear`], for a convolution.
    fn conv(&self, x: Tensor<4>) -> Option<Tensor<4>> {
        let dtype = x.dtype();
        self.conv_in_own_dtype(x.cast(self.dtype())).map(|d| d.cast(dtype))
    }

    fn conv_in_own_dtype(&self, x: Tensor<4>) -> Option<Tensor<4>> {
        match &self.delta {
            Delta::Conv { down, up, stride, padding } => {
                let h = conv2d(x, down.clone(), None, ConvOptions::new([*stride, *stride], [*padding, *padding], [1, 1], 1));
                Some(conv2d(h, up.clone(), None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1)))
            }
            Delta::Linear { a, b } => {
                // A 1×1 convolution adapted by a linear pair: apply it per pixel.
                let [n, c, h, w] = x.dims();
                let t = x.swap_dims(1, 3).reshape([n * w * h, c]);
                let d = burn::tensor::module::linear(burn::tensor::module::linear(t, a.clone(), None), b.clone(), None);
                let out = d.dims()[1];
                Some(d.reshape([n, w, h, out]).swap_dims(1, 3))
            }
        }
    }
}

/// What [`Lora::inspect`] tells of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraSummary {
    pub format: LoraFormat,
    pub rank: usize,
    /// Bytes its matrices take in memory (f32).
    pub bytes: u64,
    /// Layers it adapts.
    pub layers: usize,
}

/// A LoRA resolved against one model's layers. Equality is identity (the same loaded LoRA).
#[derive(Debug)]
pub struct Lora {
    pub name: String,
    pub path: PathBuf,
    pub format: LoraFormat,
    /// The largest rank of its layers.
    pub rank: usize,
    /// Bytes its tensors take in memory (f32).
    pub bytes: u64,
    /// Adapted layers by component, then module name (looked up by `&str` on every adapted call).
    layers: HashMap<Component, HashMap<String, LoraLayer>>,
    /// [`Targets::fingerprint`] of the model it was resolved against.
    targets: u64,
}

impl PartialEq for Lora {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

fn lora_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Lora { file: path.to_path_buf(), message: message.into() }
}

/// kohya's key form of a module name: `.` → `_`.
fn kohya(name: &str) -> String {
    name.replace('.', "_")
}

/// The SGM / LDM name of a diffusers UNet module (kohya's SDXL form), for resnets, attentions
/// and the samplers; `None` for the rest (those keep their diffusers form).
pub fn sgm_name(name: &str, layers_per_block: &[usize]) -> Option<String> {
    let p: Vec<&str> = name.split('.').collect();
    let num = |i: usize| p.get(i).and_then(|s| s.parse::<usize>().ok());
    let resnet = |tail: &[&str]| -> Option<String> {
        let head = match *tail.first()? {
            "conv1" => "in_layers.2",
            "conv2" => "out_layers.3",
            "time_emb_proj" => "emb_layers.1",
            "conv_shortcut" => "skip_connection",
            _ => return None,
        };
        Some(std::iter::once(head).chain(tail[1..].iter().copied()).collect::<Vec<_>>().join("."))
    };
    let join = |head: String, tail: String| if tail.is_empty() { head } else { format!("{head}.{tail}") };
    match p.as_slice() {
        ["down_blocks", _, kind, _, rest @ ..] => {
            let (b, j) = (num(1)?, num(3)?);
            let first = 1 + layers_per_block.iter().take(b).map(|l| l + 1).sum::<usize>();
            match *kind {
                "resnets" => Some(join(format!("input_blocks.{}.0", first + j), resnet(rest)?)),
                "attentions" => Some(join(format!("input_blocks.{}.1", first + j), rest.join("."))),
                "downsamplers" if rest.first() == Some(&"conv") => {
                    Some(join(format!("input_blocks.{}.0.op", first + layers_per_block.get(b)?), rest[1..].join(".")))
                }
                _ => None,
            }
        }
        ["mid_block", kind, _, rest @ ..] => {
            let j = num(2)?;
            match (*kind, j) {
                ("resnets", 0) => Some(join("middle_block.0".into(), resnet(rest)?)),
                ("attentions", 0) => Some(join("middle_block.1".into(), rest.join("."))),
                ("resnets", 1) => Some(join("middle_block.2".into(), resnet(rest)?)),
                _ => None,
            }
        }
        ["up_blocks", _, kind, _, rest @ ..] => {
            let (b, j) = (num(1)?, num(3)?);
            let rev: Vec<usize> = layers_per_block.iter().rev().map(|l| l + 1).collect();
            let first = rev.iter().take(b).sum::<usize>();
            match *kind {
                "resnets" => Some(join(format!("output_blocks.{}.0", first + j), resnet(rest)?)),
                "attentions" => Some(join(format!("output_blocks.{}.1", first + j), rest.join("."))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A kohya key prefix → (component, layer name) lookup over a model's layers.
fn kohya_lookup(t: &Targets) -> HashMap<String, (Component, String)> {
    let mut m = HashMap::new();
    for name in t.unet.layers.keys() {
        m.insert(format!("lora_unet_{}", kohya(name)), (Component::Unet, name.clone()));
        if let Some(s) = sgm_name(name, t.layers_per_block) {
            m.insert(format!("lora_unet_{}", kohya(&s)), (Component::Unet, name.clone()));
        }
    }
    for name in t.text_encoder.layers.keys() {
        for form in text_forms(name) {
            for p in ["lora_te", "lora_te1"] {
                m.insert(format!("{p}_{}", kohya(form)), (Component::TextEncoder, name.clone()));
            }
        }
    }
    if let Some(te2) = t.text_encoder_2 {
        for name in te2.layers.keys() {
            for form in text_forms(name) {
                m.insert(format!("lora_te2_{}", kohya(form)), (Component::TextEncoder2, name.clone()));
            }
        }
    }
    m
}

/// A text encoder layer's names in LoRA files: `text_model.encoder.…`, and the flattened
/// `encoder.…` of recent transformers.
fn text_forms(name: &str) -> Vec<&str> {
    std::iter::once(name).chain(name.strip_prefix("text_model.")).collect()
}

/// The pieces of one adapted layer as stored: down / up keys, an optional alpha.
#[derive(Default)]
struct Pair {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

impl Lora {
    /// Reads `path` and resolves it against `targets`. `name` is how it is served.
    pub fn load(name: &str, path: &Path, targets: &Targets, device: &Device) -> Result<Self, ModelError> {
        Ok(Self::load_impl(name, path, targets, device, true)?.0)
    }

    fn load_impl(name: &str, path: &Path, targets: &Targets, device: &Device, read: bool) -> Result<(Self, usize), ModelError> {
        let w = Weights::open(path, device)?;
        let keys: Vec<String> = w.keys().map(str::to_string).collect();
        if keys.is_empty() {
            return Err(lora_err(path, "the file holds no tensors"));
        }
        let peft = keys.iter().any(|k| k.contains(".lora_A.") || k.contains(".lora_B."));
        let kohya_keys = keys.iter().any(|k| k.contains(".lora_down.") || k.contains(".lora_up."));
        let format = match (peft, kohya_keys) {
            (true, false) => LoraFormat::Peft,
            (false, true) => LoraFormat::Kohya,
            (true, true) => return Err(lora_err(path, "mixes PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) keys")),
            (false, false) => {
                return Err(lora_err(
                    path,
                    format!("not a LoRA: no `.lora_down`/`.lora_up` (kohya) or `.lora_A`/`.lora_B` (PEFT) keys (first key `{}`)", keys[0]),
                ));
            }
        };
        // Group the keys by layer.
        let mut pairs: BTreeMap<(Component, String), Pair> = BTreeMap::new();
        let mut unknown: Vec<String> = Vec::new();
        match format {
            LoraFormat::Kohya => {
                let lookup = kohya_lookup(targets);
                for k in &keys {
                    let (base, part) = match k.split_once('.') {
                        Some(x) => x,
                        None => {
                            unknown.push(k.clone());
                            continue;
                        }
                    };
                    let Some(target) = lookup.get(base) else {
                        unknown.push(k.clone());
                        continue;
                    };
                    let pair = pairs.entry(target.clone()).or_default();
                    match part {
                        "lora_down.weight" => pair.down = Some(k.clone()),
                        "lora_up.weight" => pair.up = Some(k.clone()),
                        "alpha" => pair.alpha = Some(k.clone()),
                        _ => {
                            return Err(lora_err(
                                path,
                                format!("key `{k}`: `{part}` is not supported (LoRA/LoCon only: lora_down, lora_up, alpha)"),
                            ));
                        }
                    }
                }
            }
            LoraFormat::Peft => {
                for k in &keys {
                    let parsed = [
                        ("unet.", Component::Unet, Some(targets.unet)),
                        ("text_encoder.", Component::TextEncoder, Some(targets.text_encoder)),
                        ("text_encoder_2.", Component::TextEncoder2, targets.text_encoder_2),
                    ]
                    .into_iter()
                    .find_map(|(prefix, comp, index)| {
                        let rest = k.strip_prefix(prefix)?;
                        let (module, part) = rest
                            .strip_suffix(".lora_A.weight")
                            .map(|m| (m, 'A'))
                            .or(rest.strip_suffix(".lora_B.weight").map(|m| (m, 'B')))?;
                        let index = index?;
                        let module = if comp != Component::Unet && !index.layers.contains_key(module) {
                            format!("text_model.{module}")
                        } else {
                            module.to_string()
                        };
                        index.layers.contains_key(&module).then_some((comp, module, part))
                    });
                    match parsed {
                        Some((comp, module, part)) => {
                            let pair = pairs.entry((comp, module)).or_default();
                            if part == 'A' { pair.down = Some(k.clone()) } else { pair.up = Some(k.clone()) }
                        }
                        None => unknown.push(k.clone()),
                    }
                }
            }
        }
        if !unknown.is_empty() {
            let shown: Vec<&str> = unknown.iter().take(5).map(String::as_str).collect();
            return Err(lora_err(
                path,
                format!(
                    "incompatible with this model: {} key(s) match none of its layers: {}{}",
                    unknown.len(),
                    shown.join(", "),
                    if unknown.len() > 5 { ", …" } else { "" }
                ),
            ));
        }
        let peft_alpha = peft_alphas(path)?;
        let mut layers = HashMap::new();
        let mut rank = 0;
        let mut bytes = 0u64;
        let mut count = 0;
        for ((comp, module), pair) in pairs {
            let index = match comp {
                Component::Unet => targets.unet,
                Component::TextEncoder => targets.text_encoder,
                Component::TextEncoder2 => targets.text_encoder_2.expect("matched above"),
            };
            let shape = index.layers[&module];
            let (Some(down), Some(up)) = (&pair.down, &pair.up) else {
                return Err(lora_err(
                    path,
                    format!("layer `{}.{module}` has no {} matrix", comp.as_str(), if pair.down.is_none() { "down (A)" } else { "up (B)" }),
                ));
            };
            let (layer_rank, layer_bytes, delta) = read_layer(&w, path, down, up, shape, read)?;
            let alpha = match (&pair.alpha, format) {
                (Some(k), _) => Some(read_scalar(&w, path, k)?),
                (None, LoraFormat::Peft) => peft_alpha.get(&comp).copied(),
                (None, LoraFormat::Kohya) => None,
            };
            let scale = alpha.map_or(1.0, |a| a / layer_rank as f32);
            if !scale.is_finite() {
                return Err(lora_err(path, format!("layer `{}.{module}`: alpha gives a non-finite scale", comp.as_str())));
            }
            rank = rank.max(layer_rank);
            bytes += layer_bytes;
            count += 1;
            if let Some(delta) = delta {
                layers.entry(comp).or_insert_with(HashMap::new).insert(module, LoraLayer { delta, scale, rank: layer_rank });
            }
        }
        let fingerprint = targets.fingerprint();
        Ok((Self { name: name.to_string(), path: path.to_path_buf(), format, rank, bytes, layers, targets: fingerprint }, count))
    }

    /// Checks `path` against `targets` from its header (and alphas) without reading the
    /// matrices: what [`Lora::load`] would give, or its error.
    pub fn inspect(path: &Path, targets: &Targets, device: &Device) -> Result<LoraSummary, ModelError> {
        let (l, layers) = Self::load_impl("", path, targets, device, false)?;
        Ok(LoraSummary { format: l.format, rank: l.rank, bytes: l.bytes, layers })
    }

    /// Whether it was resolved against a model with these layers (a LoRA used with another model
    /// would name layers it does not have, or misfit their shapes).
    pub fn resolved_for(&self, targets: &Targets) -> bool {
        self.targets == targets.fingerprint()
    }

    /// The adapted layer `name` of `component`, if any.
    pub fn layer(&self, component: Component, name: &str) -> Option<&LoraLayer> {
        self.layers.get(&component)?.get(name)
    }

    /// How many layers it adapts.
    pub fn layer_count(&self) -> usize {
        self.layers.values().map(HashMap::len).sum()
    }

    /// Whether it adapts any layer of `component`.
    pub fn adapts(&self, component: Component) -> bool {
        self.layers.get(&component).is_some_and(|m| !m.is_empty())
    }
}

/// PEFT scales from diffusers' `lora_adapter_metadata` (JSON in the safetensors metadata, with
/// `<component>.lora_alpha` / `<component>.r` or a nested config per component).
fn peft_alphas(path: &Path) -> Result<HashMap<Component, f32>, ModelError> {
    use std::io::Read;
    let io = |e: std::io::Error| lora_err(path, e.to_string());
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let mut header = vec![0u8; u64::from_le_bytes(len).min(100_000_000) as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| lora_err(path, format!("invalid header: {e}")))?;
    let Some(raw) = header.get("__metadata__").and_then(|m| m.get("lora_adapter_metadata")).and_then(|m| m.as_str()) else {
        return Ok(HashMap::new());
    };
    let v: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| lora_err(path, format!("metadata `lora_adapter_metadata` is not JSON: {e}")))?;
    let mut out = HashMap::new();
    for comp in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let c = comp.as_str();
        let alpha = v.get(format!("{c}.lora_alpha")).or_else(|| v.get(c).and_then(|x| x.get("lora_alpha"))).and_then(|a| a.as_f64());
        let r = v.get(format!("{c}.r")).or_else(|| v.get(c).and_then(|x| x.get("r"))).and_then(|a| a.as_f64());
        if let (Some(a), Some(r)) = (alpha, r)
            && r > 0.0
        {
            // Stored as alpha; the scale divides by the layer's rank (= r).
            out.insert(comp, a as f32);
        }
    }
    Ok(out)
}

fn read_scalar(w: &Weights, path: &Path, key: &str) -> Result<f32, ModelError> {
    let shape = w.shape_of(key).map(<[usize]>::to_vec).unwrap_or_default();
    if shape.iter().product::<usize>() != 1 {
        return Err(lora_err(path, format!("`{key}` has shape {shape:?}, expected a scalar")));
    }
    let v = w.read_f32(key, &shape)?;
    Ok(v[0])
}

/// Reads a `[rows, cols]` matrix stored as `[rows, cols]` or `[rows, cols, 1, 1]` and returns it
/// transposed, `[cols, rows]` (burn's linear layout).
fn read_transposed(w: &Weights, key: &str, shape: &[usize]) -> Result<Tensor<2>, ModelError> {
    let (rows, cols) = (shape[0], shape[1]);
    let values = w.read_f32(key, shape)?;
    let mut t = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    Ok(Tensor::from_data(TensorData::new(t, [cols, rows]), w.device()))
}

/// Checks a layer's pair against the layer; with `read`, reads it. Returns the rank, the bytes in
/// memory (f32) and the pair when read.
fn read_layer(
    w: &Weights,
    path: &Path,
    down: &str,
    up: &str,
    shape: LayerShape,
    read: bool,
) -> Result<(usize, u64, Option<Delta>), ModelError> {
    let ds = w.shape_of(down).map(<[usize]>::to_vec).unwrap_or_default();
    let us = w.shape_of(up).map(<[usize]>::to_vec).unwrap_or_default();
    let bad = |what: String| lora_err(path, what);
    let rank = *ds.first().ok_or_else(|| bad(format!("`{down}` is a scalar")))?;
    if rank == 0 {
        return Err(bad(format!("`{down}` has rank 0")));
    }
    let is_matrix = |s: &[usize]| s.len() == 2 || (s.len() == 4 && s[2] == 1 && s[3] == 1);
    match shape {
        LayerShape::Linear { d_in, d_out } | LayerShape::Conv { c_in: d_in, c_out: d_out, kernel: 1, stride: 1, padding: 0 }
            if is_matrix(&ds) && is_matrix(&us) =>
        {
            if ds[1] != d_in || us[0] != d_out || us[1] != rank {
                return Err(bad(format!(
                    "`{down}` {ds:?} / `{up}` {us:?} do not fit the layer ({d_in} → {d_out}): expected [r, {d_in}] and [{d_out}, r]"
                )));
            }
            let bytes = 4 * (rank * (d_in + d_out)) as u64;
            let delta =
                if read { Some(Delta::Linear { a: read_transposed(w, down, &ds)?, b: read_transposed(w, up, &us)? }) } else { None };
            Ok((rank, bytes, delta))
        }
        LayerShape::Conv { c_in, c_out, kernel, stride, padding } => {
            if ds != [rank, c_in, kernel, kernel] || us != [c_out, rank, 1, 1] {
                return Err(bad(format!(
                    "`{down}` {ds:?} / `{up}` {us:?} do not fit the {kernel}×{kernel} convolution ({c_in} → {c_out}): expected [r, {c_in}, {kernel}, {kernel}] and [{c_out}, r, 1, 1]"
                )));
            }
            let bytes = 4 * (rank * (c_in * kernel * kernel + c_out)) as u64;
            if !read {
                return Ok((rank, bytes, None));
            }
            let down_t = w.tensor(down, [rank, c_in, kernel, kernel])?;
            let up_t = w.tensor(up, [c_out, rank, 1, 1])?;
            Ok((rank, bytes, Some(Delta::Conv { down: down_t, up: up_t, stride, padding })))
        }
        LayerShape::Linear { d_in, d_out } => {
            Err(bad(format!("`{down}` {ds:?} / `{up}` {us:?} do not fit the linear layer ({d_in} → {d_out})")))
        }
    }
}

// ------------------------------------------------------------------------------------------
// The active adapters of a forward pass
// ------------------------------------------------------------------------------------------

/// Adapters with their weights (the weight multiplies each layer's scale; it may be negative).
pub type Adapters = Vec<(Arc<Lora>, f32)>;

/// Rows of a batch that use the same adapters.
#[derive(Clone, Debug)]
pub struct RowGroup {
    /// Sorted row indices.
    pub rows: Vec<usize>,
    pub adapters: Adapters,
}

/// The adapters of one component's forward pass: groups of rows of a batch of `rows`.
#[derive(Debug)]
pub struct Active {
    component: Component,
    rows: usize,
    groups: Vec<RowGroup>,
    /// The batch as runs of consecutive rows `(start, len, group)`: a group's side products are
    /// computed once over its rows and added run by run; rows of no group are left as they are.
    runs: Vec<(usize, usize, Option<usize>)>,
    /// Per group, its rows as an index (`None` when they are one run: a view is enough).
    gather: Vec<Option<Tensor<1, Int>>>,
}

impl Active {
    /// `groups` with no adapters (for this component) are dropped.
    pub fn new(component: Component, rows: usize, groups: Vec<RowGroup>, device: &Device) -> Self {
        let groups: Vec<RowGroup> = groups
            .into_iter()
            .filter(|g| !g.adapters.is_empty() && !g.rows.is_empty() && g.adapters.iter().any(|(l, _)| l.adapts(component)))
            .collect();
        let mut of_row: Vec<Option<usize>> = vec![None; rows];
        for (k, g) in groups.iter().enumerate() {
            for &r in &g.rows {
                if let Some(slot) = of_row.get_mut(r) {
                    *slot = Some(k);
                }
            }
        }
        let mut runs: Vec<(usize, usize, Option<usize>)> = Vec::new();
        for (r, g) in of_row.into_iter().enumerate() {
            match runs.last_mut() {
                Some((_, len, last)) if *last == g => *len += 1,
                _ => runs.push((r, 1, g)),
            }
        }
        let gather = (0..groups.len())
            .map(|k| {
                let mine: Vec<&(usize, usize, Option<usize>)> = runs.iter().filter(|r| r.2 == Some(k)).collect();
                (mine.len() > 1).then(|| {
                    let ids: Vec<i64> = mine.iter().flat_map(|&&(start, len, _)| (start..start + len).map(|r| r as i64)).collect();
                    let n = ids.len();
                    Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), device)
                })
            })
            .collect();
        Self { component, rows, groups, runs, gather }
    }

    /// Every row uses `adapters` (whatever the batch size of the calls made in its scope).
    pub fn uniform(component: Component, rows: usize, adapters: Adapters, device: &Device) -> Self {
        Self::new(component, rows, vec![RowGroup { rows: (0..rows).collect(), adapters }], device)
    }

    /// No adapters.
    pub fn none(component: Component) -> Self {
        Self { component, rows: 0, groups: Vec::new(), runs: Vec::new(), gather: Vec::new() }
    }

    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// One group covering every row: applied to whole batches of any size.
    fn is_uniform(&self) -> bool {
        self.groups.len() == 1 && self.runs.len() == 1
    }
}

thread_local! {
    static ACTIVE: RefCell<Vec<Rc<Active>>> = const { RefCell::new(Vec::new()) };
}

struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        ACTIVE.with(|a| {
            a.borrow_mut().pop();
        });
    }
}

/// Runs `f` with `active` as this thread's adapters (the innermost scope wins).
pub fn scoped<R>(active: Active, f: impl FnOnce() -> R) -> R {
    if active.is_empty() && ACTIVE.with(|a| a.borrow().is_empty()) {
        return f();
    }
    ACTIVE.with(|a| a.borrow_mut().push(Rc::new(active)));
    let _guard = Guard;
    f()
}

/// Runs `f` on a batch made of the current batch's `rows` joined into one row (e.g. attention
/// over a group's concatenated tokens): the adapters are those of those rows, which must share
/// them (rows of one group). Without an active context, just `f()`.
pub fn with_joined_rows<R>(rows: &[usize], device: &Device, f: impl FnOnce() -> R) -> R {
    let Some(cur) = current() else { return f() };
    let mut adapters: Option<Adapters> = None;
    for &r in rows {
        let a = cur.groups.iter().find(|g| g.rows.contains(&r)).map(|g| g.adapters.clone()).unwrap_or_default();
        match &adapters {
            None => adapters = Some(a),
            Some(prev) => debug_assert!(same_adapters(prev, &a), "joined rows with different adapters"),
        }
    }
    scoped(Active::uniform(cur.component, 1, adapters.unwrap_or_default(), device), f)
}

fn same_adapters(a: &Adapters, b: &Adapters) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((la, wa), (lb, wb))| Arc::ptr_eq(la, lb) && wa == wb)
}

fn current() -> Option<Rc<Active>> {
    ACTIVE.with(|a| a.borrow().last().cloned())
}

/// `out` (a linear layer `name`'s output for `x`, rows along axis 0) plus the active adapters'
/// side products on their rows.
pub fn add_linear<const D: usize>(name: &str, x: Tensor<D>, out: Tensor<D>) -> Tensor<D> {
    let Some(cur) = current() else { return out };
    apply(&cur, name, x, out, |l, x| l.linear(x))
}

/// `out` (a convolution `name`'s output for `x`) plus the active adapters' side products.
pub fn add_conv(name: &str, x: Tensor<4>, out: Tensor<4>) -> Tensor<4> {
    let Some(cur) = current() else { return out };
    apply(&cur, name, x, out, |l, x| l.conv(x))
}

/// Whether a context is active (layers keep their input only then).
pub fn active() -> bool {
    ACTIVE.with(|a| !a.borrow().is_empty())
}

fn apply<const D: usize>(
    cur: &Active,
    name: &str,
    x: Tensor<D>,
    out: Tensor<D>,
    delta: impl Fn(&LoraLayer, Tensor<D>) -> Option<Tensor<D>>,
) -> Tensor<D> {
    let per_group: Vec<Vec<(&LoraLayer, f32)>> = cur
        .groups
        .iter()
        .map(|g| g.adapters.iter().filter_map(|(l, w)| l.layer(cur.component, name).map(|ly| (ly, w * ly.scale))).collect())
        .collect();
    if per_group.iter().all(Vec::is_empty) {
        return out;
    }
    // Σ s·(x·A)·B of a group's adapters, in their order.
    let sum = |layers: &[(&LoraLayer, f32)], xs: Tensor<D>| -> Option<Tensor<D>> {
        let mut sum: Option<Tensor<D>> = None;
        for (ly, s) in layers {
            let Some(d) = delta(ly, xs.clone()) else { continue };
            let d = d * *s;
            sum = Some(match sum {
                None => d,
                Some(p) => p + d,
            });
        }
        sum
    };
    if cur.is_uniform() {
        return match sum(&per_group[0], x) {
            Some(d) => out + d,
            None => out,
        };
    }
    let b = x.dims()[0];
    if b != cur.rows {
        // Row groups apply to a batch of the context's size only (see `with_joined_rows`).
        debug_assert!(false, "batch of {b} rows in a context of {}", cur.rows);
        return out;
    }
    // Each group's side products over its rows at once (gathered when they are several runs),
    // then added to its runs in place.
    let deltas: Vec<Option<Tensor<D>>> = per_group
        .iter()
        .enumerate()
        .map(|(g, layers)| {
            if layers.is_empty() {
                return None;
            }
            let xs = match &cur.gather[g] {
                Some(ix) => x.clone().select(0, ix.clone()),
                None => {
                    let &(start, len, _) = cur.runs.iter().find(|r| r.2 == Some(g))?;
                    x.clone().narrow(0, start, len)
                }
            };
            sum(layers, xs)
        })
        .collect();
    let mut out = out;
    let mut offset = vec![0usize; deltas.len()];
    for &(start, len, g) in &cur.runs {
        let Some(g) = g else { continue };
        let Some(d) = &deltas[g] else { continue };
        let d = d.clone().narrow(0, offset[g], len);
        offset[g] += len;
        let o = out.clone().narrow(0, start, len);
        out = out.slice_assign(burn::tensor::s![start..start + len], o + d);
    }
    out
}

// ------------------------------------------------------------------------------------------
// Synthetic LoRAs
// ------------------------------------------------------------------------------------------

/// A random LoRA for every adaptable layer of `targets` (safetensors bytes, F32): rank `rank`,
/// both matrices random (`down` ±1/√fan_in, `up` ±gain/√rank), kohya with `alpha = rank / 2` on
/// every layer (scale 0.5) or PEFT (scale 1). Deterministic in `seed`. For tests, benchmarks and
/// the embedded demo model, which has no trained LoRA.
pub fn synthetic_file(targets: &Targets, format: LoraFormat, seed: u64, rank: usize, gain: f32) -> Vec<u8> {
    let mut next = super::weights::uniform_stream(seed ^ 0x5851_f42d_4c95_7f2d);
    let sdxl = targets.text_encoder_2.is_some();
    let components: Vec<(Component, &LayerIndex)> = [
        Some((Component::Unet, targets.unet)),
        Some((Component::TextEncoder, targets.text_encoder)),
        targets.text_encoder_2.map(|t| (Component::TextEncoder2, t)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (comp, index) in components {
        for (name, shape) in &index.layers {
            let (down_shape, up_shape, fan) = match *shape {
                LayerShape::Linear { d_in, d_out } => (vec![rank, d_in], vec![d_out, rank], d_in),
                LayerShape::Conv { c_in, c_out, kernel, .. } => {
                    (vec![rank, c_in, kernel, kernel], vec![c_out, rank, 1, 1], c_in * kernel * kernel)
                }
            };
            let down: Vec<f32> = (0..down_shape.iter().product::<usize>()).map(|_| next() / (fan as f32).sqrt()).collect();
            let up: Vec<f32> = (0..up_shape.iter().product::<usize>()).map(|_| next() * gain / (rank as f32).sqrt()).collect();
            match format {
                LoraFormat::Kohya => {
                    let prefix = match comp {
                        Component::Unet => "lora_unet",
                        Component::TextEncoder if sdxl => "lora_te1",
                        Component::TextEncoder => "lora_te",
                        Component::TextEncoder2 => "lora_te2",
                    };
                    let base = format!("{prefix}_{}", kohya(name));
                    tensors.push((format!("{base}.lora_down.weight"), down_shape, down));
                    tensors.push((format!("{base}.lora_up.weight"), up_shape, up));
                    tensors.push((format!("{base}.alpha"), vec![], vec![rank as f32 / 2.0]));
                }
                LoraFormat::Peft => {
                    let base = format!("{}.{name}", comp.as_str());
                    tensors.push((format!("{base}.lora_A.weight"), down_shape, down));
                    tensors.push((format!("{base}.lora_B.weight"), up_shape, up));
                }
            }
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(k, s, v)| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes.iter().map(|(k, s, b)| {
        (k.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("shape matches the data"))
    });
    safetensors::serialize(views, None).expect("serializable tensors")
}
