//! Stopping inside a step, through the gRPC API: a long step (512² on the CPU) does not hold the
//! worker once its set is stopped — past its deadline, or when its client leaves — and the work
//! queued behind it runs.

mod service_common;

use std::time::{Duration, Instant};

use service_common::*;
use stylealign::client::Identity;
use stylealign::serve::cancel::StopReason;
use stylealign::serve::metrics::Stats;
use stylealign::serve::{ServeConfig, Server};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(600);

async fn big_server() -> Server {
    start(ServeConfig { batching: false, limits: Limits { max_size: 2048, ..test_config().limits }, ..test_config() }).await
}

/// Waits for the stop of a running set with `reason` and returns it.
async fn stop_record(server: &Server, reason: StopReason) -> stylealign::serve::metrics::StopRecord {
    eventually(Duration::from_secs(120), "the stop is recorded", || server.stats().stops().iter().any(|s| s.reason == reason)).await;
    server.stats().stops().into_iter().find(|s| s.reason == reason).unwrap()
}

/// A 512² request with a 5 s deadline (one of its steps takes longer than that here) is stopped
/// inside its step soon after the deadline, and a small request queued behind it is served.
#[test]
fn a_deadline_stops_a_long_step_and_the_request_behind_it_runs() {
    run(LIMIT, || async {
        let server = big_server().await;
        let mut c = connect(&server).await;
        let me = Identity::client("patient");
        let s = session(&mut c, &me, default_patch()).await;
        let deadline = Duration::from_secs(5);
        let t0 = Instant::now();
        let (big, _) = open_until(&mut c, &me, request(&s, &["a", "b"], 512, 30, 1), Some(deadline), is_started).await;
        let (small, _) = open_until(&mut c, &me, request(&s, &["c"], 32, 2, 2), None, is_queued).await;
        let r = finish(big).await;
        assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
        let images = finish(small).await.expect("the small request is served");
        let served = t0.elapsed();
        assert_eq!(images.len(), 1);
        let stop = stop_record(&server, StopReason::Deadline).await;
        eprintln!(
            "deadline {deadline:?}: big set stopped {:?} after its deadline, inside step {} of {}; small request behind it done {served:?} after the big one arrived",
            stop.latency,
            stop.stopped_after_step + 1,
            stop.total_steps
        );
        // Generous bound: an uninterrupted 512² step alone takes longer than the deadline here.
        assert!(stop.latency < Duration::from_secs(5), "stopped {:?} after the deadline", stop.latency);
        assert!(served < deadline + Duration::from_secs(20), "{served:?}");
        assert_eq!(Stats::get(&server.stats().sets_completed), 1, "only the small set completed");
        server.shutdown().await;
    });
}

/// A client that disconnects in the middle of a 512² step frees the worker within a bounded
/// time: the next request runs.
#[test]
fn a_client_leaving_mid_step_frees_the_worker() {
    run(LIMIT, || async {
        let server = big_server().await;
        let mut c = connect(&server).await;
        let me = Identity::client("fickle");
        let s = session(&mut c, &me, default_patch()).await;
        let (big, seen) = open_until(&mut c, &me, request(&s, &["a", "b"], 512, 30, 1), None, is_started).await;
        assert!(seen.iter().any(is_started));
        // Well inside the first step.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!server.engine().is_idle());
        let left = Instant::now();
        drop(big);
        let stop = stop_record(&server, StopReason::ClientGone).await;
        let small = generate(&mut c, &me, request(&s, &["c"], 32, 2, 2)).await.expect("the next request runs");
        assert_eq!(small.images.len(), 1);
        eprintln!(
            "client left mid-step: set stopped {:?} after the stop request (after step {}); next request done {:?} after the client left",
            stop.latency,
            stop.stopped_after_step,
            left.elapsed()
        );
        assert!(stop.latency < Duration::from_secs(5), "{stop:?}");
        assert!(left.elapsed() < Duration::from_secs(20));
        let metrics = server.render_metrics();
        assert!(metrics.contains("stylealign_stop_seconds_count{reason=\"cancelled\"}"), "{metrics}");
        eventually(Duration::from_secs(10), "idle", || server.engine().is_idle()).await;
        server.shutdown().await;
    });
}

/// Several small requests while big requests with short deadlines keep arriving: the small ones
/// are all served (prints their latency percentiles).
#[test]
fn small_requests_keep_flowing_while_big_ones_time_out() {
    run(LIMIT, || async {
        let server = big_server().await;
        let mut c = connect(&server).await;
        let me = Identity::client("mixer");
        let s = session(&mut c, &me, default_patch()).await;
        let mut bigs = Vec::new();
        let mut lat = Vec::new();
        for i in 0..6u64 {
            let mut cb = c.clone();
            let (me2, s2) = (me.clone(), s.clone());
            bigs.push(tokio::spawn(async move {
                stylealign::client::generate(
                    &mut cb,
                    &me2,
                    request(&s2, &["x", "y"], 512, 30, 100 + i),
                    Some(Duration::from_secs(2)),
                    |_| {},
                )
                .await
            }));
            let t = Instant::now();
            let r = generate(&mut c, &me, request(&s, &["c"], 32, 2, i)).await.expect("small request served");
            assert_eq!(r.images.len(), 1);
            lat.push(t.elapsed());
        }
        for b in bigs {
            assert_eq!(b.await.unwrap().unwrap_err().code(), Code::DeadlineExceeded);
        }
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
        eprintln!("small requests behind big ones with 2 s deadlines: p50 {:?}, p99 {:?} ({} requests)", pct(0.5), pct(0.99), lat.len());
        assert!(pct(0.99) < Duration::from_secs(30));
        server.shutdown().await;
    });
}
