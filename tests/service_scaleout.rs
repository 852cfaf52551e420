//! Scale-out: several server processes (the built `stylealign` binary, on 127.0.0.1 with
//! ephemeral ports) sharing a session secret behave as one service for a client that
//! round-robins over them, and a replica killed mid-load loses no request silently.
//!
//! Every process is killed when its handle drops (also when a test fails).

mod service_common;

use std::io::BufReader;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use service_common::*;
use stylealign::client::{self, Identity};
use stylealign::serve::pb;
use stylealign::serve::pb::generate_response::Event;
use stylealign::serve::pb::style_align_client::StyleAlignClient;
use stylealign::serve::session::{Claims, SessionSecret, random_id};
use stylealign::style_aligned::StyleAligned;
use tonic::Code;
use tonic::transport::Channel;

const SECRET: &str = "scale-out-test-secret-0123456789abcdefghijklmnop";
const OTHER_SECRET: &str = "another-deployment-secret-0123456789abcdefghij";

enum Secret<'a> {
    File(&'a std::path::Path),
    Env(&'a str),
}

/// A `stylealign serve` child process.
struct Replica {
    child: Child,
    addr: String,
    _stdout: BufReader<ChildStdout>,
    log: ServerLog,
}

impl Replica {
    /// Starts a server on the tiny model with small limits; returns once its address is known.
    fn spawn(secret: Secret<'_>) -> Replica {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stylealign"));
        // The environment of whoever runs the tests must not configure the children.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("STYLEALIGN_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--default-steps", "3", "--max-size", "256", "--max-batch-delay-ms", "0", "--drain-timeout-secs", "2", "--no-warmup"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match secret {
            Secret::File(p) => cmd.arg("--session-secret-file").arg(p),
            Secret::Env(s) => cmd.env("STYLEALIGN_SESSION_SECRET", s),
        };
        let mut child = cmd.spawn().expect("spawn stylealign serve");
        let (addrs, reader) = read_addresses(&mut child);
        let log = ServerLog::watch(&mut child);
        let addr = addrs[0].to_string();
        Replica { child, addr, _stdout: reader, log }
    }

    /// A client, once the server is SERVING.
    async fn client(&self) -> StyleAlignClient<Channel> {
        let end = Instant::now() + Duration::from_secs(60);
        let mut c = client::connect(&self.addr).await.expect("connect");
        loop {
            match c.list_models(Identity::client("probe").request(pb::ListModelsRequest {}, None)).await {
                Ok(_) => return c,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < end => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(s) => panic!("{} never served: {s}", self.addr),
            }
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.assert_no_panic();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn secret_file(name: &str, secret: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stylealign-scaleout-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("session-secret");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p
}

fn code_of<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Round-robin over replicas, one call each.
struct RoundRobin {
    clients: Vec<StyleAlignClient<Channel>>,
    next: usize,
}

impl RoundRobin {
    fn next(&mut self) -> (usize, &mut StyleAlignClient<Channel>) {
        let i = self.next % self.clients.len();
        self.next += 1;
        (i, &mut self.clients[i])
    }
}

/// PatchModel on replica A, then GetSession and Generate on replica B (a round-robin client):
/// the session works there and gives the same PNG bytes as on A. NOT_FOUND on B for: another
/// client's identity, a token with a flipped signature byte, a token past its hard expiry; and on
/// a replica with another secret. A release reaches only the replica that got it.
#[test]
fn session_from_one_replica_works_on_another() {
    run(Duration::from_secs(180), || async {
        let file = secret_file("rr", SECRET);
        // A reads the secret from a file, B from the environment: the same secret.
        let a = Replica::spawn(Secret::File(&file));
        let b = Replica::spawn(Secret::Env(SECRET));
        let other = Replica::spawn(Secret::Env(OTHER_SECRET));
        let mut rr = RoundRobin { clients: vec![a.client().await, b.client().await], next: 0 };
        let mut c_other = other.client().await;
        let me = Identity::client("alice");
        let patch =
            pb::PatchModelRequest { model: "tiny".into(), share_norm: pb::ShareNorm::Group as i32, scale: Some(0.7), ..Default::default() };

        let (i, c) = rr.next();
        assert_eq!(i, 0);
        let created = c.patch_model(me.request(patch, None)).await.expect("PatchModel on A").into_inner();
        let id = created.session_id.clone();
        assert!(id.starts_with("sa1."), "{id}");

        let (i, c) = rr.next();
        assert_eq!(i, 1);
        let seen =
            c.get_session(me.request(pb::GetSessionRequest { session_id: id.clone() }, None)).await.expect("GetSession on B").into_inner();
        assert_eq!(
            (seen.session_id.as_str(), seen.model.as_str(), &seen.options, &seen.created_at),
            (id.as_str(), "tiny", &created.options, &created.created_at)
        );

        let req = request(&id, &["a lighthouse, linocut print", "a fox, linocut print"], 32, 3, 7);
        let (_, c) = rr.next();
        let on_a = generate(c, &me, req.clone()).await.expect("Generate on A");
        let (_, c) = rr.next();
        let on_b = generate(c, &me, req.clone()).await.expect("Generate on B");
        assert_eq!(on_a.images.len(), 2);
        assert_eq!(pngs(&on_b.images), pngs(&on_a.images), "same request, same PNG bytes on both replicas");
        assert!(on_b.images[1].parameters.contains("\"scale\":0.7"), "the patch travelled: {}", on_b.images[1].parameters);

        // Another client with that id: NOT_FOUND on B (which holds it now) and on A.
        let bob = Identity::client("bob");
        for k in 0..2 {
            let c = &mut rr.clients[k];
            assert_eq!(code_of(c.get_session(bob.request(pb::GetSessionRequest { session_id: id.clone() }, None)).await), Code::NotFound);
            assert_eq!(code_of(generate(c, &bob, req.clone()).await), Code::NotFound);
        }

        // A flipped signature byte.
        let mut forged = id.clone().into_bytes();
        let at = forged.len() - 5;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        for k in [1, 0] {
            let c = &mut rr.clients[k];
            assert_eq!(
                code_of(c.get_session(me.request(pb::GetSessionRequest { session_id: forged.clone() }, None)).await),
                Code::NotFound
            );
            assert_eq!(code_of(generate(c, &me, pb::GenerateRequest { session_id: forged.clone(), ..req.clone() }).await), Code::NotFound);
        }

        // A replica with another secret.
        assert_eq!(code_of(c_other.get_session(me.request(pb::GetSessionRequest { session_id: id.clone() }, None)).await), Code::NotFound);
        assert_eq!(code_of(generate(&mut c_other, &me, req.clone()).await), Code::NotFound);

        // Tokens signed with the deployment's secret: past the hard expiry → NOT_FOUND; a live
        // one (same claims otherwise) works: the expiry is what refuses the first.
        let key = SessionSecret::new(SECRET.as_bytes()).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims = Claims {
            id: random_id(),
            model: "tiny".into(),
            patch: StyleAligned::default(),
            scope: Default::default(),
            loras: Vec::new(),
            owner: key.owner_tag("alice"),
            iat: now - 7200,
            idle_ms: 60_000,
            exp: now - 1,
        };
        let c = &mut rr.clients[1];
        assert_eq!(code_of(c.get_session(me.request(pb::GetSessionRequest { session_id: key.sign(&claims) }, None)).await), Code::NotFound);
        let live = key.sign(&Claims { exp: now + 3600, ..claims });
        assert_eq!(code_of(c.get_session(me.request(pb::GetSessionRequest { session_id: live }, None)).await), Code::Ok);

        // Release on A: gone on A for good; B, which adopted it, keeps it until the hard expiry
        // (documented: releases are not broadcast).
        rr.clients[0].release_session(me.request(pb::ReleaseSessionRequest { session_id: id.clone() }, None)).await.expect("release on A");
        assert_eq!(
            code_of(rr.clients[0].get_session(me.request(pb::GetSessionRequest { session_id: id.clone() }, None)).await),
            Code::NotFound
        );
        assert_eq!(code_of(rr.clients[1].get_session(me.request(pb::GetSessionRequest { session_id: id.clone() }, None)).await), Code::Ok);

        let _ = std::fs::remove_dir_all(file.parent().unwrap());
    });
}

/// How one attempt of a Generate call ended.
#[derive(Debug, Clone, PartialEq)]
enum Attempt {
    /// Every image arrived, then the stream ended OK.
    Completed,
    /// The call was refused before a response (connection refused, UNAVAILABLE): not accepted.
    Refused(Code),
    /// Accepted (response headers came), then the stream ended with this status.
    Failed(Code),
    /// Accepted, then the stream ended *without* an error and without every image: silently
    /// lost. Must never happen.
    Lost { images: usize },
}

/// Transport-level outcomes a client retries on another replica.
fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled)
}

async fn attempt(
    c: &mut StyleAlignClient<Channel>,
    who: &Identity,
    req: pb::GenerateRequest,
    expected: usize,
    in_flight: &AtomicUsize,
) -> Attempt {
    let mut stream = match c.generate(who.request(req, Some(Duration::from_secs(60)))).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Attempt::Refused(s.code()),
    };
    in_flight.fetch_add(1, Ordering::SeqCst);
    let mut images = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if let Some(Event::Image(_)) = m.event {
                    images += 1;
                }
            }
            Ok(None) if images == expected => break Attempt::Completed,
            Ok(None) => break Attempt::Lost { images },
            Err(s) => break Attempt::Failed(s.code()),
        }
    };
    in_flight.fetch_sub(1, Ordering::SeqCst);
    end
}

/// Two replicas under load from clients that alternate between them; one replica is SIGKILLed
/// mid-run. Every accepted request either completed with all its images or ended with an error
/// status (none silently lost), and the retries on the survivor (which adopts the sessions the
/// dead replica created) all succeed.
#[test]
fn replica_killed_during_load_loses_nothing() {
    const CLIENTS: usize = 4;
    const REQUESTS: usize = 8;
    const PROMPTS: usize = 2;
    run(Duration::from_secs(240), || async {
        let mut a = Replica::spawn(Secret::Env(SECRET));
        let b = Replica::spawn(Secret::Env(SECRET));
        let replicas = [a.client().await, b.client().await];
        let completed = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let killed = Arc::new(AtomicBool::new(false));

        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let mut cs = replicas.clone();
            let (completed, in_flight, killed) = (completed.clone(), in_flight.clone(), killed.clone());
            tasks.push(tokio::spawn(async move {
                let who = Identity::client(&format!("client-{i}"));
                // Sessions on alternating replicas (A first for even clients).
                let home = i % 2;
                let session = cs[home].patch_model(who.request(default_patch(), None)).await.expect("PatchModel").into_inner().session_id;
                // (request, replica, outcome) of every attempt.
                let mut log: Vec<(usize, usize, Attempt)> = Vec::new();
                for k in 0..REQUESTS {
                    let prompts: Vec<String> =
                        (0..PROMPTS).map(|p| format!("object {p} of client {i}, request {k}, ink drawing")).collect();
                    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
                    let req = request(&session, &prompts, 32, 6, (i * 100 + k) as u64);
                    let mut target = (i + k) % 2;
                    for _try in 0..4 {
                        let out = attempt(&mut cs[target], &who, req.clone(), PROMPTS, &in_flight[target]).await;
                        let done = out == Attempt::Completed;
                        let retry = match &out {
                            Attempt::Refused(c) | Attempt::Failed(c) => retryable(*c),
                            _ => false,
                        };
                        log.push((k, target, out));
                        if done {
                            completed.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if !retry {
                            break;
                        }
                        target = 1 - target;
                        if !killed.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                log
            }));
        }

        // Kill A a quarter into the run, while a request is in flight on it.
        let t = Instant::now();
        while completed.load(Ordering::SeqCst) < CLIENTS * REQUESTS / 4 || in_flight[0].load(Ordering::SeqCst) == 0 {
            assert!(t.elapsed() < Duration::from_secs(60), "no load on A to kill it under");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let in_flight_at_kill = in_flight[0].load(Ordering::SeqCst);
        a.kill();
        killed.store(true, Ordering::SeqCst);
        let done_at_kill = completed.load(Ordering::SeqCst);

        let mut logs = Vec::new();
        for t in tasks {
            logs.push(t.await.expect("client task"));
        }
        let mut failed_on_a = Vec::new();
        let mut retried_ok = 0;
        for (i, log) in logs.iter().enumerate() {
            for (k, replica, out) in log {
                assert!(!matches!(out, Attempt::Lost { .. }), "client {i} request {k}: silently lost on replica {replica}: {out:?}");
                if let Attempt::Failed(code) | Attempt::Refused(code) = out {
                    assert_eq!(*replica, 0, "client {i} request {k}: failed on the surviving replica: {code:?}");
                    assert!(retryable(*code), "client {i} request {k}: {code:?} is not a transport failure");
                    failed_on_a.push((i, *k, out.clone()));
                }
            }
            for k in 0..REQUESTS {
                let tries: Vec<_> = log.iter().filter(|(kk, _, _)| *kk == k).collect();
                let last = tries.last().expect("attempted");
                assert_eq!(last.2, Attempt::Completed, "client {i} request {k} never completed: {tries:?}");
                if tries.len() > 1 {
                    assert_eq!(last.1, 1, "a retry completes on the survivor");
                    retried_ok += 1;
                }
            }
        }
        let accepted_then_failed = failed_on_a.iter().filter(|(_, _, o)| matches!(o, Attempt::Failed(_))).count();
        println!(
            "killed A after {done_at_kill} completed requests with {in_flight_at_kill} streams in flight on it; {} attempts failed on A ({accepted_then_failed} accepted then ended with a status: {:?}); {retried_ok} requests retried on B, all completed",
            failed_on_a.len(),
            failed_on_a.iter().map(|(_, _, o)| o).collect::<Vec<_>>()
        );
        assert!(accepted_then_failed >= 1, "a stream in flight on A at the kill ends with a status");
        assert!(retried_ok >= accepted_then_failed, "every failed request was retried");
        assert_eq!(completed.load(Ordering::SeqCst), CLIENTS * REQUESTS);
    });
}
