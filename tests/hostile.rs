//! The hostile-input suite: what an attacker or a careless client sends. Every answer must be the
//! right status within a bounded time, nothing accepted may be lost, and the server must stay up
//! and SERVING with no panic in its log (the runner of `service_common` fails a test on any
//! panic). Scenarios that need a spawned binary or their own limits live beside their features
//! (TLS, message sizes, idle connections, decode bombs, SIGTERM during a long step).

mod service_common;

use std::future::Future;
use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::sampling::sampler::SamplerKind;
use stylealign::serve::pb::style_align_client::StyleAlignClient;
use stylealign::serve::{SERVICE_NAME, ServeConfig, Server, Tokens, pb};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const LIMIT: Duration = Duration::from_secs(240);
/// The longest any refusal may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Awaits `call`, failing the test when it takes longer than [`ANSWER_WITHIN`].
async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(ANSWER_WITHIN, call).await.unwrap_or_else(|_| panic!("{what}: no answer within {ANSWER_WITHIN:?}"))
}

fn expect_code<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(s.message().contains(needle), "{what}: {:?} should mention {needle:?}", s.message());
            assert!(s.message().len() <= 2048, "{what}: a {}-byte message", s.message().len());
        }
    }
}

/// Health SERVING and a call answered: the server survived.
async fn still_serving(server: &Server, c: &mut StyleAlignClient<Channel>, who: &Identity) {
    let ch = Channel::from_shared(format!("http://{}", server.addr())).unwrap().connect().await.expect("connect for health");
    let st = HealthClient::new(ch).check(HealthCheckRequest { service: SERVICE_NAME.into() }).await.expect("health").into_inner().status();
    assert_eq!(st, ServingStatus::Serving);
    bounded("ListModels", c.list_models(who.request(pb::ListModelsRequest {}, None))).await.expect("ListModels");
}

/// Generate with every field given a bad value in turn: INVALID_ARGUMENT naming that field.
#[test]
fn every_generate_field_refuses_its_bad_values() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("fields");
        let s = session(&mut c, &me, default_patch()).await;
        let ok = request(&s, &["a cat", "a dog"], 32, 2, 1);
        let png = {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, 8, 8);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.write_header().unwrap().write_image_data(&[128; 8 * 8 * 3]).unwrap();
            out
        };
        let with_ref = |f: &dyn Fn(&mut pb::GenerateRequest)| {
            let mut r = pb::GenerateRequest { reference_image: png.clone(), reference_caption: "a photo".into(), ..ok.clone() };
            f(&mut r);
            r
        };
        let long = "x".repeat(5000);
        type Case = (&'static str, Box<dyn Fn(&mut pb::GenerateRequest)>);
        let cases: Vec<Case> = vec![
            ("prompts", Box::new(|r| r.prompts.clear())),
            ("prompts", Box::new(|r| r.prompts = vec!["p".into(); 100])),
            ("prompts[1]", Box::new(|r| r.prompts[1] = "x".repeat(5000))),
            ("count", Box::new(|r| r.count = 3)),
            ("count", Box::new(|r| (r.prompts, r.count) = (vec!["p".into()], 10_000))),
            ("negative_prompt", Box::new(move |r| r.negative_prompt = long.clone())),
            ("steps", Box::new(|r| r.steps = 100_000)),
            ("guidance_scale", Box::new(|r| r.guidance_scale = Some(-1.0))),
            ("guidance_scale", Box::new(|r| r.guidance_scale = Some(f32::NAN))),
            ("guidance_scale", Box::new(|r| r.guidance_scale = Some(f32::INFINITY))),
            ("width", Box::new(|r| r.width = 33)),
            ("width", Box::new(|r| r.width = u32::MAX)),
            ("height", Box::new(|r| r.height = 1_000_000)),
            ("sampler", Box::new(|r| r.sampler = 99)),
            ("priority", Box::new(|r| r.priority = -5)),
            ("reference_caption", Box::new(|r| r.reference_caption = "only with an image".into())),
            ("reference_offset", Box::new(|r| r.reference_offset = 1)),
            ("reference_guidance_scale", Box::new(|r| r.reference_guidance_scale = Some(1.0))),
            ("size_conditioning", Box::new(|r| r.size_conditioning = Some(Default::default()))),
        ];
        for (field, mutate) in &cases {
            let mut r = ok.clone();
            mutate(&mut r);
            let got = bounded(field, c.generate(me.request(r, None))).await.map(|_| ());
            expect_code(field, got, Code::InvalidArgument, &format!("`{field}"));
        }
        let ref_cases: Vec<Case> = vec![
            ("reference_image", Box::new(|r| r.reference_image = b"not an image at all".to_vec())),
            ("reference_image", Box::new(|r| r.reference_image.truncate(40))),
            ("reference_caption", Box::new(|r| r.reference_caption.clear())),
            ("reference_offset", Box::new(|r| r.reference_offset = 50)),
            ("reference_guidance_scale", Box::new(|r| r.reference_guidance_scale = Some(f32::NAN))),
            ("sampler", Box::new(|r| r.sampler = pb::Sampler::EulerA as i32)),
        ];
        for (field, mutate) in &ref_cases {
            let got = bounded(field, c.generate(me.request(with_ref(mutate.as_ref()), None))).await.map(|_| ());
            expect_code(field, got, Code::InvalidArgument, &format!("`{field}"));
        }
        let got =
            bounded("session_id", c.generate(me.request(pb::GenerateRequest { session_id: String::new(), ..ok.clone() }, None))).await;
        expect_code("session_id", got.map(|_| ()), Code::InvalidArgument, "session_id");
        still_serving(&server, &mut c, &me).await;
        // Nothing bad was queued: the queue saw no job.
        assert_eq!(server.stats().sets_completed.load(std::sync::atomic::Ordering::Relaxed), 0);
    });
}

/// Forged session ids (garbage, altered, signed with another secret, huge) are NOT_FOUND; forged
/// bearer tokens are UNAUTHENTICATED; none of them costs more than a moment.
#[test]
fn forged_ids_and_tokens_are_refused() {
    run(LIMIT, || async {
        let tokens = Tokens::parse("alice=alice-token-0123456789").unwrap();
        let server = start(ServeConfig { auth: Some(tokens), ..test_config() }).await;
        let mut c = connect(&server).await;
        let alice = Identity { token: Some("alice-token-0123456789".into()), client_id: None };
        let real = session(&mut c, &alice, default_patch()).await;

        let other = stylealign::serve::session::SessionSecret::random();
        let claims = other
            .verify(&other.sign(&stylealign::serve::session::Claims {
                id: stylealign::serve::session::random_id(),
                model: "tiny".into(),
                patch: Default::default(),
                scope: Default::default(),
                loras: Vec::new(),
                owner: other.owner_tag("alice"),
                iat: 0,
                idle_ms: 60_000,
                exp: u64::MAX,
            }))
            .unwrap();
        let mut altered = real.clone().into_bytes();
        let mid = altered.len() / 2;
        altered[mid] = if altered[mid] == b'A' { b'B' } else { b'A' };
        let forged = [
            "garbage".to_string(),
            "sa1.".to_string(),
            "sa1..".to_string(),
            "sa1.e30.AAAA".to_string(),
            String::from_utf8(altered).unwrap(),
            other.sign(&claims),
            format!("{real}x"),
            "sa1.".to_string() + &"A".repeat(200_000),
        ];
        for id in &forged {
            let what = format!("session id {:?}…", &id[..id.len().min(24)]);
            let r = bounded(&what, c.get_session(alice.request(pb::GetSessionRequest { session_id: id.clone() }, None))).await;
            expect_code(&what, r.map(|_| ()), Code::NotFound, "not found");
            let r = bounded(&what, c.generate(alice.request(request(id, &["a"], 32, 2, 1), None))).await;
            expect_code(&what, r.map(|_| ()), Code::NotFound, "not found");
        }

        let bearers = [
            "",
            "Bearer",
            "Bearer ",
            "Basic YWxpY2U6cHc=",
            "Bearer alice-token-012345678",
            "bearer x",
            &format!("Bearer {}", "t".repeat(8000)),
        ];
        for b in bearers {
            let what = format!("authorization {:?}", &b[..b.len().min(30)]);
            let mut req = tonic::Request::new(pb::ListModelsRequest {});
            if let Ok(v) = b.parse() {
                req.metadata_mut().insert("authorization", v);
            }
            let r = bounded(&what, c.list_models(req)).await;
            expect_code(&what, r.map(|_| ()), Code::Unauthenticated, "");
        }
        // The real session is untouched.
        bounded("GetSession", c.get_session(alice.request(pb::GetSessionRequest { session_id: real.clone() }, None)))
            .await
            .expect("real session");
        still_serving(&server, &mut c, &alice).await;
    });
}

/// Four times more requests than the queue holds, at once: each is either generated completely or
/// refused at once with RESOURCE_EXHAUSTED; none is lost or cut short.
#[test]
fn bursts_beyond_the_queue_lose_nothing() {
    run(LIMIT, || async {
        let server = start(ServeConfig { max_queue: 4, batching: false, ..test_config() }).await;
        let c = connect(&server).await;
        let me = Identity::client("burst");
        let s = session(&mut c.clone(), &me, default_patch()).await;
        let calls: Vec<_> = (0..16)
            .map(|i| {
                let (mut c, me, req) = (c.clone(), me.clone(), request(&s, &["a", "b"], 32, 2, i));
                tokio::spawn(async move { generate(&mut c, &me, req).await })
            })
            .collect();
        let (mut done, mut refused) = (0, 0);
        for call in calls {
            match call.await.unwrap() {
                Ok(set) => {
                    assert_eq!(set.images.len(), 2, "a complete set");
                    done += 1;
                }
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                    refused += 1;
                }
            }
        }
        assert_eq!(done + refused, 16);
        assert!(done >= 4 && refused >= 1, "{done} done, {refused} refused");
        assert_eq!(server.stats().sets_completed.load(std::sync::atomic::Ordering::Relaxed), done as u64, "every accepted set completed");
        still_serving(&server, &mut c.clone(), &me).await;
    });
}

/// With every sampler: batched requests of which most are cancelled at different moments
/// (queued, first step, mid-run); the rest complete, the server stays up.
#[test]
fn cancel_storms_with_every_sampler() {
    run(LIMIT, || async {
        let server = start(ServeConfig { max_batch_delay: Duration::from_millis(30), ..test_config() }).await;
        let c = connect(&server).await;
        let me = Identity::client("storm");
        let s = session(&mut c.clone(), &me, default_patch()).await;
        for sampler in SamplerKind::ALL {
            let api = stylealign::serve::convert::sampler_to_proto(sampler) as i32;
            let calls: Vec<_> = (0..6u64)
                .map(|i| {
                    let (mut c, me) = (c.clone(), me.clone());
                    let req = pb::GenerateRequest { sampler: api, ..request(&s, &["a", "b"], 32, 6, i) };
                    tokio::spawn(async move {
                        let mut stream = c.generate(me.request(req, None)).await?.into_inner();
                        // Keep 0 and 3; cancel the others after i-1 progress events.
                        let mut progress = 0;
                        let mut images = 0;
                        while let Some(msg) = stream.message().await? {
                            match msg.event {
                                Some(pb::generate_response::Event::Progress(_)) => progress += 1,
                                Some(pb::generate_response::Event::Image(_)) => images += 1,
                                _ => {}
                            }
                            if i % 3 != 0 && progress + 1 >= i as usize {
                                return Ok(None);
                            }
                        }
                        Ok::<_, tonic::Status>(Some(images))
                    })
                })
                .collect();
            for (i, call) in calls.into_iter().enumerate() {
                match call.await.unwrap() {
                    Ok(Some(images)) => assert_eq!(images, 2, "{sampler:?} request {i}"),
                    Ok(None) => assert!(i % 3 != 0, "{sampler:?} request {i} was kept"),
                    Err(s) => panic!("{sampler:?} request {i}: {} {}", s.code(), s.message()),
                }
            }
        }
        still_serving(&server, &mut c.clone(), &me).await;
    });
}

/// Bytes that are not HTTP/2 gRPC, on both ports: each connection is answered or closed within
/// a bounded time, and the server keeps serving.
#[test]
fn garbage_on_the_wire_is_shrugged_off() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("wire");
        let huge_header = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n", "j".repeat(1 << 20));
        let payloads: Vec<Vec<u8>> = vec![
            (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
            b"GET /stylealign.v1.StyleAlign/Generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nabc".to_vec(),
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            huge_header.into_bytes(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00garbage-frame-bytes".to_vec(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        ];
        let mut ports = vec![server.addr()];
        ports.extend(server.admin_addr());
        for addr in ports {
            for (i, p) in payloads.iter().enumerate() {
                let what = format!("payload {i} to {addr}");
                let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
                // The server may close while we still write: that is an answer too.
                let _ = sock.write_all(p).await;
                let _ = sock.shutdown().await;
                let mut sink = Vec::new();
                let read = tokio::time::timeout(Duration::from_secs(15), sock.read_to_end(&mut sink)).await;
                assert!(read.is_ok(), "{what}: the connection was neither answered nor closed");
            }
        }
        still_serving(&server, &mut c, &me).await;
    });
}
