//! Generates the gRPC code of `proto/stylealign/v1/stylealign.proto` (tonic + prost), its file
//! descriptor set (for server reflection) and the serde implementations of its canonical JSON
//! mapping (pbjson, for the HTTP/JSON routes), with the protoc of `protoc-bin-vendored`: no
//! system protoc is needed. `google.protobuf.Timestamp` is `pbjson_types::Timestamp` (a prost
//! type with the JSON mapping: RFC 3339 strings).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/stylealign/v1/stylealign.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = out_dir.join("stylealign_v1_descriptor.bin");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .extern_path(".google.protobuf.Timestamp", "::pbjson_types::Timestamp")
        .compile_with_config(config, &[PathBuf::from(proto)], &[PathBuf::from("proto"), well_known])?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor)?)?
        .extern_path(".google.protobuf.Timestamp", "::pbjson_types::Timestamp")
        .build(&[".stylealign.v1"])?;
    Ok(())
}
