//! A session is a cheap value (model name + StyleAligned options): 1,000 sessions add well under
//! 10 MB of resident memory, measured through the real server (PatchModel over gRPC) and on the
//! store alone. Alone in its test binary so that no other test's allocations blur the numbers.

mod service_common;

use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::serve::ServeConfig;
use stylealign::serve::session::SessionStore;
use stylealign::style_aligned::StyleAligned;

/// Resident set size of this process, in bytes (Linux `/proc/self/status`).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

const MB: f64 = 1024.0 * 1024.0;

#[test]
fn thousand_sessions_add_less_than_10_mb() {
    if rss_bytes().is_none() {
        eprintln!("no /proc/self/status: RSS not measurable here, skipping");
        return;
    }
    run(Duration::from_secs(120), || async {
        let server = start(ServeConfig { max_sessions_per_client: 10_000, ..test_config() }).await;
        let mut c = connect(&server).await;
        // Warm up the connection, the maps and the allocator.
        for k in 0..200 {
            session(&mut c, &Identity::client(&format!("warm-{}", k % 10)), default_patch()).await;
        }
        let before = rss_bytes().unwrap();
        for k in 0..1000 {
            session(&mut c, &Identity::client(&format!("client-{}", k % 50)), default_patch()).await;
        }
        let after = rss_bytes().unwrap();
        assert_eq!(server.state().sessions.len(), 1200);
        let delta = after.saturating_sub(before);
        println!(
            "1,000 sessions through PatchModel: RSS {:.2} MB -> {:.2} MB, +{:.3} MB ({} bytes/session)",
            before as f64 / MB,
            after as f64 / MB,
            delta as f64 / MB,
            delta / 1000
        );
        assert!(delta < 10 * 1024 * 1024, "1,000 sessions added {:.2} MB", delta as f64 / MB);
        server.shutdown().await;
    });

    // The store alone.
    let store = SessionStore::new(Duration::from_secs(600), 10_000, 100_000);
    for k in 0..200 {
        store.create(&format!("warm-{k}"), "tiny", StyleAligned::default()).unwrap();
    }
    let before = rss_bytes().unwrap();
    let sessions: Vec<_> =
        (0..1000).map(|k| store.create(&format!("client-{}", k % 50), "tiny", StyleAligned::default()).unwrap()).collect();
    let after = rss_bytes().unwrap();
    let delta = after.saturating_sub(before);
    println!("1,000 sessions in the store: +{:.3} MB ({} bytes/session)", delta as f64 / MB, delta / 1000);
    assert!(delta < 10 * 1024 * 1024);
    // Cheap clones: a session shares its strings.
    let s2 = sessions[0].clone();
    assert!(std::sync::Arc::ptr_eq(&s2.id, &sessions[0].id));
    assert!(std::mem::size_of_val(&sessions[0]) < 256, "{} bytes", std::mem::size_of_val(&sessions[0]));
}
