//! Weight loading from diffusers / transformers safetensors files by their key names.
//!
//! A file is read tensor by tensor with positioned reads (no memory map, no whole-file buffer):
//! while a model loads, memory holds the tensors already built plus one tensor being converted,
//! never two copies of the weights. `F32`, `F16` and `BF16` files are read and converted on the
//! host to the model's dtype ([`Weights::dtype`]: f32 unless set with [`Weights::with_dtype`] or a
//! [`super::precision::loading`] scope); a tensor stored in that dtype is used as read (an f16
//! file for an f16 model is never widened to f32 and back).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use serde::Deserialize;

use super::ModelError;

#[derive(Debug, Clone, Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F16,
    BF16,
    /// Any other element type (integers, bool, f64): listed, but not readable as weights.
    Other,
}

impl StoredDType {
    fn size(self) -> usize {
        match self {
            StoredDType::F32 => 4,
            StoredDType::F16 | StoredDType::BF16 => 2,
            StoredDType::Other => 0,
        }
    }
}

#[derive(Debug, Clone)]
struct TensorInfo {
    dtype: StoredDType,
    shape: Vec<usize>,
    offset: u64,
    len: u64,
}

enum Source {
    File(File),
    /// Deterministic pseudo-random weights of any requested shape (the embedded demo model).
    Synthetic {
        seed: u64,
        gain: fn(&str) -> f32,
    },
}

/// One open safetensors file; tensors are fetched by key and each fetch is recorded, so that
/// [`Weights::finish`] can report tensors the model did not use.
pub struct Weights {
    source: Source,
    path: PathBuf,
    tensors: BTreeMap<String, TensorInfo>,
    used: Mutex<BTreeSet<String>>,
    /// Synthetic weights: the key and shape of every tensor generated so far.
    generated: Mutex<BTreeMap<String, Vec<usize>>>,
    device: Device,
    /// The stored name of each requested (diffusers) key, for files in another layout.
    names: Option<KeyMap>,
    /// Like `names`, for layouts where a requested tensor is part of a stored one (a row block
    /// of a fused matrix) or its transpose; consulted before `names`.
    layout: Option<LayoutMap>,
    /// Which stored tensors [`Weights::finish`] expects to be used (`None`: all of them).
    scope: Option<Scope>,
    /// The layers built from these weights that a LoRA can adapt, by module name.
    layers: Mutex<super::lora::LayerIndex>,
    /// The dtype tensors are created in.
    dtype: FloatDType,
}

/// How a requested tensor is stored: under `key`, optionally as block `part.0` of `part.1` equal
/// row blocks of the stored tensor (a fused q/k/v projection), optionally transposed (a 2-D
/// tensor stored `[in, out]`). Through a layout map, stored 1×1 convolution kernels
/// `[o, i, 1, 1]` also serve a requested `[o, i]` matrix (the original VAE's attention).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAs {
    pub key: String,
    pub part: Option<(usize, usize)>,
    pub transposed: bool,
}

impl StoredAs {
    /// The whole tensor stored under `key`.
    pub fn plain(key: impl Into<String>) -> Self {
        Self { key: key.into(), part: None, transposed: false }
    }
}

/// Maps a requested (diffusers) key to how it is stored.
pub type LayoutMap = Box<dyn Fn(&str) -> StoredAs + Send + Sync>;

/// Says which stored keys belong to a component (see [`Weights::with_scope`]).
pub type Scope = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Maps a requested (diffusers) key to the name it is stored under.
pub type KeyMap = Box<dyn Fn(&str) -> String + Send + Sync>;

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights({}, {} tensors)", self.path.display(), self.tensors.len())
    }
}

/// A file's extension, lower-cased ("" without one).
pub fn extension(path: &Path) -> String {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

/// Whether `path` names a pickle checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`): such files are never
/// read (unpickling can run code).
pub fn is_pickle(path: &Path) -> bool {
    matches!(extension(path).as_str(), "ckpt" | "pt" | "pth" | "bin")
}

/// The weight file of a component folder: `<stem>.safetensors`, or the `<stem>.fp16.safetensors`
/// variant when only that one exists.
pub fn weight_file(dir: &Path, stem: &str) -> Result<PathBuf, ModelError> {
    let plain = dir.join(format!("{stem}.safetensors"));
    if plain.is_file() {
        return Ok(plain);
    }
    let fp16 = dir.join(format!("{stem}.fp16.safetensors"));
    if fp16.is_file() {
        return Ok(fp16);
    }
    Err(ModelError::Io {
        path: plain.clone(),
        message: format!("no weight file: neither {} nor {} exists", plain.display(), fp16.display()),
    })
}

impl Weights {
    /// Opens a safetensors file and reads its header.
    pub fn open(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let io = |message: String| ModelError::Io { path: path.to_path_buf(), message };
        let file = File::open(path).map_err(|e| io(e.to_string()))?;
        let file_len = file.metadata().map_err(|e| io(e.to_string()))?.len();
        let mut len_buf = [0u8; 8];
        file.read_exact_at(&mut len_buf, 0).map_err(|e| io(format!("not a safetensors file (header length unreadable: {e})")))?;
        let header_len = u64::from_le_bytes(len_buf);
        if header_len > 100_000_000 || 8 + header_len > file_len {
            return Err(io(format!("not a safetensors file (header length {header_len} does not fit the file)")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8).map_err(|e| io(e.to_string()))?;
        let raw: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| io(format!("invalid safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (key, value) in raw {
            if key == "__metadata__" {
                continue;
            }
            let info: RawInfo = serde_json::from_value(value).map_err(|e| io(format!("invalid header entry for `{key}`: {e}")))?;
            let dtype = match info.dtype.as_str() {
                "F32" => StoredDType::F32,
                "F16" => StoredDType::F16,
                "BF16" => StoredDType::BF16,
                _ => StoredDType::Other,
            };
            let [begin, end] = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            if end >= begin && data_start + end > file_len {
                return Err(io(format!(
                    "the file is truncated: tensor `{key}` ends at byte {}, the file has {file_len} bytes (an interrupted download?)",
                    data_start + end
                )));
            }
            if end < begin || (dtype != StoredDType::Other && (end - begin) as usize != numel * dtype.size()) {
                return Err(io(format!("tensor `{key}` has inconsistent offsets {begin}..{end} for shape {:?}", info.shape)));
            }
            tensors.insert(key, TensorInfo { dtype, shape: info.shape, offset: data_start + begin, len: end - begin });
        }
        Ok(Self {
            source: Source::File(file),
            path: path.to_path_buf(),
            tensors,
            used: Mutex::new(BTreeSet::new()),
            generated: Mutex::new(BTreeMap::new()),
            device: device.clone(),
            names: None,
            layout: None,
            scope: None,
            layers: Mutex::default(),
            dtype: super::precision::load_precision().float_dtype(),
        })
    }

    /// Weights that answer every request with deterministic pseudo-random values (PyTorch-like
    /// scales: ±1/√fan_in for matrices and kernels, 1 ± 0.1 for norm scales, small biases),
    /// derived from `seed` and the key. Used for the embedded demo model.
    pub fn synthetic(name: &str, seed: u64, device: &Device) -> Self {
        Self::synthetic_with_gain(name, seed, |_| 1.0, device)
    }

    /// [`Weights::synthetic`], every value of tensor `key` multiplied by `gain(key)` (a recipe
    /// that strengthens or weakens chosen layers).
    pub fn synthetic_with_gain(name: &str, seed: u64, gain: fn(&str) -> f32, device: &Device) -> Self {
        Self {
            source: Source::Synthetic { seed, gain },
            path: PathBuf::from(format!("<synthetic {name}>")),
            tensors: BTreeMap::new(),
            used: Mutex::new(BTreeSet::new()),
            generated: Mutex::new(BTreeMap::new()),
            device: device.clone(),
            names: None,
            layout: None,
            scope: None,
            layers: Mutex::default(),
            dtype: super::precision::load_precision().float_dtype(),
        }
    }

    /// These weights creating their tensors in `dtype` (F32, F16 or BF16): the model's dtype,
    /// converted once on the host as each tensor is read.
    pub fn with_dtype(mut self, dtype: FloatDType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The dtype tensors are created in.
    pub fn dtype(&self) -> FloatDType {
        self.dtype
    }

    /// These weights with every requested key looked up under `names(key)` (a file in another
    /// layout, e.g. an original-layout ControlNet). Errors then name the stored key and the
    /// requested one.
    pub fn with_names(mut self, names: KeyMap) -> Self {
        self.names = Some(names);
        self
    }

    /// These weights with every requested key looked up by `layout` (see [`StoredAs`]): one
    /// component of a checkpoint in another layout.
    pub fn with_layout(mut self, layout: LayoutMap) -> Self {
        self.layout = Some(layout);
        self
    }

    /// These weights with [`Weights::finish`] checking only the stored keys for which `scope`
    /// holds: a checkpoint holding several components is read by one view per component, each
    /// of which must use every tensor of its own part.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// How a requested key is stored.
    fn stored_as(&self, key: &str) -> StoredAs {
        match (&self.layout, &self.names) {
            (Some(layout), _) => layout(key),
            (None, Some(names)) => StoredAs::plain(names(key)),
            (None, None) => StoredAs::plain(key),
        }
    }

    /// The stored shape of a requested key (after the key mapping), if the file holds it.
    pub fn requested_shape(&self, key: &str) -> Option<Vec<usize>> {
        let s = self.stored_as(key);
        let shape = self.tensors.get(&s.key)?.shape.clone();
        Some(effective_shape(&shape, &s).unwrap_or(shape))
    }

    /// Records a layer built from these weights (see [`super::lora`]).
    pub fn record_layer(&self, name: &str, shape: super::lora::LayerShape) {
        self.layers.lock().expect("weights lock").layers.insert(name.to_string(), shape);
    }

    /// The layers recorded so far.
    pub fn layer_index(&self) -> super::lora::LayerIndex {
        self.layers.lock().expect("weights lock").clone()
    }

    /// The stored keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// For synthetic weights: the safetensors file (F32, no metadata) holding every tensor
    /// generated so far — the file these weights would be saved as. `None` for a file.
    pub fn synthetic_safetensors(&self) -> Option<Vec<u8>> {
        let Source::Synthetic { seed, gain } = &self.source else { return None };
        let generated = self.generated.lock().expect("weights lock");
        let data: Vec<(&String, &Vec<usize>, Vec<u8>)> = generated
            .iter()
            .map(|(k, shape)| (k, shape, synthetic_values(*seed, *gain, k, shape).iter().flat_map(|v| v.to_le_bytes()).collect()))
            .collect();
        let views = data.iter().map(|(k, shape, bytes)| {
            (
                k.as_str(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), bytes).expect("shape matches the data"),
            )
        });
        Some(safetensors::serialize(views, None).expect("serializable tensors"))
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the file holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The stored shape of `key`, if present.
    pub fn shape_of(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    /// The element type of a stored tensor.
    pub fn stored_dtype_of(&self, key: &str) -> Option<StoredDType> {
        self.tensors.get(key).map(|t| t.dtype)
    }

    /// The element type of the first tensor (files are written with one dtype).
    pub fn stored_dtype(&self) -> Option<StoredDType> {
        self.tensors.values().next().map(|t| t.dtype)
    }

    /// Reads `key` as f32 values after checking its shape.
    pub fn read_f32(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        Ok(self.read_values(key, expected, FloatDType::F32)?.into_f32())
    }

    /// Reads `key` after checking its shape, as `dtype` values (F32, F16 or BF16; any other is
    /// read as F32): stored values of that dtype as they are, others converted on the host.
    fn read_values(&self, key: &str, expected: &[usize], dtype: FloatDType) -> Result<HostValues, ModelError> {
        let file = match &self.source {
            Source::File(file) => file,
            Source::Synthetic { seed, gain } => {
                self.generated.lock().expect("weights lock").insert(key.to_string(), expected.to_vec());
                return Ok(HostValues::F32(synthetic_values(*seed, *gain, key, expected)).into_dtype(dtype));
            }
        };
        let stored = self.stored_as(key);
        let shown = if self.names.is_none() && self.layout.is_none() {
            key.to_string()
        } else {
            let part = match stored.part {
                Some((i, n)) => format!(" row block {i} of {n}"),
                None => String::new(),
            };
            let t = if stored.transposed { " transposed" } else { "" };
            // The error messages quote the key: `stored`, read as `requested`.
            format!("{}`{part}{t}, read as `{key}", stored.key)
        };
        let key = stored.key.as_str();
        let info = self.tensors.get(key).ok_or_else(|| ModelError::MissingTensor {
            key: shown.clone(),
            file: self.path.clone(),
            expected: expected.to_vec(),
        })?;
        let effective = effective_shape(&info.shape, &stored);
        let squeeze = self.layout.is_some();
        let fits = |shape: &[usize]| {
            shape == expected
                || (squeeze
                    && shape.len() == expected.len() + 2
                    && shape[..expected.len()] == *expected
                    && shape[expected.len()..] == [1, 1])
        };
        if !effective.as_deref().is_some_and(fits) {
            return Err(ModelError::ShapeMismatch {
                key: shown,
                file: self.path.clone(),
                expected: expected.to_vec(),
                found: effective.unwrap_or_else(|| info.shape.clone()),
            });
        }
        if info.dtype == StoredDType::Other {
            return Err(ModelError::Io {
                path: self.path.clone(),
                message: format!("tensor `{key}` is not F32, F16 or BF16 and cannot be read as weights"),
            });
        }
        let (offset, len) = match stored.part {
            Some((i, n)) => {
                let block = info.len / n as u64;
                (info.offset + i as u64 * block, block)
            }
            None => (info.offset, info.len),
        };
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, offset)
            .map_err(|e| ModelError::Io { path: self.path.clone(), message: format!("reading `{key}`: {e}") })?;
        self.used.lock().expect("weights lock").insert(key.to_string());
        let values = match info.dtype {
            StoredDType::F32 => HostValues::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            StoredDType::F16 => HostValues::F16(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect()),
            StoredDType::BF16 => HostValues::Bf16(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect()),
            StoredDType::Other => unreachable!("checked above"),
        };
        let values = values.into_dtype(dtype);
        Ok(if stored.transposed {
            // Stored [r, c] (after the row block), requested [c, r].
            values.transposed(expected[1], expected[0])
        } else {
            values
        })
    }

    /// Reads `key` as a tensor of the given shape.
    pub fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Result<Tensor<D>, ModelError> {
        let values = self.read_values(key, &shape, self.dtype)?;
        Ok(values.into_tensor(shape, &self.device))
    }

    /// Reads a PyTorch `nn.Linear` weight stored `[out, in]` and returns it as `[in, out]`
    /// (burn's layout), transposed on the host so the device tensor is contiguous.
    pub fn linear_weight(&self, key: &str, d_out: usize, d_in: usize) -> Result<Tensor<2>, ModelError> {
        let values = self.read_values(key, &[d_out, d_in], self.dtype)?;
        Ok(values.transposed(d_out, d_in).into_tensor([d_in, d_out], &self.device))
    }

    /// Errors if the file holds tensors the model did not read (an extra tensor means the config
    /// and the weights disagree).
    pub fn finish(&self) -> Result<(), ModelError> {
        if matches!(self.source, Source::Synthetic { .. }) {
            return Ok(());
        }
        let used = self.used.lock().expect("weights lock");
        let in_scope = |k: &str| self.scope.as_ref().is_none_or(|s| s(k));
        let extra: Vec<String> =
            self.tensors.iter().filter(|(k, _)| in_scope(k) && !used.contains(*k)).map(|(k, t)| format!("{k} {:?}", t.shape)).collect();
        if extra.is_empty() { Ok(()) } else { Err(ModelError::ExtraTensors { file: self.path.clone(), keys: extra }) }
    }
}

/// Host values of one tensor, in one of the three float dtypes.
enum HostValues {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

impl HostValues {
    /// These values as `dtype` (unchanged when they already are; F64/Flex32 are read as F32).
    fn into_dtype(self, dtype: FloatDType) -> Self {
        match (self, dtype) {
            (v @ HostValues::F16(_), FloatDType::F16) | (v @ HostValues::Bf16(_), FloatDType::BF16) => v,
            (v, FloatDType::F16) => HostValues::F16(v.into_f32().into_iter().map(half::f16::from_f32).collect()),
            (v, FloatDType::BF16) => HostValues::Bf16(v.into_f32().into_iter().map(half::bf16::from_f32).collect()),
            (v, _) => HostValues::F32(v.into_f32()),
        }
    }

    fn into_f32(self) -> Vec<f32> {
        match self {
            HostValues::F32(v) => v,
            HostValues::F16(v) => v.into_iter().map(half::f16::to_f32).collect(),
            HostValues::Bf16(v) => v.into_iter().map(half::bf16::to_f32).collect(),
        }
    }

    /// The `[rows, cols]` matrix these values hold, transposed to `[cols, rows]`.
    fn transposed(self, rows: usize, cols: usize) -> Self {
        fn t<T: Copy>(v: Vec<T>, rows: usize, cols: usize) -> Vec<T> {
            let mut out = v.clone();
            for r in 0..rows {
                for c in 0..cols {
                    out[c * rows + r] = v[r * cols + c];
                }
            }
            out
        }
        match self {
            HostValues::F32(v) => HostValues::F32(t(v, rows, cols)),
            HostValues::F16(v) => HostValues::F16(t(v, rows, cols)),
            HostValues::Bf16(v) => HostValues::Bf16(t(v, rows, cols)),
        }
    }

    /// A device tensor of these values, in their dtype.
    fn into_tensor<const D: usize>(self, shape: [usize; D], device: &Device) -> Tensor<D> {
        let (data, dtype) = match self {
            HostValues::F32(v) => (TensorData::new(v, shape), FloatDType::F32),
            HostValues::F16(v) => (TensorData::new(v, shape), FloatDType::F16),
            HostValues::Bf16(v) => (TensorData::new(v, shape), FloatDType::BF16),
        };
        Tensor::from_data(data, (device, burn::tensor::DType::from(dtype)))
    }
}

/// The shape a requested tensor has once its row block is taken and it is transposed; `None`
/// when the stored rows do not split into the blocks or a transposed tensor is not 2-D.
fn effective_shape(stored: &[usize], how: &StoredAs) -> Option<Vec<usize>> {
    let mut shape = stored.to_vec();
    if let Some((i, n)) = how.part {
        if shape.is_empty() || n == 0 || i >= n || !shape[0].is_multiple_of(n) {
            return None;
        }
        shape[0] /= n;
    }
    if how.transposed {
        if shape.len() != 2 {
            return None;
        }
        shape.swap(0, 1);
    }
    Some(shape)
}

fn synthetic_values(seed: u64, gain: fn(&str) -> f32, key: &str, shape: &[usize]) -> Vec<f32> {
    let g = gain(key);
    let mut values = synthetic_base(seed, key, shape);
    if g != 1.0 {
        values.iter_mut().for_each(|v| *v *= g);
    }
    values
}

/// A SplitMix64 stream from `state`, as uniform values in [-1, 1) (24-bit resolution): the
/// deterministic randomness of synthetic weights.
pub(crate) fn uniform_stream(mut state: u64) -> impl FnMut() -> f32 {
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn synthetic_base(seed: u64, key: &str, shape: &[usize]) -> Vec<f32> {
    // FNV-1a of the key, mixed with the seed, drives a SplitMix64 stream.
    let mut next = uniform_stream(key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)) ^ seed);
    let n: usize = shape.iter().product();
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let (offset, scale) = if key.contains("embedding") {
        (0.0, 0.035)
    } else if shape.len() >= 2 {
        (0.0, 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt())
    } else if leaf == "weight" {
        (1.0, 0.1)
    } else {
        (0.0, 0.05)
    };
    if shape.len() == 4 && shape[2] == 3 && shape[3] == 3 {
        // 3×3 kernels: a random channel mix times a smooth (binomial) spatial profile plus a
        // little noise, so the demo model's feature maps, and its images, are smooth shapes
        // rather than pixel noise.
        const PROFILE: [f32; 9] = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n / 9 {
            let mix = next() * scale;
            for p in PROFILE {
                out.push(mix * p / 4.7 + 0.15 * scale * next());
            }
        }
        return out;
    }
    (0..n).map(|_| offset + scale * next()).collect()
}
