//! Generates the gRPC code of `proto/stylealign/v1/stylealign.proto` (tonic + prost) and its file
//! descriptor set (for server reflection), with the protoc of `protoc-bin-vendored`: no system
//! protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/stylealign/v1/stylealign.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("stylealign_v1_descriptor.bin"))
        .compile_with_config(config, &[PathBuf::from(proto)], &[PathBuf::from("proto"), well_known])?;
    Ok(())
}
