//! Hostile input that is echoed back: a megabyte model name, session id or JSON enum value gets a
//! short, clear error naming the field (the quoted input cut to 1 KiB), never a reply that repeats
//! the whole input.

mod service_common;

use std::io::{Read, Write};
use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::serve::pb;
use tonic::Code;

/// Room for the fixed part of a message around the quoted (≤ 1 KiB) input.
const MAX_MESSAGE: usize = 1024 + 512;

#[test]
fn huge_echoed_values_come_back_short_and_name_the_field() {
    run(Duration::from_secs(60), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("hostile");
        let huge = "m".repeat(1 << 20);

        let e = c
            .patch_model(me.request(pb::PatchModelRequest { model: huge.clone(), ..Default::default() }, None))
            .await
            .expect_err("an unknown model");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("`model`"), "names the field: {}", &e.message()[..200]);
        assert!(e.message().len() <= MAX_MESSAGE, "{} bytes of message", e.message().len());
        assert!(
            e.message().contains(&format!("({} bytes in all)", huge.len())),
            "says how long the input was: {}",
            &e.message()[e.message().len().saturating_sub(200)..]
        );
        assert!(e.message().ends_with("loaded models: tiny"), "the rest of the message stays: {}", &e.message()[1000..]);

        let e = c.get_session(me.request(pb::GetSessionRequest { session_id: huge.clone() }, None)).await.expect_err("no such session");
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().len() <= MAX_MESSAGE, "{} bytes of message", e.message().len());

        // HTTP/JSON: an unknown enum name is quoted by the JSON error.
        let body = format!("{{\"model\":\"tiny\",\"shareNorm\":\"{}\"}}", "x".repeat(100_000));
        let (status, reply) = post(server.addr(), "/v1/sessions", &body);
        assert_eq!(status, 400, "{}", &reply[..reply.len().min(300)]);
        assert!(reply.contains("shareNorm"), "names the field: {}", &reply[..reply.len().min(300)]);
        // The message and the BadRequest field violation each quote at most 1 KiB of it.
        assert!(reply.len() <= 3 * 1024, "{} bytes of reply", reply.len());

        // The server is still there.
        c.list_models(me.request(pb::ListModelsRequest {}, None)).await.expect("still serving");
    });
}

/// One HTTP/1.1 POST with `Connection: close`; the status and the body.
fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nx-client-id: hostile\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.as_bytes())).expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the reply");
    let status = reply.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
