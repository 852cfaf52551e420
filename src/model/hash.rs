//! Model hashes as AUTOMATIC1111's web UI shows them: the SHA-256 of the model's weight file,
//! streamed from disk, and its short form (the first 10 hex digits, A1111's `Model hash`).
//!
//! For a diffusers folder the hashed file is the UNet's weights,
//! `unet/diffusion_pytorch_model.safetensors` (or the `.fp16.safetensors` variant, the same file
//! the model loads). The embedded model hashes the safetensors file its synthetic UNet weights
//! would be saved as ([`crate::model::weights::Weights::synthetic_safetensors`]).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::ModelError;
use super::weights::weight_file;

/// Lower-case hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file (lower-case hex), read in 1 MiB chunks: never the whole file in memory.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let io = |e: std::io::Error| ModelError::Io { path: path.to_path_buf(), message: format!("hashing: {e}") };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// SHA-256 of bytes in memory (lower-case hex).
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of a diffusers folder's UNet weight file (the file [`crate::model::unet::UNet::load`]
/// reads).
pub fn diffusers_unet_sha256(dir: &Path) -> Result<String, ModelError> {
    sha256_file(&weight_file(&dir.join("unet"), "diffusion_pytorch_model")?)
}

/// A1111's short model hash: the first 10 hex digits of the full SHA-256.
pub fn short_hash(sha256: &str) -> &str {
    &sha256[..sha256.len().min(10)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hash_streams_and_matches_the_in_memory_hash() {
        let dir = std::env::temp_dir().join(format!("stylealign-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.bin");
        // Larger than one read chunk, not a multiple of it.
        let data: Vec<u8> = (0..(3u32 << 20) + 12345).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        assert_eq!(sha256_file(&path).unwrap(), sha256_bytes(&data));
        // The SHA-256 of "abc" (FIPS 180-2 test vector).
        assert_eq!(sha256_bytes(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(short_hash("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"), "ba7816bf8f");
        let e = sha256_file(&dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
