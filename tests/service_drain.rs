//! SIGTERM on the real binary: health turns NOT_SERVING, new calls are UNAVAILABLE, queued and
//! running work finishes, then the process exits 0; past the drain deadline, remaining work is
//! stopped (UNAVAILABLE) and the process still exits 0 — also in the middle of a long step.
//! Every test fails if the server's log shows a panic.

mod service_common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use service_common::*;
use stylealign::client::Identity;
use stylealign::serve::SERVICE_NAME;
use stylealign::serve::pb::generate_response::Event;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Proc {
    child: Child,
    api: SocketAddr,
    admin: SocketAddr,
    log: std::path::PathBuf,
}

impl Proc {
    /// Fails the test if the server's log (after it exited) contains a panic.
    fn assert_no_panic(&self) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked at")).collect();
        assert!(panics.is_empty(), "the server panicked:\n{}", panics.join("\n"));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only if a test failed midway: never leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log ({}) ---\n{}", self.log.display(), std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Starts `stylealign serve` on ephemeral ports and reads its addresses from stdout. Its log
/// goes to a file (printed if the test fails), so no pipe of the test runner is held.
fn spawn_server(drain_timeout_secs: u64) -> Proc {
    let log = std::env::temp_dir().join(format!("stylealign-drain-test-{}-{drain_timeout_secs}.log", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_stylealign"))
        .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--drain-timeout-secs"])
        .arg(drain_timeout_secs.to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn stylealign serve");
    let (addrs, _) = read_addresses(&mut child);
    assert_eq!(addrs.len(), 2, "API and admin addresses: {addrs:?}");
    Proc { child, api: addrs[0], admin: addrs[1], log }
}

fn sigterm(p: &Proc) {
    let ok = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status().expect("run kill").success();
    assert!(ok, "kill -TERM failed");
}

async fn status(admin: SocketAddr, service: &str) -> Option<ServingStatus> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{admin}")).ok()?.connect().await.ok()?;
    let r = HealthClient::new(ch).check(HealthCheckRequest { service: service.into() }).await.ok()?;
    Some(r.into_inner().status())
}

async fn wait_serving(p: &Proc) {
    let end = Instant::now() + Duration::from_secs(60);
    while status(p.admin, "").await != Some(ServingStatus::Serving) {
        assert!(Instant::now() < end, "server never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (polling) for the child to exit; its exit code.
async fn wait_exit(p: &mut Proc, limit: Duration) -> i32 {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            return s.code().expect("exited by a signal, not by itself");
        }
        assert!(Instant::now() < end, "server did not exit within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn sigterm_drains_then_exits_zero() {
    run(Duration::from_secs(180), || async {
        let mut p = spawn_server(60);
        wait_serving(&p).await;
        let mut c = stylealign::client::connect(&p.api.to_string()).await.unwrap();
        let me = Identity::client("drainer");
        let s = session(&mut c, &me, default_patch()).await;
        // One running, one queued behind it (different size: not batched with it).
        let (running, _) = open_until(&mut c, &me, request(&s, &["a", "b"], 64, 30, 1), None, |e| matches!(e, Event::Progress(_))).await;
        let (queued, _) = open_until(&mut c, &me, request(&s, &["c"], 32, 5, 2), None, is_queued).await;

        sigterm(&p);
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let st = (status(p.admin, "").await, status(p.admin, SERVICE_NAME).await);
            if st == (Some(ServingStatus::NotServing), Some(ServingStatus::NotServing)) {
                break;
            }
            assert!(Instant::now() < end, "health still {st:?} after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(http_get(p.admin, "/healthz").await.0, 503);
        let refused = generate(&mut c, &me, request(&s, &["d"], 32, 2, 3)).await;
        assert_eq!(refused.unwrap_err().code(), Code::Unavailable);
        let refused = c.patch_model(me.request(default_patch(), None)).await;
        assert_eq!(refused.unwrap_err().code(), Code::Unavailable);

        assert_eq!(finish(running).await.expect("the running request finishes").len(), 2);
        assert_eq!(finish(queued).await.expect("the queued request finishes").len(), 1);
        assert_eq!(wait_exit(&mut p, Duration::from_secs(30)).await, 0);
        p.assert_no_panic();
    });
}

#[test]
fn drain_deadline_stops_remaining_work_and_exits_zero() {
    run(Duration::from_secs(180), || async {
        let mut p = spawn_server(1);
        wait_serving(&p).await;
        let mut c = stylealign::client::connect(&p.api.to_string()).await.unwrap();
        let me = Identity::client("late");
        let s = session(&mut c, &me, default_patch()).await;
        let (running, _) = open_until(&mut c, &me, request(&s, &["a", "b"], 64, 150, 1), None, |e| matches!(e, Event::Progress(_))).await;
        let (queued, _) = open_until(&mut c, &me, request(&s, &["c"], 32, 5, 2), None, is_queued).await;
        let t = Instant::now();
        sigterm(&p);
        let r = finish(running).await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable, "cut off at the drain deadline");
        assert_eq!(finish(queued).await.unwrap_err().code(), Code::Unavailable);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(wait_exit(&mut p, Duration::from_secs(30)).await, 0);
        p.assert_no_panic();
    });
}

/// SIGTERM with a 3 s drain while a 2048² step runs (one such step takes far longer than the
/// drain here): the running client gets UNAVAILABLE and the process exits 0 soon after the drain
/// deadline — the step is cut off inside, between blocks or attention tiles.
#[test]
fn sigterm_during_a_huge_step_exits_zero_soon_after_the_drain_deadline() {
    run(Duration::from_secs(300), || async {
        let mut p = spawn_server(3);
        wait_serving(&p).await;
        let mut c = stylealign::client::connect(&p.api.to_string()).await.unwrap();
        let me = Identity::client("huge");
        let s = session(&mut c, &me, default_patch()).await;
        let (running, _) = open_until(&mut c, &me, request(&s, &["a", "b"], 2048, 30, 1), None, is_started).await;
        // Inside the first step.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = Instant::now();
        sigterm(&p);
        let r = finish(running).await;
        let answered = t.elapsed();
        assert_eq!(r.unwrap_err().code(), Code::Unavailable, "cut off at the drain deadline");
        let code = wait_exit(&mut p, Duration::from_secs(60)).await;
        let exited = t.elapsed();
        eprintln!("SIGTERM with a 3 s drain during a 2048² step: client answered after {answered:?}, process exited after {exited:?}");
        assert_eq!(code, 0);
        // Drain (3 s) + the shutdown's bounded slack (5 s) + margin.
        assert!(exited < Duration::from_secs(15), "exited {exited:?} after SIGTERM");
        p.assert_no_panic();
    });
}
