//! The explicit reference plan: for every batch row, whose keys, values and statistics it shares,
//! and the gain on the shared keys. Built from the batch's structure (style groups × CFG halves),
//! never guessed from "the first row of each half".

use serde::{Deserialize, Serialize};

/// One style group in a batch: `len` consecutive rows (per CFG half) starting at `start`, the
/// first of which is the group's reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StyleGroup {
    pub start: usize,
    pub len: usize,
}

/// Per-row plan (see the reference harness's "Per-row plan").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferencePlan {
    /// Row whose keys are appended to row i's keys.
    pub reference_of: Vec<usize>,
    /// Gain on those keys (1 for a row that is its own reference).
    pub gain: Vec<f32>,
    /// Row whose values are appended (never scaled).
    pub value_reference_of: Vec<usize>,
    /// Row whose statistics AdaIN and the shared norms use.
    pub stats_reference_of: Vec<usize>,
}

/// A plan that does not fit its batch.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid reference plan: {0}")]
pub struct PlanError(pub String);

impl ReferencePlan {
    /// The plan of a batch laid out as `halves` CFG halves (1 without CFG, 2 with: `[uncond | cond]`),
    /// each half holding the same style groups in the same order. Every group's first row is its
    /// reference within each half; other rows get `gain`.
    pub fn from_groups(group_sizes: &[usize], halves: usize, gain: f32) -> Result<Self, PlanError> {
        if group_sizes.is_empty() || group_sizes.contains(&0) {
            return Err(PlanError("every style group needs at least one row".into()));
        }
        if halves == 0 {
            return Err(PlanError("a batch has at least one half".into()));
        }
        let per_half: usize = group_sizes.iter().sum();
        let mut reference_of = Vec::with_capacity(per_half * halves);
        let mut gains = Vec::with_capacity(per_half * halves);
        for h in 0..halves {
            let mut start = h * per_half;
            for &len in group_sizes {
                for r in 0..len {
                    reference_of.push(start);
                    gains.push(if r == 0 { 1.0 } else { gain });
                }
                start += len;
            }
        }
        Ok(Self::uniform(reference_of, gains))
    }

    /// A plan whose keys, values and statistics all come from `reference_of`.
    pub fn uniform(reference_of: Vec<usize>, gain: Vec<f32>) -> Self {
        Self { value_reference_of: reference_of.clone(), stats_reference_of: reference_of.clone(), reference_of, gain }
    }

    pub fn rows(&self) -> usize {
        self.reference_of.len()
    }

    /// Checks that the plan is complete and consistent for a batch of `rows`.
    pub fn validate(&self, rows: usize) -> Result<(), PlanError> {
        let n = self.reference_of.len();
        if n != rows {
            return Err(PlanError(format!("plan has {n} rows, batch has {rows}")));
        }
        if self.gain.len() != n || self.value_reference_of.len() != n || self.stats_reference_of.len() != n {
            return Err(PlanError("reference_of, gain, value_reference_of and stats_reference_of must have one entry per row".into()));
        }
        for (name, list) in [
            ("reference_of", &self.reference_of),
            ("value_reference_of", &self.value_reference_of),
            ("stats_reference_of", &self.stats_reference_of),
        ] {
            if let Some((i, r)) = list.iter().enumerate().find(|(_, r)| **r >= n) {
                return Err(PlanError(format!("{name}[{i}] = {r} is outside the batch of {n}")));
            }
        }
        if let Some((i, g)) = self.gain.iter().enumerate().find(|(_, g)| !g.is_finite()) {
            return Err(PlanError(format!("gain[{i}] = {g} is not finite")));
        }
        Ok(())
    }

    /// Groups of rows that share one `reference_of` (the joint-attention groups of the official
    /// `full_attention_share`), in order of first appearance.
    pub fn key_groups(&self) -> Vec<Vec<usize>> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, &r) in self.reference_of.iter().enumerate() {
            match groups.iter_mut().find(|(g, _)| *g == r) {
                Some((_, rows)) => rows.push(i),
                None => groups.push((r, vec![i])),
            }
        }
        groups.into_iter().map(|(_, rows)| rows).collect()
    }

    /// Concatenates several plans into one batch (each plan's rows keep their own references).
    pub fn concat(plans: &[ReferencePlan]) -> Self {
        let mut out = Self { reference_of: vec![], gain: vec![], value_reference_of: vec![], stats_reference_of: vec![] };
        for p in plans {
            let off = out.reference_of.len();
            out.reference_of.extend(p.reference_of.iter().map(|r| r + off));
            out.gain.extend(&p.gain);
            out.value_reference_of.extend(p.value_reference_of.iter().map(|r| r + off));
            out.stats_reference_of.extend(p.stats_reference_of.iter().map(|r| r + off));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cfg_halves_one_group() {
        let p = ReferencePlan::from_groups(&[4], 2, 0.5).unwrap();
        assert_eq!(p.reference_of, vec![0, 0, 0, 0, 4, 4, 4, 4]);
        assert_eq!(p.gain, vec![1.0, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5]);
        p.validate(8).unwrap();
    }

    #[test]
    fn no_cfg_single_reference_odd_batch() {
        let p = ReferencePlan::from_groups(&[5], 1, 0.3).unwrap();
        assert_eq!(p.reference_of, vec![0; 5]);
        assert_eq!(p.gain, vec![1.0, 0.3, 0.3, 0.3, 0.3]);
    }

    #[test]
    fn several_groups_with_cfg() {
        let p = ReferencePlan::from_groups(&[3, 2], 2, 1.0).unwrap();
        assert_eq!(p.reference_of, vec![0, 0, 0, 3, 3, 5, 5, 5, 8, 8]);
        assert_eq!(p.key_groups(), vec![vec![0, 1, 2], vec![3, 4], vec![5, 6, 7], vec![8, 9]]);
    }

    #[test]
    fn concat_offsets_references() {
        let a = ReferencePlan::from_groups(&[2], 1, 1.0).unwrap();
        let b = ReferencePlan::from_groups(&[3], 1, 0.5).unwrap();
        let p = ReferencePlan::concat(&[a, b]);
        assert_eq!(p.reference_of, vec![0, 0, 2, 2, 2]);
        assert_eq!(p.gain, vec![1.0, 1.0, 1.0, 0.5, 0.5]);
    }

    #[test]
    fn validate_rejects_out_of_range() {
        let p = ReferencePlan::uniform(vec![0, 5], vec![1.0, 1.0]);
        assert!(p.validate(2).unwrap_err().0.contains("reference_of[1] = 5"));
        assert!(ReferencePlan::from_groups(&[], 2, 1.0).is_err());
    }
}
