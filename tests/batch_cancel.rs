//! A set that leaves a running batch (cancelled, deadline, client gone) does not disturb the sets
//! that stay: for every sampler, the remaining set's images equal those it gets when run alone —
//! including the multistep DPM-Solver++ samplers, whose state carries the previous step's rows.

use burn::tensor::Device;
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::pipeline::{BatchSpec, SetSpec};
use stylealign::sampling::sampler::SamplerKind;
use stylealign::style_aligned::StyleAligned;

fn set(prompts: &[&str], seed: u64) -> SetSpec {
    SetSpec { prompts: prompts.iter().map(|p| p.to_string()).collect(), negative_prompt: String::new(), seed, reference: None }
}

#[test]
fn a_set_cancelled_mid_run_leaves_its_batch_mates_unchanged_for_every_sampler() {
    let pipeline = tiny_pipeline(&Device::flex()).unwrap();
    let kept = set(&["a lighthouse, linocut", "a fox, linocut"], 11);
    let cancelled = set(&["a boat, watercolor", "a tree, watercolor", "a house, watercolor"], 12);
    for sampler in SamplerKind::ALL {
        let batch = BatchSpec {
            width: 32,
            height: 32,
            steps: 5,
            guidance: 7.5,
            sampler,
            patch: Some(StyleAligned::default()),
            size_conditioning: None,
        };
        let alone = pipeline.generate(&batch, std::slice::from_ref(&kept), &mut |_, _| vec![true]).unwrap();
        // The second set leaves after step 2 of 5.
        let mut steps_seen = 0;
        let both = pipeline
            .generate(&batch, &[kept.clone(), cancelled.clone()], &mut |step, _| {
                steps_seen = step;
                vec![true, step < 2]
            })
            .unwrap_or_else(|e| panic!("{sampler:?}: {e}"));
        assert_eq!(steps_seen, 5, "{sampler:?}: the kept set ran every step");
        assert!(both[1].is_none(), "{sampler:?}: the cancelled set returns nothing");
        let (a, b) = (alone[0].as_ref().unwrap(), both[0].as_ref().unwrap());
        assert_eq!(a.len(), 2);
        assert!(a == b, "{sampler:?}: the kept set's images differ from running alone");
    }
}
