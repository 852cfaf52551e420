//! Model configs read from diffusers / transformers `config.json` files. Every architectural
//! number comes from the file; a value this implementation does not support is an error that
//! names the field.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::ModelError;

/// A parsed `config.json` with typed accessors whose errors name the field.
pub struct RawConfig {
    file: PathBuf,
    map: Map<String, Value>,
}

impl RawConfig {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io { path: path.to_path_buf(), message: e.to_string() })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ModelError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ModelError::Io { path: path.to_path_buf(), message: format!("invalid JSON: {e}") })?;
        match value {
            Value::Object(map) => Ok(Self { file: path.to_path_buf(), map }),
            _ => Err(ModelError::Io { path: path.to_path_buf(), message: "config is not a JSON object".into() }),
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn err(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::Config { file: self.file.clone(), field: field.to_string(), message: message.into() }
    }

    fn value(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    pub fn is_set(&self, field: &str) -> bool {
        self.value(field).is_some()
    }

    pub fn usize(&self, field: &str) -> Result<usize, ModelError> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>, ModelError> {
        match self.value(field) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}")))
            }
        }
    }

    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize, ModelError> {
        Ok(self.opt_usize(field)?.unwrap_or(default))
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64, ModelError> {
        match self.value(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool, ModelError> {
        match self.value(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected true/false, found {v}"))),
        }
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<String>, ModelError> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(field, format!("expected a string, found {v}"))),
        }
    }

    pub fn str_or(&self, field: &str, default: &str) -> Result<String, ModelError> {
        Ok(self.opt_str(field)?.unwrap_or_else(|| default.to_string()))
    }

    pub fn strings(&self, field: &str) -> Result<Vec<String>, ModelError> {
        match self.value(field) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.err(field, format!("expected strings, found {v}"))))
                .collect(),
            Some(v) => Err(self.err(field, format!("expected a list of strings, found {v}"))),
            None => Err(self.err(field, "missing")),
        }
    }

    pub fn usizes(&self, field: &str) -> Result<Vec<usize>, ModelError> {
        match self.value(field) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| self.err(field, format!("expected integers, found {v}"))))
                .collect(),
            Some(v) => Err(self.err(field, format!("expected a list of integers, found {v}"))),
            None => Err(self.err(field, "missing")),
        }
    }

    /// An integer or a list of `n` integers (diffusers' "int or tuple per block" fields).
    pub fn per_block(&self, field: &str, n: usize) -> Result<Option<Vec<usize>>, ModelError> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::Number(x)) => {
                let x = x.as_u64().ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {x}")))?;
                Ok(Some(vec![x as usize; n]))
            }
            Some(Value::Array(items)) => {
                if items.len() != n {
                    return Err(self.err(field, format!("expected {n} entries (one per block), found {}", items.len())));
                }
                items
                    .iter()
                    .map(|v| {
                        v.as_u64().map(|x| x as usize).ok_or_else(|| {
                            self.err(field, format!("expected integers per block, found {v} (nested lists are not supported)"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
            Some(v) => Err(self.err(field, format!("expected an integer or a list, found {v}"))),
        }
    }

    /// Errors unless `field` is absent/null or equals one of `allowed`.
    pub fn require(&self, field: &str, allowed: &[Value]) -> Result<(), ModelError> {
        match self.value(field) {
            None => Ok(()),
            Some(v) if allowed.iter().any(|a| a == v) => Ok(()),
            Some(v) => Err(self.err(field, format!("value {v} is not supported (supported: {})", display_list(allowed)))),
        }
    }
}

fn display_list(values: &[Value]) -> String {
    if values.is_empty() {
        return "only null".into();
    }
    values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}
