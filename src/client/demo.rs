//! `stylealign demo`: an in-process server on the embedded model, one style-aligned set and the
//! same set (same prompts, same seed) with the patch disabled, written as PNGs and a labelled
//! contact sheet, and a measure of how close each row's targets are to its reference in colour.
//!
//! Contact sheet layout (pixels; `size` = image size, `zoom` = max(1, 128 / size), `cell` =
//! size · zoom, `cols` = images per row): a label column [`LABEL_W`] wide on the left (row names
//! "aligned", "unaligned"), a header [`HEADER_H`] high on top (the column's role, "reference" or
//! "target i", then its prompt in up to [`CAPTION_LINES`] lines), then one row per set, each image
//! enlarged `zoom` times, with [`PAD`] between cells. Width = `LABEL_W + cols · (cell + PAD)`,
//! height = `HEADER_H + rows · (cell + PAD)`. The cell of row r, column c has its top-left corner
//! at (`LABEL_W + c · (cell + PAD)`, `HEADER_H + r · (cell + PAD)`); the reference column is
//! framed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::{self as client, Identity};
use crate::pipeline::image::{GLYPH, Image, wrap_text};
use crate::serve::convert::Limits;
use crate::serve::pb;
use crate::serve::session::SessionSecret;
use crate::serve::{ServeConfig, Server};

/// Space between cells and around text.
pub const PAD: usize = 6;
/// Width of the row-label column: "unaligned" plus padding.
pub const LABEL_W: usize = 9 * GLYPH + 2 * PAD;
/// Caption lines under a column's role.
pub const CAPTION_LINES: usize = 3;
const LINE_H: usize = GLYPH + 2;
/// Height of the header: role line, caption lines, padding.
pub const HEADER_H: usize = PAD + LINE_H + CAPTION_LINES * LINE_H + PAD;

const BACKGROUND: [u8; 3] = [24, 24, 28];
const TEXT: [u8; 3] = [235, 235, 235];
const DIM_TEXT: [u8; 3] = [160, 160, 170];
const MARK: [u8; 3] = [255, 170, 40];

/// `stylealign demo` options.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 12)]
    pub steps: u32,
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Where things go on the contact sheet (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SheetLayout {
    pub zoom: usize,
    pub cell: usize,
    pub cols: usize,
    pub rows: usize,
    pub width: usize,
    pub height: usize,
}

impl SheetLayout {
    pub fn new(size: usize, cols: usize, rows: usize) -> Self {
        let zoom = (128 / size.max(1)).max(1);
        let cell = size * zoom;
        Self { zoom, cell, cols, rows, width: LABEL_W + cols * (cell + PAD), height: HEADER_H + rows * (cell + PAD) }
    }

    /// Top-left corner of the cell of row `r`, column `c`.
    pub fn cell_origin(&self, r: usize, c: usize) -> (usize, usize) {
        (LABEL_W + c * (self.cell + PAD), HEADER_H + r * (self.cell + PAD))
    }
}

/// The labelled contact sheet: `rows` = (label, images), all images of one size; `captions`
/// are the columns' prompts. Column 0 is the reference.
pub fn labelled_sheet(rows: &[(&str, Vec<Image>)], captions: &[String]) -> anyhow::Result<Image> {
    let first = rows.first().and_then(|(_, r)| r.first()).context("no images for the contact sheet")?;
    let size = first.width;
    let cols = rows.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    if rows.iter().flat_map(|(_, r)| r).any(|im| im.width != size || im.height != size) {
        anyhow::bail!("the contact sheet needs square images of one size");
    }
    let l = SheetLayout::new(size, cols, rows.len());
    let mut sheet = Image::filled(l.width, l.height, BACKGROUND);
    let chars = l.cell / GLYPH;
    for c in 0..cols {
        let (x, _) = l.cell_origin(0, c);
        let (role, colour) = if c == 0 { ("reference".to_string(), MARK) } else { (format!("target {c}"), TEXT) };
        sheet.draw_text(x, PAD, &role.chars().take(chars).collect::<String>(), colour);
        for (i, line) in wrap_text(captions.get(c).map(String::as_str).unwrap_or(""), chars, CAPTION_LINES).iter().enumerate() {
            sheet.draw_text(x, PAD + LINE_H * (i + 1), line, DIM_TEXT);
        }
    }
    for (r, (label, images)) in rows.iter().enumerate() {
        let (_, y) = l.cell_origin(r, 0);
        sheet.draw_text(PAD, y + (l.cell - GLYPH) / 2, label, TEXT);
        for (c, im) in images.iter().enumerate() {
            let (x, y) = l.cell_origin(r, c);
            if c == 0 {
                // A frame around the reference, in the padding.
                sheet.fill_rect(x - 3, y - 3, l.cell + 6, l.cell + 6, MARK);
            }
            sheet.blit(im, x, y, l.zoom);
        }
    }
    Ok(sheet)
}

/// sRGB (8-bit) to CIE L*a*b* (D65).
fn lab(rgb: [u8; 3]) -> [f64; 3] {
    let lin = |v: u8| {
        let c = v as f64 / 255.0;
        if c <= 0.04045 { c / 12.92 } else { ((c + 0.055) / 1.055).powf(2.4) }
    };
    let (r, g, b) = (lin(rgb[0]), lin(rgb[1]), lin(rgb[2]));
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f64| if t > 216.0 / 24389.0 { t.cbrt() } else { (24389.0 / 27.0 * t + 16.0) / 116.0 };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Colour statistics of an image: per-channel mean and standard deviation in L*a*b*.
pub fn colour_stats(im: &Image) -> [f64; 6] {
    let px: Vec<[f64; 3]> = im.rgb.chunks_exact(3).map(|p| lab([p[0], p[1], p[2]])).collect();
    let n = px.len().max(1) as f64;
    let mut out = [0.0; 6];
    for ch in 0..3 {
        let mean = px.iter().map(|p| p[ch]).sum::<f64>() / n;
        let var = px.iter().map(|p| (p[ch] - mean).powi(2)).sum::<f64>() / n;
        out[ch] = mean;
        out[3 + ch] = var.sqrt();
    }
    out
}

/// Distance between two images' colour statistics (Euclidean, in L*a*b* units).
pub fn colour_distance(a: &Image, b: &Image) -> f64 {
    let (sa, sb) = (colour_stats(a), colour_stats(b));
    sa.iter().zip(&sb).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
}

/// Each target's colour distance to the row's reference (image 0).
pub fn distances_to_reference(row: &[Image]) -> Vec<f64> {
    row.iter().skip(1).map(|t| colour_distance(t, &row[0])).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Runs server and client in one process on the embedded model; writes PNGs, the labelled
/// contact sheet, and prints the alignment measure.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let cfg = ServeConfig {
        listen: "127.0.0.1:0".parse()?,
        admin_listen: None,
        session_secret: Some(SessionSecret::random()),
        limits: Limits { default_steps: a.steps.max(1) as usize, ..ServeConfig::default().limits },
        ..ServeConfig::default()
    };
    let server = Server::bind(cfg).await?;
    server.load().await?;
    let addr = server.addr().to_string();
    client::out(format_args!("demo server on {addr} (embedded tiny model)"))?;
    let who = Identity::client("demo");
    let mut c = client::connect(&addr).await?;
    let models = c.list_models(who.request(pb::ListModelsRequest {}, None)).await?.into_inner();
    for m in &models.models {
        client::out(format_args!(
            "model {} ({:?}, native {}x{}, multiple {}, hash {})",
            m.name,
            pb::Family::try_from(m.family).unwrap_or_default(),
            m.native_width,
            m.native_height,
            m.size_multiple,
            m.hash
        ))?;
    }
    let prompts = ["a house, flat vector art", "a tree, flat vector art", "a car, flat vector art", "a boat, flat vector art"];
    // "unaligned": the patch switched off entirely (no shared attention, no shared norms, no AdaIN).
    let off = pb::OfficialArgs {
        share_group_norm: Some(false),
        share_layer_norm: Some(false),
        share_attention: Some(false),
        adain_queries: Some(false),
        adain_keys: Some(false),
        adain_values: Some(false),
        ..Default::default()
    };
    let sets: [(&str, pb::PatchModelRequest); 2] = [
        ("aligned", pb::PatchModelRequest { model: "tiny".into(), ..Default::default() }),
        ("unaligned", pb::PatchModelRequest { model: "tiny".into(), advanced: Some(off), ..Default::default() }),
    ];
    let mut rows: Vec<(&str, Vec<Image>)> = Vec::new();
    for (name, patch) in sets {
        let session = c.patch_model(who.request(patch, None)).await.with_context(|| format!("PatchModel ({name})"))?.into_inner();
        let req = pb::GenerateRequest {
            session_id: session.session_id.clone(),
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            seed: Some(a.seed),
            steps: a.steps,
            width: a.size,
            height: a.size,
            ..Default::default()
        };
        let r = client::generate(&mut c, &who, req, Some(Duration::from_secs(300)), |_| {})
            .await
            .with_context(|| format!("Generate ({name})"))?;
        for p in client::write_images(&a.out, name, &r.images)? {
            client::out(format_args!("{}", p.display()))?;
        }
        let images = r
            .images
            .iter()
            .map(|i| Image::from_png(&i.png).map(|(im, _)| im).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        rows.push((name, images));
        c.release_session(who.request(pb::ReleaseSessionRequest { session_id: session.session_id }, None)).await?;
    }
    server.shutdown().await;

    let captions: Vec<String> = prompts.iter().map(|s| s.to_string()).collect();
    let sheet = labelled_sheet(&rows, &captions)?;
    let path = a.out.join("contact_sheet.png");
    std::fs::write(&path, sheet.to_png(&[("title".to_string(), "stylealign demo: aligned vs unaligned".to_string())]))
        .with_context(|| path.display().to_string())?;
    client::out(format_args!(
        "{} ({}x{}; row 1: style-aligned, row 2: same prompts and seed, patch disabled; column 1: the reference)",
        path.display(),
        sheet.width,
        sheet.height
    ))?;

    client::out(format_args!(
        "alignment: colour distance of each target to its row's reference (L*a*b* mean and std per channel, Euclidean; lower = closer in style)"
    ))?;
    let mut means = Vec::new();
    for (name, images) in &rows {
        let d = distances_to_reference(images);
        let m = mean(&d);
        client::out(format_args!(
            "alignment distance {name}: {m:.3} (targets: {})",
            d.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(", ")
        ))?;
        means.push(m);
    }
    if let [aligned, unaligned] = means[..] {
        client::out(format_args!("alignment ratio aligned/unaligned: {:.3}", aligned / unaligned))?;
    }
    Ok(())
}
