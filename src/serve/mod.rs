//! The gRPC service: `stylealign serve`.
//!
//! Seams (after text-generation-inference's router): [`convert`] (protocol ↔ domain),
//! [`validate`] (every request check, once), [`errors`] (statuses with `google.rpc` details),
//! [`admission`] (the memory budget), [`session`] (the per-client session store), [`engine`] (the
//! serving core: it owns the [`queue`] (bounded admission queue with priorities and the batcher),
//! the [`worker`] threads that run batches, and the jobs' [`cancel`] tokens; [`job`] describes a
//! job), [`service`] (the StyleAlign handlers: translation only), [`server`] (listeners, health,
//! reflection, gRPC-Web, admin HTTP, model loading, drain),
//! [`http`] (the same RPCs as JSON over HTTP), [`conn`], [`tls`] and [`layers`] (connections, TLS
//! and mTLS, the tower middleware: identity, limits, tracing), [`playground`] (the browser page),
//! [`metrics`].
//!
//! The API is `proto/stylealign/v1/stylealign.proto`; `docs/api.md` documents it.

pub mod admission;
pub mod cancel;
pub mod config;
pub mod conn;
pub mod convert;
pub mod engine;
pub mod errors;
pub mod http;
pub mod infotext;
pub mod job;
pub mod layers;
mod loading;
pub mod loras;
pub mod metrics;
pub mod playground;
pub mod pool;
pub mod queue;
pub mod server;
pub mod service;
pub mod session;
pub mod tls;
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
