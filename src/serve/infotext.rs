//! The PNG's `parameters` text in AUTOMATIC1111's "infotext" format, which A1111's *PNG Info*
//! tab (and tools that follow it) read back:
//!
//! ```text
//! a fox, linocut print
//! Negative prompt: blurry
//! Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: sd15, StyleAligned flavour: node, ...
//! ```
//!
//! Line 1 is the image's prompt (it may span several lines), then `Negative prompt: …` when
//! there is one, then one line of `key: value` pairs separated by `, `. As A1111's `quote`, a
//! value containing a comma, colon, newline or double quote (or with surrounding whitespace) is
//! written as a JSON string, which A1111's parser unquotes. Our full JSON, with everything needed
//! to reproduce the image, is in the PNG's separate `stylealign` chunk.

use std::borrow::Cow;

use super::convert::ImageParameters;
use crate::model::hash::short_hash;
use crate::style_aligned::StyleAligned;

/// A1111's name of a sampler (`ddim` → `DDIM`, ...); unknown names pass through.
pub fn a1111_sampler(name: &str) -> &str {
    match name {
        "ddim" => "DDIM",
        "euler" => "Euler",
        "euler_a" => "Euler a",
        "dpmpp_2m" => "DPM++ 2M",
        "dpmpp_2m_karras" => "DPM++ 2M Karras",
        other => other,
    }
}

/// A value as A1111 writes it: plain, or a JSON string when the plain text would not read back.
pub fn quote(value: &str) -> Cow<'_, str> {
    let plain = !value.contains([',', ':', '\n', '"']) && value.trim() == value && !value.is_empty();
    if plain { Cow::Borrowed(value) } else { Cow::Owned(serde_json::to_string(value).expect("strings serialize")) }
}

/// A float as Python prints it (`7.5`, `7.0`, `0.8`): the shortest text that reads back.
fn num(x: f32) -> String {
    let s = x.to_string();
    if x.is_finite() && !s.contains('.') { format!("{s}.0") } else { s }
}

/// The infotext of one image.
pub fn infotext(p: &ImageParameters) -> String {
    let mut fields: Vec<(&str, String)> = vec![
        ("Steps", p.steps.to_string()),
        ("Sampler", a1111_sampler(p.sampler).to_string()),
        ("CFG scale", num(p.guidance_scale)),
        ("Seed", p.seed.to_string()),
        ("Size", format!("{}x{}", p.width, p.height)),
        ("Model hash", short_hash(p.model_sha256).to_string()),
        ("Model", p.model.to_string()),
    ];
    match p.options {
        StyleAligned::Node(n) => {
            fields.push(("StyleAligned flavour", "node".into()));
            fields.push(("StyleAligned share_norm", n.share_norm.as_str().into()));
            fields.push(("StyleAligned share_attn", n.share_attn.as_str().into()));
            fields.push(("StyleAligned scale", num(n.scale)));
        }
        StyleAligned::Official(o) => {
            fields.push(("StyleAligned flavour", "official".into()));
            for (k, v) in [
                ("StyleAligned share_group_norm", o.share_group_norm),
                ("StyleAligned share_layer_norm", o.share_layer_norm),
                ("StyleAligned share_attention", o.share_attention),
                ("StyleAligned adain_queries", o.adain_queries),
                ("StyleAligned adain_keys", o.adain_keys),
                ("StyleAligned adain_values", o.adain_values),
                ("StyleAligned full_attention_share", o.full_attention_share),
            ] {
                fields.push((k, v.to_string()));
            }
            fields.push(("StyleAligned shared_score_scale", num(o.shared_score_scale)));
            fields.push(("StyleAligned shared_score_shift", num(o.shared_score_shift)));
            fields.push(("StyleAligned only_self_level", num(o.only_self_level)));
        }
    }
    if !p.scope.window.is_full() {
        fields.push(("StyleAligned window", format!("{}, {}", num(p.scope.window.start), num(p.scope.window.end))));
    }
    if !p.scope.levels.is_empty() {
        fields.push(("StyleAligned levels", p.scope.levels.iter().map(|l| l.spec()).collect::<Vec<_>>().join("; ")));
    }
    fields.push(("StyleAligned image index", p.index.to_string()));
    fields.push(("StyleAligned set size", p.prompts.len().to_string()));
    match &p.reference {
        // The first prompt of the set is the style reference.
        None => fields.push(("StyleAligned reference index", "0".into())),
        Some(r) => {
            fields.push(("StyleAligned reference image sha256", r.image_sha256.to_string()));
            fields.push(("StyleAligned reference caption", r.caption.to_string()));
            fields.push(("StyleAligned reference offset", r.offset.to_string()));
            fields.push(("StyleAligned reference CFG scale", num(r.guidance_scale)));
        }
    }
    if let Some(init) = p.init_images.iter().find(|i| i.index == p.index) {
        fields.push(("Denoising strength", num(init.strength)));
        fields.push(("Init image sha256", init.image_sha256.clone()));
    }
    if p.index != 0 || p.reference.is_some() {
        // A1111's sd-webui-controlnet writes `ControlNet 0: "…"`; the values here are this
        // service's own.
        for (k, c) in p.controls.iter().enumerate() {
            let v = format!(
                "model: {} [{}], scale: {}, window: {}-{}",
                c.model,
                short_hash(&c.model_sha256),
                num(c.conditioning_scale),
                num(c.start),
                num(c.end)
            );
            fields.push((["ControlNet 0", "ControlNet 1", "ControlNet 2", "ControlNet 3"].get(k).copied().unwrap_or("ControlNet"), v));
        }
    }
    if !p.loras.is_empty() {
        // A1111's form: `Lora hashes: "name: hash, …"` (first 10 hex digits of the file's SHA-256).
        fields
            .push(("Lora hashes", p.loras.iter().map(|l| format!("{}: {}", l.name, short_hash(&l.sha256))).collect::<Vec<_>>().join(", ")));
        fields.push(("Lora weights", p.loras.iter().map(|l| format!("{}: {}", l.name, num(l.weight))).collect::<Vec<_>>().join(", ")));
    }
    if let Some(s) = p.size_conditioning {
        fields.push(("Size conditioning", s.iter().map(|v| num(*v)).collect::<Vec<_>>().join(", ")));
    }
    fields.push(("Version", p.generator.to_string()));
    let line = fields.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect::<Vec<_>>().join(", ");
    let negative = if p.negative_prompt.is_empty() { String::new() } else { format!("\nNegative prompt: {}", p.negative_prompt) };
    // A1111 strips the whole text, so a prompt's leading whitespace is not kept.
    format!("{}{negative}\n{line}", p.prompt).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_follows_a1111() {
        assert_eq!(quote("sd15"), "sd15");
        assert_eq!(quote("q+k"), "q+k");
        assert_eq!(quote("a, b"), "\"a, b\"");
        assert_eq!(quote("x: y"), "\"x: y\"");
        assert_eq!(quote("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(quote("two\nlines"), "\"two\\nlines\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!((num(7.5), num(7.0), num(0.8), num(1.0)), ("7.5".into(), "7.0".into(), "0.8".into(), "1.0".into()));
        assert_eq!(a1111_sampler("dpmpp_2m_karras"), "DPM++ 2M Karras");
        assert_eq!(a1111_sampler("euler_a"), "Euler a");
    }
}
