//! The gRPC service: `stylealign serve`.
//!
//! Seams (after text-generation-inference's router): [`convert`] (protocol ↔ domain),
//! [`validate`] (every request check, once), [`errors`] (statuses with `google.rpc` details),
//! [`admission`] (the memory budget), [`session`] (the per-client session store), [`queue`] (bounded admission
//! queue with priorities and the batcher), [`worker`] (jobs and the worker threads that run
//! batches), [`server`] (the tonic services, health, reflection, gRPC-Web, admin HTTP, drain),
//! [`http`] (the same RPCs as JSON over HTTP), [`playground`] (the browser page), [`metrics`].
//!
//! The API is `proto/stylealign/v1/stylealign.proto`; `docs/api.md` documents it.

pub mod admission;
pub mod config;
pub mod convert;
pub mod errors;
pub mod http;
pub mod infotext;
pub mod metrics;
pub mod playground;
pub mod queue;
pub mod server;
pub mod session;
pub mod token;
pub mod validate;
pub mod worker;

/// Code generated from `proto/stylealign/v1/stylealign.proto` (package `stylealign.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod pb {
    tonic::include_proto!("stylealign.v1");
    // serde for the canonical protobuf JSON mapping (pbjson-build).
    include!(concat!(env!("OUT_DIR"), "/stylealign.v1.serde.rs"));

    /// The encoded file descriptor set (with imports), for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stylealign_v1_descriptor");
}

pub use config::{ModelSource, ServeConfig, Tokens};
pub use server::{SERVICE_NAME, Server, run};
