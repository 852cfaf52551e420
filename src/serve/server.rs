//! The gRPC server: the `stylealign.v1.StyleAlign` service, `grpc.health.v1`, server reflection
//! (v1 and v1alpha), gRPC-Web for browsers and the playground page on the API port, the admin
//! HTTP listener (`/metrics`, `/healthz`, plaintext gRPC health) and the drain on shutdown.
//!
//! Life cycle ([`Server`]):
//! 1. [`Server::bind`]: listeners up, health NOT_SERVING, every StyleAlign call UNAVAILABLE.
//! 2. [`Server::load`]: models loaded on blocking threads, one warm-up step per model and device,
//!    workers started; health SERVING.
//! 3. [`Server::shutdown`] (SIGTERM): health NOT_SERVING, new calls UNAVAILABLE, queued and
//!    running work finishes up to the drain timeout; then the [`Engine`] cuts it off (stopped
//!    within a step, or inside it: UNAVAILABLE), the listeners close and the workers are joined,
//!    each wait bounded, so the process exits soon after the drain deadline whatever a worker
//!    is doing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use super::admission::Admission;
use super::config::ServeConfig;
use super::convert::{self};
use super::engine::Engine;
use super::errors::{self, Reason};
use super::layers;
use super::metrics::{self as m, Stats};
use super::pb;
use super::pb::style_align_server::StyleAlignServer;
use super::pool::{self, PoolDevice};
use super::queue::BatchPolicy;
use super::session::{SessionSecret, SessionStore};
use crate::device::DeviceSpec;

use super::loading::{Loaded, load_all};
use super::service::{DRAINING, LOADING, SERVING, STOPPED};
pub use super::service::{ModelEntry, SERVICE_NAME, Service, State, code_name, parse_grpc_timeout};

/// A running server (see the module docs for its life cycle).
pub struct Server {
    state: Arc<State>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl Server {
    /// Binds the listeners and starts serving: health NOT_SERVING until [`load`](Self::load).
    pub async fn bind(cfg: ServeConfig) -> anyhow::Result<Self> {
        cfg.check().map_err(anyhow::Error::msg)?;
        let metrics = m::install();
        let (health, health_svc) = tonic_health::server::health_reporter();
        let session_secret = match &cfg.session_secret {
            Some(s) => {
                tracing::info!(fingerprint = %s.fingerprint(), max_lifetime_s = cfg.max_session_lifetime.as_secs(), "session tokens signed with the configured secret (replicas sharing it accept each other's sessions)");
                s.clone()
            }
            None => {
                let s = SessionSecret::random();
                tracing::warn!(
                    fingerprint = %s.fingerprint(),
                    "no session secret configured (--session-secret-file / STYLEALIGN_SESSION_SECRET): generated a random one; session ids do not survive a restart and other replicas refuse them"
                );
                s
            }
        };
        let stats = Arc::new(Stats::default());
        let state = Arc::new(State {
            limits: cfg.limits.clone(),
            models: RwLock::new(BTreeMap::new()),
            controlnets: RwLock::new(BTreeMap::new()),
            loras: std::sync::OnceLock::new(),
            sessions: SessionStore::with_secret(
                cfg.session_ttl,
                cfg.max_sessions_per_client,
                cfg.max_sessions,
                session_secret,
                cfg.max_session_lifetime,
            ),
            engine: Engine::new(
                cfg.max_queue,
                BatchPolicy { batching: cfg.batching, max_rows: cfg.max_batch_rows, max_delay: cfg.max_batch_delay },
                stats.clone(),
            ),
            stats,
            health,
            phase: AtomicU8::new(LOADING),
            active_streams: AtomicUsize::new(0),
            admission: std::sync::OnceLock::new(),
            cfg,
        });
        state.set_health(ServingStatus::NotServing).await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("reflection v1alpha")?;

        let listener = tokio::net::TcpListener::bind(state.cfg.listen)
            .await
            .with_context(|| format!("binding the gRPC listener {}", state.cfg.listen))?;
        let addr = listener.local_addr()?;
        let tls = match &state.cfg.tls {
            Some(files) => Some(Arc::new(super::tls::TlsReloader::new(files.clone())?)),
            None => None,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let signal = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let mut tasks = Vec::new();
        let svc = Service { state: state.clone() };
        let t = state.cfg.transport.clone();
        // One router on the API port: the gRPC services (HTTP/2 gRPC, and gRPC-Web over HTTP/1.1
        // or HTTP/2 for browsers) merged with plain HTTP routes (JSON, the playground). The
        // gRPC-Web layer wraps the gRPC services only: it refuses every plain HTTP/1.1 request.
        let grpc_services = tonic::service::Routes::new(StyleAlignServer::new(svc.clone()).max_decoding_message_size(t.max_message_bytes))
            .add_service(health_svc)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .into_axum_router()
            .reset_fallback()
            .layer(tonic_web::GrpcWebLayer::new());
        let mut api = grpc_services.merge(super::http::router(svc, super::http::max_body_bytes(t.max_message_bytes)));
        if state.cfg.playground {
            api = api.merge(super::playground::router());
        }
        // The middleware (src/serve/layers.rs), outermost last.
        let limits = layers::UnaryLimits::new(t.max_concurrent_unary, t.unary_timeout, t.max_message_bytes);
        let auth = state.cfg.auth.clone().map(Arc::new);
        let api = api
            .fallback(api_fallback)
            .layer(axum::middleware::from_fn_with_state(limits, layers::limit_unary))
            .layer(axum::middleware::from_fn_with_state(auth, layers::identify))
            .layer(axum::middleware::from_fn(layers::track))
            .layer(axum::middleware::from_fn(layers::trace));
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(t.http2_keepalive_interval)
            .http2_keepalive_timeout(Some(t.http2_keepalive_timeout))
            .max_concurrent_streams(t.max_concurrent_streams)
            .accept_http1(true)
            .add_routes(tonic::service::Routes::from(api))
            .serve_with_incoming_shutdown(
                super::conn::incoming(listener, tls, t.idle_timeout, shutdown_rx.clone()),
                signal(shutdown_rx.clone()),
            );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = grpc.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));

        let admin_addr = match state.cfg.admin_listen {
            Some(a) => {
                let listener = tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding the admin listener {a}"))?;
                let admin_addr = listener.local_addr()?;
                let health_svc = tonic_health::pb::health_server::HealthServer::new(
                    tonic_health::server::HealthService::from_health_reporter(state.health.clone()),
                );
                let handle = metrics.clone();
                let st = state.clone();
                // Reflection lists the health service (`grpcurl … list`, `describe`).
                let admin_reflection = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1()
                    .context("admin reflection v1")?;
                let admin_reflection_v1alpha = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1alpha()
                    .context("admin reflection v1alpha")?;
                let router = tonic::service::Routes::new(health_svc)
                    .add_service(admin_reflection)
                    .add_service(admin_reflection_v1alpha)
                    .into_axum_router()
                    .route(
                        "/metrics",
                        axum::routing::get(move || {
                            m::update_process_memory();
                            std::future::ready(handle.render())
                        }),
                    )
                    .route(
                        "/healthz",
                        axum::routing::get(move || {
                            let phase = st.phase();
                            std::future::ready(match phase {
                                SERVING => (axum::http::StatusCode::OK, "SERVING\n"),
                                _ => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n"),
                            })
                        }),
                    );
                let admin = tonic::transport::Server::builder()
                    .trace_fn(|req| tracing::debug_span!("admin", path = %req.uri().path()))
                    .accept_http1(true)
                    .add_routes(tonic::service::Routes::from(router))
                    .serve_with_incoming_shutdown(incoming(listener), signal(shutdown_rx.clone()));
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = admin.await {
                        tracing::error!(error = %e, "admin server failed");
                    }
                }));
                Some(admin_addr)
            }
            None => None,
        };

        // Upkeep: histograms, the session sweep, gauges.
        let st = state.clone();
        let handle = metrics.clone();
        let mut rx = shutdown_rx.clone();
        let sweep_every = (st.cfg.session_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every.min(Duration::from_secs(5)));
            let mut last_sweep = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.wait_for(|v| *v) => break,
                }
                handle.run_upkeep();
                if last_sweep.elapsed() >= sweep_every {
                    last_sweep = Instant::now();
                    let n = st.sessions.sweep();
                    if n > 0 {
                        tracing::info!(expired = n, "sessions expired");
                    }
                }
                st.update_session_gauge();
                metrics::gauge!(m::QUEUE_DEPTH).set(st.engine.depth() as f64);
            }
        }));
        let scheme = if state.cfg.tls.is_some() { "https" } else { "http" };
        let playground = if state.cfg.playground { format!("{scheme}://{addr}/") } else { "off".into() };
        let tls = match &state.cfg.tls {
            Some(f) if f.client_ca.is_some() => "mTLS",
            Some(_) => "TLS",
            None => "off",
        };
        tracing::info!(%addr, admin = ?admin_addr, %playground, tls, "listening (NOT_SERVING until the models are loaded and warm)");
        Ok(Self { state, addr, admin_addr, shutdown, tasks: Mutex::new(tasks), metrics })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.state.stats
    }

    /// The serving core: queue, workers, stop tokens.
    pub fn engine(&self) -> &Engine {
        &self.state.engine
    }

    /// The Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    pub fn is_serving(&self) -> bool {
        self.state.phase() == SERVING
    }

    /// Loads the models on every device, runs one warm-up step of each, starts the workers and
    /// reports SERVING.
    pub async fn load(&self) -> anyhow::Result<()> {
        let st = self.state.clone();
        let cfg = st.cfg.clone();
        let loaded: Vec<Loaded> = tokio::task::spawn_blocking(move || load_all(&cfg)).await.context("model loading panicked")??;
        {
            let mut models = st.models.write().unwrap_or_else(|p| p.into_inner());
            for e in &loaded[0].entries {
                models.insert(e.name.clone(), e.clone());
            }
            let mut nets = st.controlnets.write().unwrap_or_else(|p| p.into_inner());
            for e in &loaded[0].controlnets {
                nets.insert(e.name.clone(), e.clone());
            }
        }
        // Each device's memory budget, now that the models are resident: a GPU's from its free
        // memory; the host's (CPU, and GPUs that report none) shared by every worker using it.
        let workers_of = |spec: &DeviceSpec| if *spec == DeviceSpec::Cpu { st.cfg.cpu_workers } else { 1 };
        let reports: Vec<_> = loaded.iter().map(|l| crate::device_memory::report(&l.spec, &l.device)).collect();
        let host_workers: usize =
            loaded.iter().zip(&reports).filter(|(_, r)| r.free.is_none()).map(|(l, _)| workers_of(&l.spec)).sum::<usize>().max(1);
        let labels = pool::labels(&loaded.iter().map(|l| l.spec.clone()).collect::<Vec<_>>());
        let mut devices = Vec::new();
        for ((l, mem), label) in loaded.iter().zip(&reports).zip(labels) {
            let sharing = if mem.free.is_some() { workers_of(&l.spec) } else { host_workers };
            let adm = Arc::new(Admission::for_device(st.cfg.memory_budget, sharing, &l.spec, mem));
            tracing::info!(
                device = %label,
                budget_bytes = adm.budget(),
                request_limit_bytes = adm.request_limit(),
                reference_pool_bytes = adm.reference_pool(),
                source = adm.source(),
                "memory budget"
            );
            let costs = l.models.pipelines.iter().map(|(n, p)| (n.clone(), p.cost_model())).collect();
            devices.push(Arc::new(PoolDevice::new(label, l.spec.clone(), l.device.clone(), adm, st.cfg.max_batch_rows, costs)));
        }
        // Admission: a request must fit the largest device (each device's worker caps its batches).
        let largest = devices.iter().max_by_key(|d| d.admission.request_limit()).map(|d| d.admission.clone());
        let adm = st.admission.get_or_init(|| largest.unwrap_or_else(|| Arc::new(Admission::configure(st.cfg.memory_budget, 1))));
        tracing::info!(
            budget_bytes = adm.budget(),
            request_limit_bytes = adm.request_limit(),
            reference_pool_bytes = adm.reference_pool(),
            source = adm.source(),
            "admission budget (the largest device's)"
        );
        // The LoRA folder, checked against every served model (headers only).
        let library = match st.cfg.lora_dir.clone() {
            Some(dir) => {
                let served: Vec<(String, crate::pipeline::Pipeline)> =
                    loaded[0].entries.iter().map(|e| (e.name.to_string(), e.pipeline.clone())).collect();
                let budget = st.cfg.lora_cache_bytes;
                let lib = tokio::task::spawn_blocking(move || super::loras::LoraLibrary::open(&dir, &served, budget))
                    .await
                    .context("LoRA folder scan panicked")??;
                let lib = Arc::new(lib);
                tracing::info!(loras = ?lib.names(), cache_budget_bytes = lib.budget(), "LoRAs");
                let _ = st.loras.set(lib.clone());
                Some(lib)
            }
            None => None,
        };
        let caps_at: Vec<(Arc<str>, usize, usize)> =
            loaded[0].entries.iter().map(|e| (e.name.clone(), e.native_size, st.cfg.limits.default_steps)).collect();
        for (Loaded { spec, mut models, .. }, device) in loaded.into_iter().zip(devices) {
            models.loras = library.clone();
            device.publish(&caps_at);
            st.engine.add_device(device, models, workers_of(&spec)).context("spawning a worker thread")?;
        }
        if st.phase.compare_exchange(LOADING, SERVING, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            st.set_health(ServingStatus::Serving).await;
            tracing::info!(models = ?st.model_names(), controlnets = ?st.controlnet_names(), "SERVING");
        }
        Ok(())
    }

    /// Starts draining: health NOT_SERVING, new calls UNAVAILABLE, the queue refuses new work.
    pub async fn begin_drain(&self) {
        let st = &self.state;
        if st.phase.swap(DRAINING, Ordering::SeqCst) >= DRAINING {
            return;
        }
        st.set_health(ServingStatus::NotServing).await;
        st.engine.close();
        tracing::info!(
            queued = st.engine.depth(),
            running = st.engine.running(),
            timeout_s = st.cfg.drain_timeout.as_secs_f64(),
            "draining"
        );
    }

    /// Drains (see [`begin_drain`](Self::begin_drain)), waits for queued and running work up to
    /// the drain timeout, then cuts it off, and closes the listeners. Every wait after the drain
    /// deadline is bounded: it returns within [`SHUTDOWN_SLACK`] of it, whatever a worker does.
    pub async fn shutdown(&self) {
        self.begin_drain().await;
        let st = self.state.clone();
        let drain_end = Instant::now() + st.cfg.drain_timeout;
        let hard_end = drain_end + SHUTDOWN_SLACK;
        // The slack is shared out: cut-off work stopping, streams' last messages, listeners, workers.
        let part = |share: u32| (Instant::now() + SHUTDOWN_SLACK * share / 8).min(hard_end);
        if !st.engine.drain(drain_end).await {
            let stopped = st.engine.cut_off();
            tracing::warn!(
                stopped,
                queued = st.engine.depth(),
                running = st.engine.running(),
                "drain timeout: cutting off the remaining work"
            );
            if !st.engine.drain(part(3)).await {
                let n = st.engine.abandon();
                tracing::warn!(jobs = n, "work still running after the cut-off (a step that cannot be interrupted): answered UNAVAILABLE");
            }
        }
        // Let the streams deliver their last messages.
        wait_until(part(2), || st.active_streams.load(Ordering::SeqCst) == 0).await;
        st.phase.store(STOPPED, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let tasks_end = part(2);
        for t in tasks {
            // Long-lived calls (health Watch) would hold a graceful shutdown forever.
            let abort = t.abort_handle();
            if tokio::time::timeout_at(tasks_end.into(), t).await.is_err() {
                abort.abort();
            }
        }
        let engine = st.engine.clone();
        let left = hard_end.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        let joined = tokio::task::spawn_blocking(move || engine.join_workers(left)).await.unwrap_or(false);
        if !joined {
            tracing::warn!("a worker is still inside an operation that cannot be interrupted: exiting without it");
        }
        tracing::info!("stopped");
    }
}

/// How long [`Server::shutdown`] may take after the drain deadline.
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

/// Unknown paths on the API port: UNIMPLEMENTED for gRPC and gRPC-Web calls (in the caller's
/// content type), 404 for plain HTTP.
async fn api_fallback(req: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let Some(content_type) = layers::grpc_content_type(req.headers()) else {
        return (axum::http::StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let path = convert::bounded(req.uri().path()).into_owned();
    layers::status_response(errors::error(Reason::UnknownMethod, format!("unknown method {path}")), Some(&content_type))
}

/// Accepted connections with TCP_NODELAY: without it, a response whose message exceeds h2's
/// 256-byte copy threshold (a `Session` with its token) goes out in two writes, and Nagle's
/// algorithm holds the second until the client's delayed ACK (~40 ms per call).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn wait_until(end: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the server until SIGTERM / SIGINT, then drains and returns (exit 0).
pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let server = Server::bind(cfg).await?;
    println!(
        "stylealign: gRPC on {}{}",
        server.addr(),
        server.admin_addr().map(|a| format!(", admin (metrics, health) on {a}")).unwrap_or_default()
    );
    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        r = server.load() => r?,
        _ = &mut signal => {
            tracing::info!("signal during loading: stopping");
            server.shutdown().await;
            return Ok(());
        }
    }
    signal.await;
    server.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
