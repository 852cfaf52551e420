//! The real-image reference mode through the gRPC API: a PNG or JPEG reference gives the same
//! images as the library, the reference is not returned, the inversion is cached per session, and
//! bad images or fields are INVALID_ARGUMENT naming the field before anything is queued.

mod service_common;

use std::time::{Duration, Instant};

use service_common::*;
use stylealign::client::Identity;
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::pipeline::{BatchSpec, Image, ReferenceImage, SetSpec};
use stylealign::sampling::sampler::SamplerKind;
use stylealign::serve::pb;

/// A synthetic 48×40 picture: gradients and a disc.
fn picture() -> Image {
    let (w, h) = (48usize, 40usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let d = ((x as f32 - 30.0).powi(2) + (y as f32 - 18.0).powi(2)).sqrt();
            let disc = if d < 10.0 { 255 } else { 0 };
            rgb.extend([(x * 5) as u8, (y * 6) as u8, disc]);
        }
    }
    Image { width: w, height: h, rgb }
}

fn jpeg(img: &Image) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    image::ImageEncoder::write_image(enc, &img.rgb, img.width as u32, img.height as u32, image::ExtendedColorType::Rgb8).unwrap();
    out
}

fn reference_request(session: &str, bytes: Vec<u8>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        reference_image: bytes,
        reference_caption: "a red disc on a gradient".into(),
        reference_offset: 1,
        ..request(session, &["a house", "a tree"], 32, 4, 7)
    }
}

#[test]
fn reference_image_matches_library_and_is_cached() {
    run(Duration::from_secs(300), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("ref-client");
        let s = session(&mut c, &me, default_patch()).await;
        let png = picture().to_png(&[]);

        let t0 = Instant::now();
        let first = generate(&mut c, &me, reference_request(&s, png.clone())).await.expect("generate with a PNG reference");
        let cold = t0.elapsed();
        assert_eq!(first.images.len(), 2, "the reference image is not returned");
        let params: serde_json::Value = serde_json::from_str(&first.images[0].parameters).unwrap();
        assert_eq!(params["reference"]["caption"], "a red disc on a gradient");
        assert_eq!(params["reference"]["offset"], 1);
        assert_eq!(params["reference"]["image_sha256"].as_str().unwrap().len(), 64);

        // The library, called directly with the same set, gives the same pixels.
        let pipe = tiny_pipeline(&stylealign::device::open(&stylealign::device::DeviceSpec::Cpu).unwrap()).unwrap();
        let batch = BatchSpec::patched(32, 4, 7.5, SamplerKind::Ddim);
        let set = SetSpec {
            prompts: vec!["a house".into(), "a tree".into()],
            negative_prompt: String::new(),
            seed: 7,
            reference: Some(ReferenceImage {
                image: picture(),
                caption: "a red disc on a gradient".into(),
                offset: 1,
                guidance: 2.0,
                scope: "library".into(),
            }),
            ..Default::default()
        };
        let lib = pipe.generate(&batch, &[set], &mut |_, _| vec![true]).unwrap().pop().unwrap().unwrap();
        for (img, want) in first.images.iter().zip(&lib) {
            let (got, _) = Image::from_png(&img.png).unwrap();
            assert_eq!(&got, want, "service image equals the library's");
        }

        // Same session, same image: the inversion comes from the cache; identical bytes.
        let t1 = Instant::now();
        let again = generate(&mut c, &me, reference_request(&s, png.clone())).await.unwrap();
        let warm = t1.elapsed();
        assert_eq!(pngs(&again.images), pngs(&first.images));
        let (_, metrics) = http_get(server.admin_addr().unwrap(), "/metrics").await;
        let value = |name: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(-1.0)
        };
        assert!(value("stylealign_inversion_cache_hits_total") >= 1.0, "a cache hit is counted:\n{metrics}");
        assert!(value("stylealign_inversion_cache_misses_total") >= 1.0);
        println!(
            "reference set (2 images, 4 steps, 32x32): first {:.0} ms (inversion), again {:.0} ms (cached inversion)",
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3
        );

        // The saving at a larger size: 64x64, 20 steps (the inversion runs 20 UNet calls).
        let big = |session: &str| pb::GenerateRequest { width: 64, height: 64, steps: 20, ..reference_request(session, png.clone()) };
        let t2 = Instant::now();
        let a = generate(&mut c, &me, big(&s)).await.unwrap();
        let cold_big = t2.elapsed();
        let t3 = Instant::now();
        let b = generate(&mut c, &me, big(&s)).await.unwrap();
        let warm_big = t3.elapsed();
        assert_eq!(pngs(&a.images), pngs(&b.images));
        let plain = pb::GenerateRequest {
            prompts: vec!["a red disc on a gradient".into(), "a house".into(), "a tree".into()],
            ..request(&s, &[], 64, 20, 7)
        };
        let t4 = Instant::now();
        generate(&mut c, &me, plain).await.unwrap();
        let generated_reference = t4.elapsed();
        println!(
            "reference set (2 images, 20 steps, 64x64): {:.0} ms with inversion, {:.0} ms with the cached inversion; a generated reference (3 rows): {:.0} ms",
            cold_big.as_secs_f64() * 1e3,
            warm_big.as_secs_f64() * 1e3,
            generated_reference.as_secs_f64() * 1e3
        );

        // A JPEG works too (different pixels after JPEG compression, so a different set).
        let j = generate(&mut c, &me, reference_request(&s, jpeg(&picture()))).await.expect("JPEG reference");
        assert_eq!(j.images.len(), 2);
        server.shutdown().await;
    });
}

#[test]
fn bad_reference_fields_are_invalid_argument() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("ref-errors");
        let s = session(&mut c, &me, default_patch()).await;
        let png = picture().to_png(&[]);
        let cases: Vec<(pb::GenerateRequest, &str)> = vec![
            (reference_request(&s, b"not an image at all".to_vec()), "`reference_image`"),
            (reference_request(&s, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec()), "`reference_image`"),
            (reference_request(&s, png[..png.len() / 2].to_vec()), "`reference_image`"),
            (pb::GenerateRequest { reference_caption: String::new(), ..reference_request(&s, png.clone()) }, "`reference_caption`"),
            (pb::GenerateRequest { sampler: pb::Sampler::EulerA as i32, ..reference_request(&s, png.clone()) }, "`sampler`"),
            (pb::GenerateRequest { reference_offset: 4, ..reference_request(&s, png.clone()) }, "`reference_offset`"),
            (
                pb::GenerateRequest { reference_guidance_scale: Some(f32::NAN), ..reference_request(&s, png.clone()) },
                "`reference_guidance_scale`",
            ),
            (
                pb::GenerateRequest { reference_caption: "caption without image".into(), ..request(&s, &["a"], 32, 2, 1) },
                "`reference_caption`",
            ),
            (pb::GenerateRequest { size_conditioning: Some(Default::default()), ..request(&s, &["a"], 32, 2, 1) }, "`size_conditioning`"),
        ];
        // A PNG whose header declares more pixels than accepted.
        let huge = Image { width: 5000, height: 4000, rgb: vec![0; 5000 * 4000 * 3] }.to_png(&[]);
        let mut cases = cases;
        cases.push((reference_request(&s, huge), "`reference_image`"));
        // Metrics are process-wide (other tests of this binary may have run batches): compare.
        assert_refused_naming_fields(&server, &mut c, &me, cases).await;
        server.shutdown().await;
    });
}
