//! ControlNets through the gRPC API: ListModels lists them with the models they fit; a control
//! changes the targets and never the reference; the service's images equal the library's; the
//! images' parameters record the ControlNet, its images and window; controls and img2img combine;
//! bad controls are INVALID_ARGUMENT naming the field before anything is queued.

mod service_common;

use std::sync::Arc;
use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::pipeline::tiny::{tiny_controlnet, tiny_pipeline};
use stylealign::pipeline::{BatchSpec, ControlSpec, Image, SetSpec};
use stylealign::sampling::sampler::SamplerKind;
use stylealign::serve::pb;
use tonic::Code;

/// A synthetic 36×28 edge map: white lines on black.
fn edges() -> Image {
    let (w, h) = (36usize, 28usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let v = if x % 9 == 0 || y == 14 || x == y { 255 } else { 0 };
            rgb.extend([v, v, v]);
        }
    }
    Image { width: w, height: h, rgb }
}

fn control(png: &[u8], scale: Option<f32>) -> pb::Control {
    pb::Control { model: "tiny-controlnet".into(), images: vec![png.to_vec()], conditioning_scale: scale, start: None, end: None }
}

fn device() -> burn::tensor::Device {
    stylealign::device::open(&stylealign::device::DeviceSpec::Cpu).unwrap()
}

#[test]
fn list_models_shows_the_controlnets() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("cn-list");
        let list = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner();
        assert_eq!(list.controlnets.len(), 1, "{:?}", list.controlnets);
        let n = &list.controlnets[0];
        assert_eq!((n.name.as_str(), n.family, n.source.as_str()), ("tiny-controlnet", pb::Family::Sd1 as i32, "<embedded>"));
        assert_eq!(n.models, ["tiny"]);
        assert_eq!(n.hash.len(), 10);
        assert!(n.hash.bytes().all(|b| b.is_ascii_hexdigit()));
        server.shutdown().await;
    });
}

#[test]
fn a_control_changes_the_targets_only_and_matches_the_library() {
    run(Duration::from_secs(300), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("cn-client");
        let s = session(&mut c, &me, default_patch()).await;
        let png = edges().to_png(&[]);
        let plain_req = request(&s, &["a house", "a tree", "a boat"], 32, 6, 9);
        let plain = generate(&mut c, &me, plain_req.clone()).await.expect("plain set");
        let mut ctl = control(&png, Some(0.8));
        ctl.start = Some(0.1);
        ctl.end = Some(0.9);
        let req = pb::GenerateRequest { controls: vec![ctl], ..plain_req };
        let got = generate(&mut c, &me, req.clone()).await.expect("a set with a ControlNet");
        let pixels = |p: &[u8]| Image::from_png(p).unwrap().0;
        let (a, b) = (pngs(&plain.images), pngs(&got.images));
        assert_eq!(pixels(&a[0]), pixels(&b[0]), "the reference gets no control");
        assert_ne!(pixels(&a[1]), pixels(&b[1]), "target 1 is controlled");
        assert_ne!(pixels(&a[2]), pixels(&b[2]), "target 2 is controlled");

        let params: serde_json::Value = serde_json::from_str(&got.images[1].parameters).unwrap();
        let rec = &params["controls"][0];
        assert_eq!(rec["model"], "tiny-controlnet");
        assert_eq!(rec["images_sha256"][0].as_str().unwrap(), stylealign::model::hash::sha256_bytes(&png));
        assert_eq!((rec["conditioning_scale"].as_f64(), rec["start"].as_f64(), rec["end"].as_f64()), (Some(0.8), Some(0.1), Some(0.9)));
        assert_eq!(rec["model_sha256"].as_str().unwrap().len(), 64);
        let text = |p: &[u8]| Image::from_png(p).unwrap().1.into_iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert!(text(&b[1]).contains("ControlNet 0: \"model: tiny-controlnet ["), "{}", text(&b[1]));
        assert!(!text(&b[0]).contains("ControlNet"), "the reference's infotext names no control: {}", text(&b[0]));

        // The library with the same set gives the same pixels.
        let dev = device();
        let pipe = tiny_pipeline(&dev).unwrap();
        let batch = BatchSpec::patched(32, 6, 7.5, SamplerKind::Ddim);
        let set = SetSpec {
            prompts: vec!["a house".into(), "a tree".into(), "a boat".into()],
            seed: 9,
            controls: vec![ControlSpec {
                net: Arc::new(tiny_controlnet(&dev).unwrap()),
                images: vec![stylealign::pipeline::ReferenceImage::fit(&edges(), 32, 32)],
                conditioning_scale: 0.8,
                start: 0.1,
                end: 0.9,
            }],
            ..Default::default()
        };
        let lib = pipe.generate(&batch, &[set], &mut |_, _| vec![true]).unwrap().pop().unwrap().unwrap();
        for (img, want) in b.iter().zip(&lib) {
            assert_eq!(&pixels(img), want, "service image equals the library's");
        }

        // One image per target, and a control with an img2img target, in one request.
        let per_target = pb::GenerateRequest {
            controls: vec![pb::Control { images: vec![png.clone(), png.clone()], ..control(&png, Some(0.8)) }],
            init_images: vec![pb::InitImage { index: 2, image: png.clone(), strength: Some(0.6) }],
            ..request(&s, &["a house", "a tree", "a boat"], 32, 6, 9)
        };
        let both = generate(&mut c, &me, per_target).await.expect("controls with img2img");
        assert_eq!(both.images.len(), 3);
        assert_eq!(pixels(&pngs(&both.images)[0]), pixels(&a[0]), "still the same reference");
        server.shutdown().await;
    });
}

#[test]
fn a_controlnet_of_another_family_is_refused_naming_the_field() {
    run(Duration::from_secs(120), || async {
        use stylealign::serve::config::{ControlNetSource, ModelSource};
        let goldens = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens");
        let cfg = stylealign::serve::config::ServeConfig {
            models: vec![ModelSource::Tiny, ModelSource::Dir(goldens.join("tiny_sdxl_pipe"))],
            controlnets: vec![ControlNetSource::Tiny, ControlNetSource::Path(goldens.join("tiny_controlnet_sdxl"))],
            warmup: false,
            ..test_config()
        };
        let server = start(cfg).await;
        let mut c = connect(&server).await;
        let me = Identity::client("cn-family");
        let list = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner();
        let fits: Vec<(String, i32, Vec<String>)> = list.controlnets.iter().map(|n| (n.name.clone(), n.family, n.models.clone())).collect();
        assert_eq!(
            fits,
            [
                ("tiny-controlnet".to_string(), pb::Family::Sd1 as i32, vec!["tiny".to_string()]),
                ("tiny_controlnet_sdxl".to_string(), pb::Family::Sdxl as i32, vec!["tiny_sdxl_pipe".to_string()]),
            ]
        );
        let s = session(&mut c, &me, default_patch()).await;
        let png = edges().to_png(&[]);
        let req = pb::GenerateRequest {
            controls: vec![pb::Control { model: "tiny_controlnet_sdxl".into(), ..control(&png, None) }],
            ..request(&s, &["a", "b"], 32, 4, 1)
        };
        let err = generate(&mut c, &me, req).await.expect_err("an SDXL ControlNet on an SD1 model");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("`controls[0].model`") && err.message().contains("does not fit"), "{}", err.message());
        server.shutdown().await;
    });
}

#[test]
fn bad_controls_are_invalid_argument_naming_the_field() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("cn-errors");
        let s = session(&mut c, &me, default_patch()).await;
        let png = edges().to_png(&[]);
        let base = request(&s, &["a", "b", "c"], 32, 4, 1);
        let with = |controls: Vec<pb::Control>| pb::GenerateRequest { controls, ..base.clone() };
        let cases: Vec<(pb::GenerateRequest, &str)> = vec![
            (with(vec![pb::Control { model: "depth".into(), ..control(&png, None) }]), "`controls[0].model`"),
            (with(vec![pb::Control { model: String::new(), ..control(&png, None) }]), "`controls[0].model`"),
            (with(vec![pb::Control { images: vec![], ..control(&png, None) }]), "`controls[0].images`"),
            (with(vec![pb::Control { images: vec![png.clone(); 3], ..control(&png, None) }]), "`controls[0].images`"),
            (with(vec![pb::Control { images: vec![b"not an image".to_vec()], ..control(&png, None) }]), "`controls[0].images[0]`"),
            (
                with(vec![control(&png, None), pb::Control { images: vec![png.clone(), vec![]], ..control(&png, None) }]),
                "`controls[1].images[1]`",
            ),
            (with(vec![control(&png, Some(f32::NAN))]), "`controls[0].conditioning_scale`"),
            (with(vec![control(&png, Some(11.0))]), "`controls[0].conditioning_scale`"),
            (with(vec![pb::Control { start: Some(0.6), end: Some(0.4), ..control(&png, None) }]), "`controls[0].end`"),
            (with(vec![pb::Control { start: Some(-0.1), ..control(&png, None) }]), "`controls[0].start`"),
            (with(vec![pb::Control { end: Some(1.5), ..control(&png, None) }]), "`controls[0].end`"),
            (with(vec![control(&png, None); 5]), "`controls`"),
            (
                pb::GenerateRequest { controls: vec![control(&png, None)], ..request(&s, &["only a reference"], 32, 4, 1) },
                "`controls[0].images`",
            ),
        ];
        assert_refused_naming_fields(&server, &mut c, &me, cases).await;
        server.shutdown().await;
    });
}
