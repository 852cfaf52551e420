//! Shared helpers of the service tests: an in-process server on 127.0.0.1 (ephemeral ports) with
//! the embedded tiny model, clients, and request builders.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use stylealign::client::{self, Identity, SetResult};
pub use stylealign::serve::convert::Limits;
use stylealign::serve::pb::generate_response::Event;
use stylealign::serve::pb::style_align_client::StyleAlignClient;
use stylealign::serve::{ServeConfig, Server, pb};
use tonic::transport::Channel;

/// Panics seen by the panic hook of [`run`] (any thread: server tasks, workers, the test).
static PANICS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records every panic of this process in [`PANICS`] (then prints it as usual).
fn watch_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
            PANICS.lock().unwrap_or_else(|p| p.into_inner()).push(format!("thread '{thread}': {info}"));
            previous(info);
        }));
    });
}

/// Tests in one binary run one at a time: several run timing-sensitive scenarios (queue
/// delays, deadlines) that CPU contention from a parallel test would blur.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a test body serially, on a multi-threaded runtime, within `limit`, and fails it when
/// anything panicked meanwhile, even a panic that was caught (a server task, a worker): a panic
/// in a server log is a bug even when the client got a status.
pub fn run<F: Future<Output = ()>>(limit: Duration, body: impl FnOnce() -> F) {
    watch_panics();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let _guard = SERIAL.lock().await;
        PANICS.lock().unwrap_or_else(|p| p.into_inner()).clear();
        tokio::time::timeout(limit, body()).await.expect("test exceeded its time limit");
        let panics = std::mem::take(&mut *PANICS.lock().unwrap_or_else(|p| p.into_inner()));
        assert!(panics.is_empty(), "panics during the test:\n{}", panics.join("\n"));
    });
    drop(rt);
}

/// The standard error of a spawned server, copied to this process's standard error line by
/// line and watched for panics (see [`ServerLog::assert_no_panic`]).
pub struct ServerLog {
    panics: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ServerLog {
    /// Takes the child's piped standard error.
    pub fn watch(child: &mut Child) -> ServerLog {
        let stderr = child.stderr.take().expect("the server's stderr is piped");
        let panics = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = panics.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                if line.contains("panicked at") {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }
        });
        ServerLog { panics, reader: Some(reader) }
    }

    /// After the child has exited (or was killed): reads the rest of its log and fails when it
    /// contains a panic. Does nothing while the test is already failing.
    pub fn assert_no_panic(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let panics = self.panics.lock().unwrap_or_else(|p| p.into_inner());
        if !std::thread::panicking() {
            assert!(panics.is_empty(), "the server panicked:\n{}", panics.join("\n"));
        }
    }
}

/// The addresses a spawned `stylealign serve` prints on its first line ("stylealign: gRPC on
/// ADDR, admin (metrics, health) on ADDR", or "… admin off"), read within 30 s; on a timeout or
/// another line the child is killed and the test fails. The reader is returned so that the pipe
/// stays open for whatever the server prints later.
pub fn read_addresses(child: &mut Child) -> (Vec<SocketAddr>, BufReader<ChildStdout>) {
    let stdout = child.stdout.take().expect("the server's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send((line, r));
    });
    let Ok((line, reader)) = rx.recv_timeout(Duration::from_secs(30)) else {
        let _ = child.kill();
        panic!("the server printed no address within 30 s");
    };
    let addrs: Vec<SocketAddr> = line.split([' ', ',']).filter_map(|w| w.trim().parse().ok()).collect();
    if !line.starts_with("stylealign: gRPC on ") || addrs.is_empty() {
        let _ = child.kill();
        panic!("unexpected first line: {line:?}");
    }
    (addrs, reader)
}

/// The binary with a clean `STYLEALIGN_*` environment (whoever runs the tests must not
/// configure it), warnings-only logs and no standard input.
pub fn stylealign_clean() -> Command {
    let mut cmd = stylealign_command();
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STYLEALIGN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn").stdin(Stdio::null());
    cmd
}

/// Runs [`stylealign_clean`] with `args` to the end, killed (and the test failed) after `limit`.
pub fn run_to_end(args: &[&str], limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = stylealign_clean().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn stylealign");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let end = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            panic!("stylealign {args:?} ran for over {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output { status, stdout: o.join().unwrap(), stderr: e.join().unwrap() }
}

/// The `stylealign` binary under test, as a command to add `serve` flags to.
pub fn stylealign_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stylealign"))
}

/// Starts `cmd` (a `stylealign serve` with its flags and environment) with standard output and
/// error piped: its log watched for panics, the addresses it prints read. The reader is returned
/// so that the pipe stays open.
pub fn spawn_server(cmd: &mut Command) -> (Child, Vec<SocketAddr>, ServerLog, BufReader<ChildStdout>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn stylealign serve");
    let log = ServerLog::watch(&mut child);
    let (addrs, stdout) = read_addresses(&mut child);
    (child, addrs, log, stdout)
}

/// A config for tests: ephemeral ports, small limits, one CPU worker.
pub fn test_config() -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        limits: Limits { default_steps: 3, max_steps: 200, max_size: 256, ..ServeConfig::default().limits },
        max_batch_delay: Duration::from_millis(0),
        drain_timeout: Duration::from_secs(20),
        ..ServeConfig::default()
    }
}

/// Binds and loads a server.
pub async fn start(cfg: ServeConfig) -> Server {
    let s = Server::bind(cfg).await.expect("bind");
    s.load().await.expect("load");
    s
}

pub async fn connect(s: &Server) -> StyleAlignClient<Channel> {
    client::connect(&s.addr().to_string()).await.expect("connect")
}

pub async fn session(c: &mut StyleAlignClient<Channel>, who: &Identity, patch: pb::PatchModelRequest) -> String {
    c.patch_model(who.request(patch, None)).await.expect("PatchModel").into_inner().session_id
}

pub fn default_patch() -> pb::PatchModelRequest {
    pb::PatchModelRequest { model: "tiny".into(), ..Default::default() }
}

/// A small request: `prompts` at `size`², `steps` steps, DDIM, seed.
pub fn request(session: &str, prompts: &[&str], size: u32, steps: u32, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: session.into(),
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        seed: Some(seed),
        steps,
        width: size,
        height: size,
        guidance_scale: Some(7.5),
        ..Default::default()
    }
}

pub async fn generate(c: &mut StyleAlignClient<Channel>, who: &Identity, req: pb::GenerateRequest) -> Result<SetResult, tonic::Status> {
    client::generate(c, who, req, None, |_| {}).await
}

/// Opens a Generate stream and returns it once `until` matches an event (e.g. Started).
pub async fn open_until(
    c: &mut StyleAlignClient<Channel>,
    who: &Identity,
    req: pb::GenerateRequest,
    timeout: Option<Duration>,
    until: impl Fn(&Event) -> bool,
) -> (tonic::Streaming<pb::GenerateResponse>, Vec<Event>) {
    let mut s = c.generate(who.request(req, timeout)).await.expect("Generate").into_inner();
    let mut seen = Vec::new();
    loop {
        let msg = s.message().await.expect("stream error").expect("stream ended early");
        let ev = msg.event.expect("event");
        let done = until(&ev);
        seen.push(ev);
        if done {
            return (s, seen);
        }
    }
}

/// Drains a stream to its end: images, or the final status.
pub async fn finish(mut s: tonic::Streaming<pb::GenerateResponse>) -> Result<Vec<pb::GeneratedImage>, tonic::Status> {
    let mut images = Vec::new();
    while let Some(m) = s.message().await? {
        if let Some(Event::Image(i)) = m.event {
            images.push(i);
        }
    }
    Ok(images)
}

pub fn is_started(e: &Event) -> bool {
    matches!(e, Event::Started(_))
}

pub fn is_queued(e: &Event) -> bool {
    matches!(e, Event::Queued(_))
}

/// The PNG bytes of a set's images.
pub fn pngs(images: &[pb::GeneratedImage]) -> Vec<Vec<u8>> {
    images.iter().map(|i| i.png.clone()).collect()
}

/// Waits until `cond` holds (polling), or panics after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `GET path` over plain HTTP/1.1; returns (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// Sends each request and checks it is INVALID_ARGUMENT with a message naming its field (e.g.
/// "`init_images[0].index`"), and that none of them was queued or run (the batch counter of the
/// server's metrics is unchanged).
pub async fn assert_refused_naming_fields(
    server: &Server,
    c: &mut StyleAlignClient<Channel>,
    who: &Identity,
    cases: Vec<(pb::GenerateRequest, &str)>,
) {
    let batches = |m: &str| m.lines().find(|l| l.starts_with("stylealign_batch_rows_count")).map(str::to_string);
    let admin = server.admin_addr().expect("an admin listener");
    let before = batches(&http_get(admin, "/metrics").await.1);
    for (req, field) in cases {
        let err = generate(c, who, req).await.expect_err("must be rejected");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "message names {field}: {}", err.message());
    }
    let after = batches(&http_get(admin, "/metrics").await.1);
    assert_eq!(before, after, "nothing was queued or run");
}
