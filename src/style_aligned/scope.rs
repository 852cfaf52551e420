//! Where and when the style is shared: a step window over the schedule and per-UNet-level
//! switches. Plain data ([`StyleScope`]), checked against a model's levels once into a
//! [`ResolvedScope`] that the hooks execute.
//!
//! The default scope (window `[0, 1]`, no level options) patches every step and every level as
//! the session's options say, exactly as a patch without a scope.

use serde::{Deserialize, Serialize};

use crate::model::unet::{Level, UNetConfig};

use super::options::{OptionError, Resolved};

/// The steps of the schedule that are patched, as fractions of it: step `i` of `n` (0-based) is
/// patched iff NOT (`i / n < start` or `(i + 1) / n > end`) — diffusers' rule for
/// `control_guidance_start` / `control_guidance_end`. Other steps run the plain UNet.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepWindow {
    pub start: f32,
    pub end: f32,
}

impl Default for StepWindow {
    fn default() -> Self {
        Self { start: 0.0, end: 1.0 }
    }
}

impl StepWindow {
    /// Whether step `i` of `n` is patched (the comparisons are diffusers', in f64 as Python's floats).
    pub fn contains(&self, i: usize, n: usize) -> bool {
        if n == 0 {
            return false;
        }
        let (n, i) = (n as f64, i as f64);
        !(i / n < self.start as f64 || (i + 1.0) / n > self.end as f64)
    }

    pub fn is_full(&self) -> bool {
        self.start <= 0.0 && self.end >= 1.0
    }

    /// Checks `0 <= start < end <= 1`; the error names `window.start` or `window.end`.
    pub fn validate(&self) -> Result<(), OptionError> {
        for (field, v) in [("window.start", self.start), ("window.end", self.end)] {
            if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                return Err(OptionError { field: field.into(), message: format!("{v} is outside [0, 1]") });
            }
        }
        if self.start >= self.end {
            return Err(OptionError {
                field: "window.end".into(),
                message: format!("must be greater than window.start ({} >= {})", self.start, self.end),
            });
        }
        Ok(())
    }
}

/// The options of one UNet level. `None` fields take the session's options: the level is
/// enabled, its GroupNorms share statistics iff the session shares GroupNorm statistics, its
/// self-attentions are patched (unless `only_self_level` leaves them plain), gain 1.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LevelOptions {
    /// `down.K`, `mid`, `up.K` or `out` (diffusers `down_blocks[K]`, `mid_block`, `up_blocks[K]`,
    /// `conv_norm_out`).
    pub name: String,
    /// `false`: every GroupNorm and self-attention of the level runs plain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Multiplies the gain on the reference's keys of every row that is not its own reference
    /// (the node's `scale`, the official `shared_score_scale`) in this level's self-attentions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gain: Option<f32>,
    /// Whether this level's GroupNorms use the joint statistics with the reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_group_norm: Option<bool>,
    /// `false`: this level's self-attentions run plain (no AdaIN, no shared keys and values), as
    /// the layers `only_self_level` leaves unpatched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_attention: Option<bool>,
}

impl LevelOptions {
    /// The options as the command line's `--style-level` writes them: `NAME[:OPT,...]`, e.g.
    /// `up.1:off`, `down.2:gain=0.5,norm=off`.
    pub fn spec(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let mut opts = Vec::new();
        if let Some(e) = self.enabled {
            opts.push(on(e).to_string());
        }
        if let Some(g) = self.gain {
            opts.push(format!("gain={g}"));
        }
        if let Some(n) = self.share_group_norm {
            opts.push(format!("norm={}", on(n)));
        }
        if let Some(a) = self.share_attention {
            opts.push(format!("attn={}", on(a)));
        }
        if opts.is_empty() { self.name.clone() } else { format!("{}:{}", self.name, opts.join(",")) }
    }
}

/// Where and when the patch acts. The default patches everything, every step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StyleScope {
    #[serde(skip_serializing_if = "StepWindow::is_full")]
    pub window: StepWindow,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<LevelOptions>,
}

/// What the patch does in one level.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LevelSwitches {
    pub level: Level,
    /// As given (`false` turns both switches below off).
    pub enabled: bool,
    pub share_group_norm: bool,
    pub share_attention: bool,
    /// Multiplies the reference-key gain of the non-reference rows.
    pub gain: f32,
}

/// A scope checked against a model: the window and one [`LevelSwitches`] per level of the model,
/// in the model's level order.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedScope {
    pub window: StepWindow,
    pub levels: Vec<LevelSwitches>,
}

impl ResolvedScope {
    /// The switches of `level` (a level the model does not have: none shared).
    pub fn level(&self, level: Level) -> Option<&LevelSwitches> {
        self.levels.iter().find(|l| l.level == level)
    }
}

impl StyleScope {
    /// Whether this is the default (patch everything, every step).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Every problem of the scope against the levels of a model (`model_levels`, e.g.
    /// [`crate::model::unet::UNet::levels`]); errors name the field (`window.start`,
    /// `levels[2].name`, `levels[0].gain`).
    pub fn check(&self, model_levels: &[Level]) -> Vec<OptionError> {
        let mut errors = Vec::new();
        if let Err(e) = self.window.validate() {
            errors.push(e);
        }
        if self.levels.len() > model_levels.len() {
            errors.push(OptionError {
                field: "levels".into(),
                message: format!(
                    "{} entries; this model has {} levels ({}), each given at most once",
                    self.levels.len(),
                    model_levels.len(),
                    describe_levels(model_levels)
                ),
            });
            return errors;
        }
        let mut seen: Vec<Level> = Vec::new();
        for (i, o) in self.levels.iter().enumerate() {
            let field = |f: &str| format!("levels[{i}].{f}");
            match Level::parse(&o.name).filter(|l| model_levels.contains(l)) {
                None => errors.push(OptionError {
                    field: field("name"),
                    message: format!("unknown level {:?}; this model has {}", shown(&o.name), describe_levels(model_levels)),
                }),
                Some(level) if seen.contains(&level) => {
                    errors.push(OptionError { field: field("name"), message: format!("level {level} is given twice") })
                }
                Some(level) => seen.push(level),
            }
            if let Some(g) = o.gain
                && !g.is_finite()
            {
                errors.push(OptionError { field: field("gain"), message: format!("{g} is not a finite number") });
            }
        }
        errors
    }

    /// Checks the scope against the levels of a model (the first problem [`check`](Self::check)
    /// finds is the error) and resolves it under the session's resolved switches.
    pub fn resolve(&self, global: &Resolved, model_levels: &[Level]) -> Result<ResolvedScope, OptionError> {
        if let Some(e) = self.check(model_levels).into_iter().next() {
            return Err(e);
        }
        let mut levels: Vec<LevelSwitches> = model_levels
            .iter()
            .map(|&level| LevelSwitches {
                level,
                enabled: true,
                share_group_norm: global.share_group_norm,
                share_attention: true,
                gain: 1.0,
            })
            .collect();
        for o in &self.levels {
            let level = Level::parse(&o.name).expect("checked");
            let s = levels.iter_mut().find(|s| s.level == level).expect("checked: a level of the model");
            s.enabled = o.enabled.unwrap_or(true);
            s.share_group_norm = s.enabled && o.share_group_norm.unwrap_or(global.share_group_norm);
            s.share_attention = s.enabled && o.share_attention.unwrap_or(true);
            s.gain = o.gain.unwrap_or(1.0);
        }
        Ok(ResolvedScope { window: self.window, levels })
    }
}

/// The hooked layers of each level of a UNet of `cfg`, in execution order: (level, GroupNorms,
/// self-attentions). A resnet has two GroupNorms, a transformer one (its input norm) and one
/// self-attention per transformer block; the mid block is resnet, transformer, resnet; `out` is
/// `conv_norm_out`.
pub fn level_layers(cfg: &UNetConfig) -> Vec<(Level, usize, usize)> {
    let n = cfg.block_out_channels.len();
    let mut out = Vec::with_capacity(2 * n + 2);
    for k in 0..n {
        let resnets = cfg.layers_per_block[k];
        let transformers = if cfg.down_cross_attn[k] { resnets } else { 0 };
        out.push((Level::Down(k), 2 * resnets + transformers, transformers * cfg.transformer_layers_per_block[k]));
    }
    out.push((Level::Mid, 2 * 2 + 1, cfg.transformer_layers_per_block[n - 1]));
    for k in 0..n {
        let resnets = cfg.layers_per_block[n - 1 - k] + 1;
        let transformers = if cfg.up_cross_attn[k] { resnets } else { 0 };
        out.push((Level::Up(k), 2 * resnets + transformers, transformers * cfg.reverse_transformer_layers_per_block[k]));
    }
    out.push((Level::Out, 1, 0));
    out
}

/// A level name as quoted in an error (bounded: it is client input).
fn shown(name: &str) -> String {
    match name.char_indices().nth(32) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_string(),
    }
}

/// `down.0..down.3, mid, up.0..up.3, out`.
pub fn describe_levels(levels: &[Level]) -> String {
    let downs = levels.iter().filter(|l| matches!(l, Level::Down(_))).count();
    let ups = levels.iter().filter(|l| matches!(l, Level::Up(_))).count();
    let range = |name: &str, n: usize| match n {
        0 => None,
        1 => Some(format!("{name}.0")),
        n => Some(format!("{name}.0..{name}.{}", n - 1)),
    };
    [
        range("down", downs),
        levels.contains(&Level::Mid).then(|| "mid".to_string()),
        range("up", ups),
        levels.contains(&Level::Out).then(|| "out".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::unet::levels_of;
    use crate::style_aligned::StyleAligned;

    fn global() -> Resolved {
        StyleAligned::default().resolve().unwrap()
    }

    #[test]
    fn window_rule_is_diffusers_control_guidance() {
        let w = StepWindow { start: 0.0, end: 0.6 };
        // n = 10: steps 0..5 ((i+1)/10 <= 0.6).
        assert_eq!((0..10).filter(|&i| w.contains(i, 10)).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
        let w = StepWindow { start: 0.25, end: 1.0 };
        assert_eq!((0..4).filter(|&i| w.contains(i, 4)).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!((0..7).all(|i| StepWindow::default().contains(i, 7)));
        // A window between two steps patches none.
        let w = StepWindow { start: 0.3, end: 0.45 };
        assert!((0..4).all(|i| !w.contains(i, 4)));
    }

    #[test]
    fn window_errors_name_fields() {
        let e = |start, end| StepWindow { start, end }.validate().unwrap_err().field;
        assert_eq!(e(-0.1, 1.0), "window.start");
        assert_eq!(e(0.0, f32::NAN), "window.end");
        assert_eq!(e(0.5, 0.5), "window.end");
        assert_eq!(e(0.0, 1.5), "window.end");
    }

    #[test]
    fn levels_resolve_and_errors_name_fields() {
        let model = levels_of(3);
        assert_eq!(describe_levels(&model), "down.0..down.2, mid, up.0..up.2, out");
        let r = StyleScope::default().resolve(&global(), &model).unwrap();
        assert!(r.levels.iter().all(|l| l.share_group_norm && l.share_attention && l.gain == 1.0));
        let scope = StyleScope {
            window: StepWindow::default(),
            levels: vec![
                LevelOptions { name: "up.1".into(), enabled: Some(false), ..Default::default() },
                LevelOptions { name: "down.2".into(), gain: Some(0.5), share_group_norm: Some(false), ..Default::default() },
            ],
        };
        let r = scope.resolve(&global(), &model).unwrap();
        let up1 = r.level(Level::Up(1)).unwrap();
        assert!(!up1.share_group_norm && !up1.share_attention);
        let d2 = r.level(Level::Down(2)).unwrap();
        assert_eq!((d2.share_group_norm, d2.share_attention, d2.gain), (false, true, 0.5));

        let err = |name: &str, gain: Option<f32>| {
            let s = StyleScope { levels: vec![LevelOptions { name: name.into(), gain, ..Default::default() }], ..Default::default() };
            s.resolve(&global(), &model).unwrap_err()
        };
        let e = err("down.7", None);
        assert_eq!(e.field, "levels[0].name");
        assert_eq!(e.message, "unknown level \"down.7\"; this model has down.0..down.2, mid, up.0..up.2, out");
        assert_eq!(err("middle", None).field, "levels[0].name");
        assert_eq!(err("down.01", None).field, "levels[0].name");
        assert_eq!(err("mid", Some(f32::INFINITY)).field, "levels[0].gain");
        let twice = StyleScope {
            levels: vec![
                LevelOptions { name: "mid".into(), ..Default::default() },
                LevelOptions { name: "mid".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        assert_eq!(twice.resolve(&global(), &model).unwrap_err().field, "levels[1].name");
    }

    #[test]
    fn level_names_round_trip() {
        for l in levels_of(4) {
            assert_eq!(Level::parse(&l.to_string()), Some(l));
        }
        assert_eq!(Level::parse("up.12"), Some(Level::Up(12)));
        assert_eq!(Level::parse("down."), None);
        assert_eq!(Level::parse("down.-1"), None);
    }

    /// The per-level counts of docs/style-sharing.md, from the real configs' block layout.
    #[test]
    fn level_layer_counts_of_real_configs() {
        use crate::model::config::RawConfig;
        let config = |json: &str| UNetConfig::from_raw(&RawConfig::parse(std::path::Path::new("config.json"), json).unwrap()).unwrap();
        let sd15 = config(
            r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
        );
        let counts = |cfg: &UNetConfig| level_layers(cfg).into_iter().map(|(l, g, a)| (l.to_string(), g, a)).collect::<Vec<_>>();
        let named = |v: &[(&str, usize, usize)]| v.iter().map(|&(l, g, a)| (l.to_string(), g, a)).collect::<Vec<_>>();
        assert_eq!(
            counts(&sd15),
            named(&[
                ("down.0", 6, 2),
                ("down.1", 6, 2),
                ("down.2", 6, 2),
                ("down.3", 4, 0),
                ("mid", 5, 1),
                ("up.0", 6, 0),
                ("up.1", 9, 3),
                ("up.2", 9, 3),
                ("up.3", 9, 3),
                ("out", 1, 0)
            ])
        );
        let sdxl = config(
            r#"{"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
                "cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}"#,
        );
        assert_eq!(
            counts(&sdxl),
            named(&[
                ("down.0", 4, 0),
                ("down.1", 6, 4),
                ("down.2", 6, 20),
                ("mid", 5, 10),
                ("up.0", 9, 30),
                ("up.1", 9, 6),
                ("up.2", 6, 0),
                ("out", 1, 0)
            ])
        );
        let total = |cfg: &UNetConfig| level_layers(cfg).iter().fold((0, 0), |(g, a), l| (g + l.1, a + l.2));
        assert_eq!(total(&sd15), (61, 16));
        assert_eq!(total(&sdxl), (46, 70));
    }

    /// A loaded UNet tells its hooks the level of every layer: the calls per level are the counts.
    #[test]
    fn a_loaded_unet_reports_each_layers_level() {
        use crate::model::nn::{Attention, GroupNorm};
        use crate::model::unet::{NoHooks, Site, UNetHooks};
        use burn::tensor::{Tensor, TensorData};
        use std::sync::Mutex;

        #[derive(Default)]
        struct Count(Mutex<Vec<(Level, usize, usize)>>);
        impl Count {
            fn add(&self, level: Level, g: usize, a: usize) {
                let mut v = self.0.lock().unwrap();
                match v.iter_mut().find(|e| e.0 == level) {
                    Some(e) => {
                        e.1 += g;
                        e.2 += a;
                    }
                    None => v.push((level, g, a)),
                }
            }
        }
        impl UNetHooks for Count {
            fn group_norm(&self, site: Site, norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
                self.add(site.level, 1, 0);
                norm.forward_act(x, silu)
            }
            fn self_attention(&self, site: Site, _layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
                self.add(site.level, 0, 1);
                attn.forward(x, None)
            }
        }

        let device = burn::tensor::Device::flex();
        let p = crate::pipeline::tiny::tiny_pipeline(&device).unwrap();
        let unet = p.unet();
        let cfg = &unet.config;
        let sample = Tensor::<4>::from_data(TensorData::new(vec![0.1f32; cfg.in_channels * 64], [1, cfg.in_channels, 8, 8]), &device);
        let ts = Tensor::<1>::from_data(TensorData::new(vec![500f32], [1]), &device);
        let d = cfg.cross_attention_dim[0];
        let ehs = Tensor::<3>::from_data(TensorData::new(vec![0.01f32; 4 * d], [1, 4, d]), &device);
        let count = Count::default();
        let hooked = unet.forward(sample.clone(), ts.clone(), &ehs, None, &count).unwrap();
        let plain = unet.forward(sample, ts, &ehs, None, &NoHooks).unwrap();
        assert_eq!(hooked.into_data(), plain.into_data(), "hooks that compute the plain layers change nothing");
        let seen: Vec<(Level, usize, usize)> = count.0.into_inner().unwrap().into_iter().filter(|e| e.1 + e.2 > 0).collect();
        let want: Vec<(Level, usize, usize)> = level_layers(cfg).into_iter().filter(|e| e.1 + e.2 > 0).collect();
        assert_eq!(seen, want);
        assert_eq!(want.iter().map(|l| l.0).collect::<Vec<_>>(), unet.levels());
        assert_eq!(want.iter().map(|l| l.1).sum::<usize>(), unet.group_norms());
        assert_eq!(want.iter().map(|l| l.2).sum::<usize>(), unet.self_attention_layers());
    }

    #[test]
    fn default_scope_serializes_to_nothing() {
        assert_eq!(serde_json::to_string(&StyleScope::default()).unwrap(), "{}");
        let s: StyleScope = serde_json::from_str("{}").unwrap();
        assert!(s.is_default());
    }
}
