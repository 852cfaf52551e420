//! A patch lives on a clone: patching clone A changes neither the base model nor clone B
//! (bitwise), unlike the ComfyUI node, which patches the original model's norms in place.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::*;
use stylealign::model::unet::{NoHooks, UNet};
use stylealign::style_aligned::{NodeOptions, Patched, ReferencePlan, ShareAttn, ShareNorm, StyleAligned};

fn bits(t: Tensor<4>) -> Vec<u32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn patching_a_clone_leaves_base_and_other_clones_untouched() {
    let dev = device();
    let dir = golden_dir();
    let g = Golden::read(&dir.join("unet_sd15_cfg8_comfy.safetensors"));
    let base = UNet::load(&dir.join("tiny_sd15/unet"), &dev).unwrap();
    let sample: Tensor<4> = g.get("input.sample").tensor(&dev);
    let b = sample.dims()[0];
    let ts = Tensor::<1>::from_data(TensorData::new(vec![g.get("input.timestep").f32()[0]; b], [b]), &dev);
    let ehs: Tensor<3> = g.get("input.encoder_hidden_states").tensor(&dev);
    let plain = |m: &UNet| m.forward(sample.clone(), ts.clone(), &ehs, None, &NoHooks).unwrap();

    let before = bits(plain(&base));
    let clone_b = base.clone();

    // Clone A: the node's defaults (both, q+k, 1), the golden's case 2, one reference per CFG half.
    let clone_a =
        Patched::new(&base, StyleAligned::Node(NodeOptions { share_norm: ShareNorm::Both, share_attn: ShareAttn::QK, scale: 1.0 }))
            .unwrap();
    let plan = ReferencePlan::from_groups(&[b / 2], 2, 1.0).unwrap();
    let patched = clone_a.forward(sample.clone(), ts.clone(), &ehs, None, plan).unwrap();
    let case = g.info["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["share_norm"] == "both" && c["share_attn"] == "q+k" && c["scale"] == 1.0)
        .unwrap();
    let err = max_abs_diff(patched.clone(), g.get(case["tensor"].as_str().unwrap()));
    assert!(err < 1e-4, "clone A is patched: {err:.3e}");
    assert_ne!(bits(patched), before, "the patch changes clone A's output");

    // Base and clone B, after A was patched and used: bit-for-bit the unpatched output.
    let base_after = plain(&base);
    assert_eq!(bits(base_after.clone()), before, "base model changed");
    assert_eq!(bits(plain(&clone_b)), before, "clone B changed");
    assert!(max_abs_diff(base_after, g.get("out.unpatched")) < 1e-4);

    // Dropping the patched clone changes nothing either.
    drop(clone_a);
    assert_eq!(bits(plain(&base)), before);
}
