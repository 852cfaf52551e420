//! Shared helpers of the integration tests: golden files, tensors, comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// The golden directory: `$STYLEALIGN_GOLDENS`, else the copy in `tests/fixtures/goldens`.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("STYLEALIGN_GOLDENS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens"),
    }
}

pub fn device() -> Device {
    Device::flex()
}

/// A host tensor read from a golden file.
#[derive(Clone, Debug)]
pub enum HostTensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

impl HostTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32 { shape, .. } | HostTensor::I64 { shape, .. } => shape,
        }
    }

    pub fn f32(&self) -> Vec<f32> {
        match self {
            HostTensor::F32 { data, .. } => data.clone(),
            HostTensor::I64 { data, .. } => data.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn i64(&self) -> Vec<i64> {
        match self {
            HostTensor::I64 { data, .. } => data.clone(),
            HostTensor::F32 { .. } => panic!("tensor is f32, expected i64"),
        }
    }

    /// Rows of token ids.
    pub fn rows_u32(&self) -> Vec<Vec<u32>> {
        let s = self.shape();
        let data = self.i64();
        data.chunks(s[1]).map(|r| r.iter().map(|&x| x as u32).collect()).collect()
    }

    pub fn tensor<const D: usize>(&self, device: &Device) -> Tensor<D> {
        let shape: [usize; D] = self.shape().try_into().unwrap_or_else(|_| panic!("rank {} != {D}", self.shape().len()));
        Tensor::from_data(TensorData::new(self.f32(), shape), device)
    }

    /// Slice `i` along the first axis.
    pub fn index(&self, i: usize) -> HostTensor {
        let s = self.shape();
        let inner: usize = s[1..].iter().product();
        match self {
            HostTensor::F32 { data, .. } => HostTensor::F32 { shape: s[1..].to_vec(), data: data[i * inner..(i + 1) * inner].to_vec() },
            HostTensor::I64 { data, .. } => HostTensor::I64 { shape: s[1..].to_vec(), data: data[i * inner..(i + 1) * inner].to_vec() },
        }
    }
}

/// One golden file: its tensors and its `info` metadata.
pub struct Golden {
    pub path: PathBuf,
    pub name: String,
    pub tensors: BTreeMap<String, HostTensor>,
    pub info: serde_json::Value,
}

impl Golden {
    pub fn read(path: &Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let info = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("info"))
            .map(|s| serde_json::from_str(s).expect("info is JSON"))
            .unwrap_or(serde_json::Value::Null);
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let d = view.data();
            let t = match view.dtype() {
                Dtype::F32 => {
                    HostTensor::F32 { shape, data: d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() }
                }
                Dtype::I64 => {
                    HostTensor::I64 { shape, data: d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect() }
                }
                other => panic!("{}: tensor {name} has dtype {other:?}", path.display()),
            };
            tensors.insert(name, t);
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        Golden { path: path.to_path_buf(), name, tensors, info }
    }

    pub fn get(&self, key: &str) -> &HostTensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
}

/// All `*.safetensors` goldens of a directory, sorted by name.
pub fn golden_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("golden dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    files
}

/// Max |a − b|, or +∞ when the shapes differ.
pub fn max_abs_diff<const D: usize>(got: Tensor<D>, want: &HostTensor) -> f64 {
    if got.dims().as_slice() != want.shape() {
        eprintln!("shape mismatch: got {:?}, want {:?}", got.dims(), want.shape());
        return f64::INFINITY;
    }
    let g: Vec<f32> = got.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    let w = want.f32();
    g.iter().zip(&w).map(|(a, b)| if a.is_nan() || b.is_nan() { f64::INFINITY } else { (a - b).abs() as f64 }).fold(0.0, f64::max)
}

pub fn usize_list(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().expect("list").iter().map(|x| x.as_u64().expect("index") as usize).collect()
}

pub fn f32_list(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().expect("list").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}
