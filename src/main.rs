//! `stylealign`: serve style-aligned Stable Diffusion over gRPC, call the service, or run a
//! self-contained demo / load test. This file parses the arguments and dispatches; each
//! subcommand's flags live next to the code they drive (`serve::config`, `client::generate`,
//! `client::demo`, `client::loadtest`).
//!
//! ```text
//! stylealign serve --model tiny --listen 127.0.0.1:50051 --admin-listen 127.0.0.1:9090
//! stylealign generate --server 127.0.0.1:50051 --prompt "a cat, watercolor" --prompt "a dog" --out out/
//! stylealign demo --out out/demo
//! stylealign loadtest --server 127.0.0.1:50051 --clients 1,4,16 --duration 30s
//! stylealign bench --device cuda --model sd15 --json
//! ```
//!
//! Every `serve` flag also reads an environment variable (`STYLEALIGN_…`, shown by `--help`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stylealign::client::{self, StdoutClosed};
use stylealign::serve::config::ServeArgs;
use stylealign::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(name = "stylealign", version, about = "Style-aligned Stable Diffusion image sets over gRPC")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text", env = "STYLEALIGN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (API on --listen; /metrics, /healthz and gRPC health on --admin-listen).
    Serve(ServeArgs),
    /// Generate one style-aligned set through a running server and write the PNGs.
    Generate(client::generate::GenerateArgs),
    /// Run server and client in one process on the embedded model; write PNGs and a contact sheet.
    Demo(client::demo::DemoArgs),
    /// Measure throughput and latency with concurrent clients (in-process tiny server by default).
    Loadtest(client::loadtest::LoadArgs),
    /// Time UNet steps (plain and StyleAligned) and their operations on a device, with random weights.
    Bench(stylealign::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let otlp = match &cli.command {
        Command::Serve(a) => a.otlp_endpoint.as_deref(),
        _ => None,
    };
    let traces = match telemetry::init(cli.log_format, default_log, otlp) {
        Ok(t) => t,
        Err(e) => {
            client::err_line(format_args!("stylealign: --otlp-endpoint: {e:#}"));
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            client::err_line(format_args!("stylealign: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => stylealign::serve::run(a.config()?).await,
            Command::Generate(a) => client::generate::run(a).await,
            Command::Demo(a) => client::demo::run(a).await,
            Command::Loadtest(a) => client::loadtest::run(a).await,
            Command::Bench(a) => stylealign::bench::run(a).await,
        }
    });
    // Work still running (an in-process server, a stream) is not waited for.
    rt.shutdown_background();
    if let Some(t) = traces {
        t.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of standard output went away (`| head`): nothing more to say.
        Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => ExitCode::SUCCESS,
        Err(e) => {
            client::err_line(format_args!("stylealign: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
