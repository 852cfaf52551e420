//! Hostile input that is echoed back: a megabyte model name or session id gets a short, clear
//! error naming the field (the quoted input cut to 1 KiB), never a reply that repeats the whole
//! input. (The HTTP/JSON twin, a huge JSON enum value, is in `service_http.rs`.)

mod service_common;

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

        // The server is still there.
        c.list_models(me.request(pb::ListModelsRequest {}, None)).await.expect("still serving");
    });
}
