//! A set that leaves a running batch (cancelled, deadline, client gone) does not disturb the sets
//! that stay: for every sampler, the remaining set's images equal those it gets when run alone —
//! including the multistep DPM-Solver++ samplers, whose state carries the previous step's rows —
//! whether it leaves at a step boundary or is stopped in the middle of a step.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Device;
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::pipeline::{BatchSpec, RunEvent, SetSpec, SetStop};
use stylealign::sampling::sampler::SamplerKind;

fn set(prompts: &[&str], seed: u64) -> SetSpec {
    SetSpec { prompts: prompts.iter().map(|p| p.to_string()).collect(), negative_prompt: String::new(), seed, ..Default::default() }
}

#[test]
fn a_set_cancelled_mid_run_leaves_its_batch_mates_unchanged_for_every_sampler() {
    let pipeline = tiny_pipeline(&Device::flex()).unwrap();
    let kept = set(&["a lighthouse, linocut", "a fox, linocut"], 11);
    let cancelled = set(&["a boat, watercolor", "a tree, watercolor", "a house, watercolor"], 12);
    for sampler in SamplerKind::ALL {
        let batch = BatchSpec::patched(32, 5, 7.5, sampler);
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

fn batch(sampler: SamplerKind) -> BatchSpec {
    BatchSpec::patched(32, 5, 7.5, sampler)
}

/// A stop check that counts its calls and stops `victims` from call number `at` on (once `at`
/// is armed); the calls inside a step (the model's checks between blocks and attention tiles)
/// count too, so arming it at the end of a step with a small offset stops the victims in the
/// middle of the next step.
struct MidStep {
    calls: AtomicUsize,
    at: AtomicUsize,
    victims: Vec<usize>,
}

impl MidStep {
    fn new(victims: &[usize]) -> Arc<Self> {
        Arc::new(Self { calls: AtomicUsize::new(0), at: AtomicUsize::new(usize::MAX), victims: victims.to_vec() })
    }

    fn stop(self: &Arc<Self>) -> SetStop {
        let me = self.clone();
        Arc::new(move |set| {
            let n = me.calls.fetch_add(1, Ordering::SeqCst);
            me.victims.contains(&set) && n >= me.at.load(Ordering::SeqCst)
        })
    }

    /// Arms it `offset` calls from now.
    fn arm(&self, offset: usize) {
        self.at.store(self.calls.load(Ordering::SeqCst) + offset, Ordering::SeqCst);
    }
}

/// For every sampler: a batch-mate stopped in the middle of step 3 leaves the batch at the end of
/// that step, and the set that stays gets exactly the images it gets alone (the multistep
/// samplers' previous-step state follows the rows that stay).
#[test]
fn a_mate_stopped_inside_a_step_leaves_the_survivor_bit_identical_for_every_sampler() {
    let pipeline = tiny_pipeline(&Device::flex()).unwrap();
    let kept = set(&["a lighthouse, linocut", "a fox, linocut"], 11);
    let mate = set(&["a boat, watercolor", "a tree, watercolor", "a house, watercolor"], 12);
    let never: SetStop = Arc::new(|_| false);
    for sampler in SamplerKind::ALL {
        let b = batch(sampler);
        let alone = pipeline.generate_until(&b, std::slice::from_ref(&kept), &never, &mut |_| {}).unwrap();
        let check = MidStep::new(&[1]);
        let stop = check.stop();
        let mut dropped = Vec::new();
        let mut steps = Vec::new();
        let both = pipeline
            .generate_until(&b, &[kept.clone(), mate.clone()], &stop, &mut |e| match e {
                RunEvent::Stepped(v) => {
                    steps.push((v.step, v.sets.iter().map(|s| s.0).collect::<Vec<_>>()));
                    if v.step == 2 {
                        // Three checks into step 3: set 0's and set 1's boundary checks, then the
                        // model's first check inside the step.
                        check.arm(3);
                    }
                }
                RunEvent::Dropped { set, steps } => dropped.push((set, steps)),
                RunEvent::Decoding { .. } => {}
            })
            .unwrap_or_else(|e| panic!("{sampler:?}: {e}"));
        assert_eq!(dropped, [(1, 3)], "{sampler:?}: the mate left after step 3, the step it was stopped in");
        assert_eq!(steps.len(), 5, "{sampler:?}: {steps:?}");
        assert_eq!(steps[2], (3, vec![0, 1]), "{sampler:?}: step 3 ran with both sets");
        assert_eq!(steps[3], (4, vec![0]), "{sampler:?}: step 4 without the mate");
        assert!(both[1].is_none(), "{sampler:?}: the stopped set returns nothing");
        let (a, b) = (alone[0].as_ref().unwrap(), both[0].as_ref().unwrap());
        assert_eq!(a.len(), 2);
        assert!(a == b, "{sampler:?}: the survivor's images differ from running alone");
    }
}

/// When every set of a batch is stopped inside a step, the step is abandoned there (between UNet
/// blocks) instead of finishing: no further step is reported and the check fires at most once
/// more per set.
#[test]
fn a_batch_whose_sets_all_stop_inside_a_step_abandons_the_step() {
    let pipeline = tiny_pipeline(&Device::flex()).unwrap();
    let a = set(&["a lighthouse, linocut", "a fox, linocut"], 11);
    let b = set(&["a boat, watercolor", "a tree, watercolor"], 12);
    for sampler in [SamplerKind::Ddim, SamplerKind::DpmPp2m] {
        let check = MidStep::new(&[0, 1]);
        let stop = check.stop();
        let mut dropped = Vec::new();
        let mut last_step = 0;
        let mut calls_at_step_2 = 0;
        let out = pipeline
            .generate_until(&batch(sampler), &[a.clone(), b.clone()], &stop, &mut |e| match e {
                RunEvent::Stepped(v) => {
                    last_step = v.step;
                    if v.step == 2 {
                        calls_at_step_2 = check.calls.load(Ordering::SeqCst);
                        check.arm(4);
                    }
                }
                RunEvent::Dropped { set, steps } => dropped.push((set, steps)),
                RunEvent::Decoding { .. } => {}
            })
            .unwrap();
        assert_eq!(last_step, 2, "{sampler:?}: step 3 was abandoned");
        assert_eq!(dropped, [(0, 2), (1, 2)], "{sampler:?}: both sets left after the 2 completed steps");
        assert!(out.iter().all(Option::is_none));
        // A whole step asks the check dozens of times (every block); after it fired, the model
        // stopped at its next check.
        let after = check.calls.load(Ordering::SeqCst) - calls_at_step_2;
        assert!(after <= 8, "{sampler:?}: {after} checks after arming: the step went on");
    }
}

/// Two random LoRAs (kohya and PEFT) for the embedded model, loaded by the pipeline.
fn tiny_loras(pipeline: &stylealign::pipeline::Pipeline) -> (Arc<stylealign::model::lora::Lora>, Arc<stylealign::model::lora::Lora>) {
    use stylealign::model::lora::{LoraFormat, synthetic_file};
    let dir = std::env::temp_dir().join(format!("stylealign-test-{}-batch-loras", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = Vec::new();
    for (k, format) in [LoraFormat::Kohya, LoraFormat::Peft].into_iter().enumerate() {
        let path = dir.join(format!("l{k}.safetensors"));
        std::fs::write(&path, synthetic_file(&pipeline.lora_targets(), format, 40 + k as u64, 4, 1.0)).unwrap();
        out.push(Arc::new(pipeline.load_lora(&format!("l{k}"), &path).unwrap()));
    }
    let _ = std::fs::remove_dir_all(&dir);
    (out[0].clone(), out[1].clone())
}

/// Sets with different LoRA sets (one LoRA, two with one weight negative, none) run in one UNet
/// batch, and each set's images are bit-identical to running it alone — for every sampler, and
/// with the official full attention share (rows joined per key group). The LoRAs change the
/// images.
#[test]
fn sets_with_different_loras_batched_equal_running_alone() {
    use stylealign::style_aligned::{OfficialArgs, StyleAligned};
    let pipeline = tiny_pipeline(&Device::flex()).unwrap();
    let (l0, l1) = tiny_loras(&pipeline);
    let mut a = set(&["a lighthouse, linocut", "a fox, linocut"], 11);
    a.loras = vec![(l0.clone(), 0.8)];
    let mut b = set(&["a boat, watercolor", "a tree, watercolor", "a house, watercolor"], 12);
    b.loras = vec![(l1.clone(), -0.6), (l0.clone(), 0.5)];
    let plain = set(&["a hill, ink", "a cat, ink"], 13);
    let mut full_share = batch(SamplerKind::Ddim);
    full_share.patch = Some(StyleAligned::Official(OfficialArgs { full_attention_share: true, ..Default::default() }));
    let batches: Vec<BatchSpec> = SamplerKind::ALL.iter().map(|&s| batch(s)).chain([full_share]).collect();
    for batch in batches {
        let sets = [a.clone(), b.clone(), plain.clone()];
        let together = pipeline.generate(&batch, &sets, &mut |_, _| vec![true; 3]).unwrap();
        for (k, s) in sets.iter().enumerate() {
            let alone = pipeline.generate(&batch, std::slice::from_ref(s), &mut |_, _| vec![true]).unwrap();
            assert!(alone[0] == together[k], "{:?}: set {k} differs from running alone", batch.sampler);
        }
        let mut no_lora = a.clone();
        no_lora.loras.clear();
        let without = pipeline.generate(&batch, &[no_lora], &mut |_, _| vec![true]).unwrap();
        assert!(without[0] != together[0], "{:?}: the LoRA changes the set's images", batch.sampler);
    }
}
