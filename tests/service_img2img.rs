//! img2img targets through the gRPC API and the library: an init image changes its target only
//! (the reference and the other targets keep their pixels), the service's images equal the
//! library's, the parameters record strength and image hash, a set with img2img targets batched
//! with other sets gives the images it gives alone (every sampler), and bad init images or fields
//! are INVALID_ARGUMENT naming the field before anything is queued.

mod service_common;

use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::pipeline::img2img::InitImage;
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::pipeline::{BatchSpec, Image, ReferenceImage, SetSpec};
use stylealign::sampling::sampler::SamplerKind;
use stylealign::serve::pb;

/// A synthetic 40×48 picture: gradients and a square.
fn picture() -> Image {
    let (w, h) = (40usize, 48usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let square = if (10..26).contains(&x) && (14..30).contains(&y) { 230 } else { 20 };
            rgb.extend([square, (x * 6) as u8, (y * 5) as u8]);
        }
    }
    Image { width: w, height: h, rgb }
}

fn init(index: u32, png: &[u8], strength: Option<f32>) -> pb::InitImage {
    pb::InitImage { index, image: png.to_vec(), strength }
}

fn device() -> burn::tensor::Device {
    stylealign::device::open(&stylealign::device::DeviceSpec::Cpu).unwrap()
}

#[test]
fn init_image_changes_its_target_only_and_matches_the_library() {
    run(Duration::from_secs(300), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("img2img-client");
        let s = session(&mut c, &me, default_patch()).await;
        let png = picture().to_png(&[]);
        let plain_req = request(&s, &["a house", "a tree", "a boat"], 32, 6, 7);
        let plain = generate(&mut c, &me, plain_req.clone()).await.expect("plain set");
        let req = pb::GenerateRequest { init_images: vec![init(1, &png, Some(0.5))], ..plain_req };
        let first = generate(&mut c, &me, req.clone()).await.expect("set with an img2img target");
        assert_eq!(first.images.len(), 3);
        let (a, b) = (pngs(&plain.images), pngs(&first.images));
        let pixels = |p: &[u8]| Image::from_png(p).unwrap().0;
        assert_eq!(pixels(&a[0]), pixels(&b[0]), "the reference is unchanged");
        assert_eq!(pixels(&a[2]), pixels(&b[2]), "a target without an init image is unchanged");
        assert_ne!(pixels(&a[1]), pixels(&b[1]), "the img2img target changes");

        let params: serde_json::Value = serde_json::from_str(&first.images[1].parameters).unwrap();
        let rec = &params["init_images"][0];
        assert_eq!((rec["index"].as_u64(), rec["strength"].as_f64()), (Some(1), Some(0.5)));
        assert_eq!(rec["image_sha256"].as_str().unwrap(), stylealign::model::hash::sha256_bytes(&png));
        let (_, chunks) = Image::from_png(&b[1]).unwrap();
        let infotext = chunks.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).unwrap();
        assert!(infotext.contains("Denoising strength: 0.5"), "{infotext}");
        let (_, chunks0) = Image::from_png(&b[0]).unwrap();
        let infotext0 = chunks0.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).unwrap();
        assert!(!infotext0.contains("Denoising strength"), "only the img2img image says so: {infotext0}");

        // The library with the same set (the image fitted to the request size) gives the same pixels.
        let pipe = tiny_pipeline(&device()).unwrap();
        let batch = BatchSpec::patched(32, 6, 7.5, SamplerKind::Ddim);
        let set = SetSpec {
            prompts: vec!["a house".into(), "a tree".into(), "a boat".into()],
            seed: 7,
            init_images: vec![(1, InitImage { image: ReferenceImage::fit(&picture(), 32, 32), strength: 0.5 })],
            ..Default::default()
        };
        let lib = pipe.generate(&batch, &[set], &mut |_, _| vec![true]).unwrap().pop().unwrap().unwrap();
        for (img, want) in b.iter().zip(&lib) {
            assert_eq!(&pixels(img), want, "service image equals the library's");
        }
        let again = generate(&mut c, &me, req).await.unwrap();
        assert_eq!(pngs(&again.images), b, "reproducible");
        server.shutdown().await;
    });
}

#[test]
fn img2img_sets_batched_give_their_images_alone() {
    let dev = device();
    let pipe = tiny_pipeline(&dev).unwrap();
    let fitted = ReferenceImage::fit(&picture(), 32, 32);
    let img2img = SetSpec {
        prompts: vec!["a house".into(), "a tree".into(), "a boat".into()],
        seed: 11,
        init_images: vec![(1, InitImage { image: fitted.clone(), strength: 0.6 }), (2, InitImage { image: fitted.clone(), strength: 0.3 })],
        ..Default::default()
    };
    let plain = SetSpec { prompts: vec!["a hill".into(), "a cat".into()], seed: 12, ..Default::default() };
    let late = SetSpec {
        prompts: vec!["a lake".into(), "a bird".into()],
        seed: 13,
        init_images: vec![(1, InitImage { image: fitted, strength: 1.0 })],
        ..Default::default()
    };
    for sampler in SamplerKind::ALL {
        let batch = BatchSpec::patched(32, 5, 7.0, sampler);
        let all = [plain.clone(), img2img.clone(), late.clone()];
        let together = pipe.generate(&batch, &all, &mut |_, _| vec![true; 3]).unwrap();
        for (k, set) in all.iter().enumerate() {
            let alone = pipe.generate(&batch, std::slice::from_ref(set), &mut |_, _| vec![true]).unwrap().pop().unwrap();
            assert_eq!(together[k], alone, "{}: set {k} batched equals alone", sampler.as_str());
        }
    }
}

#[test]
fn a_control_window_counts_an_img2img_targets_own_steps() {
    let dev = device();
    let pipe = tiny_pipeline(&dev).unwrap();
    let net = std::sync::Arc::new(stylealign::pipeline::tiny::tiny_controlnet(&dev).unwrap());
    let fitted = ReferenceImage::fit(&picture(), 32, 32);
    let batch = BatchSpec::patched(32, 8, 7.0, SamplerKind::Ddim);
    // Strength 0.5 of 8 steps: the target enters at step 4. The window [0, 0.5] lies before that
    // step on the set's schedule, but covers the first half of the target's own 4 steps.
    let set = |controls| SetSpec {
        prompts: vec!["a house".into(), "a tree".into()],
        seed: 21,
        init_images: vec![(1, InitImage { image: fitted.clone(), strength: 0.5 })],
        controls,
        ..Default::default()
    };
    let control =
        |start, end| stylealign::pipeline::ControlSpec { net: net.clone(), images: vec![picture()], conditioning_scale: 1.0, start, end };
    let run = |s: SetSpec| pipe.generate(&batch, &[s], &mut |_, _| vec![true]).unwrap().pop().unwrap().unwrap();
    let plain = run(set(vec![]));
    let early = run(set(vec![control(0.0, 0.5)]));
    assert_eq!(plain[0], early[0], "the reference gets no control");
    assert_ne!(plain[1], early[1], "the window acts on the target's own first steps");
    // The second half of its own steps acts otherwise than the first half.
    let late = run(set(vec![control(0.5, 1.0)]));
    assert_ne!(early[1], late[1]);
}

#[test]
fn bad_init_images_are_invalid_argument_naming_the_field() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("img2img-errors");
        let s = session(&mut c, &me, default_patch()).await;
        let png = picture().to_png(&[]);
        let base = request(&s, &["a", "b", "c"], 32, 10, 1);
        let with = |inits: Vec<pb::InitImage>| pb::GenerateRequest { init_images: inits, ..base.clone() };
        let huge = Image { width: 5000, height: 4000, rgb: vec![0; 5000 * 4000 * 3] }.to_png(&[]);
        let cases: Vec<(pb::GenerateRequest, &str)> = vec![
            (with(vec![init(0, &png, None)]), "`init_images[0].index`"),
            (with(vec![init(3, &png, None)]), "`init_images[0].index`"),
            (with(vec![init(1, &png, None), init(1, &png, None)]), "`init_images[1].index`"),
            (with(vec![init(1, &png, Some(0.0))]), "`init_images[0].strength`"),
            (with(vec![init(1, &png, Some(1.5))]), "`init_images[0].strength`"),
            (with(vec![init(1, &png, Some(f32::NAN))]), "`init_images[0].strength`"),
            (with(vec![init(1, &png, Some(0.05))]), "`init_images[0].strength`"),
            (with(vec![init(2, b"not an image", None)]), "`init_images[0].image`"),
            (with(vec![init(2, &png[..png.len() / 2], None)]), "`init_images[0].image`"),
            (with(vec![init(2, &huge, None)]), "`init_images[0].image`"),
            (with(vec![init(1, &png, None), init(2, b"", None)]), "`init_images[1].image`"),
        ];
        assert_refused_naming_fields(&server, &mut c, &me, cases).await;
        // With a reference image every prompt is a target: index 0 is accepted there.
        let ok = pb::GenerateRequest {
            reference_image: png.clone(),
            reference_caption: "a square".into(),
            init_images: vec![init(0, &png, Some(0.5))],
            ..request(&s, &["a", "b"], 32, 4, 1)
        };
        assert_eq!(generate(&mut c, &me, ok).await.expect("index 0 with a reference image").images.len(), 2);
        server.shutdown().await;
    });
}
