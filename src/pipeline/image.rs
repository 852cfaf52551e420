//! 8-bit RGB images and PNG encoding with text chunks.

use burn::tensor::Tensor;

/// An RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    /// Converts decoded images (B, 3, H, W) in about [-1, 1] as diffusers does:
    /// `(x / 2 + 0.5).clamp(0, 1)`, then `round(255 · v)`.
    pub fn from_tensor(images: Tensor<4>) -> Vec<Image> {
        let [b, c, h, w] = images.dims();
        let data: Vec<f32> = (images / 2.0 + 0.5)
            .clamp(0.0, 1.0)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 image data");
        (0..b)
            .map(|i| {
                let mut rgb = vec![0u8; h * w * 3];
                for y in 0..h {
                    for x in 0..w {
                        for ch in 0..3 {
                            let v = data[((i * c + ch.min(c - 1)) * h + y) * w + x];
                            rgb[(y * w + x) * 3 + ch] = (v * 255.0).round() as u8;
                        }
                    }
                }
                Image { width: w, height: h, rgb }
            })
            .collect()
    }

    /// PNG bytes with one iTXt chunk per `(keyword, text)` pair (UTF-8 text). Encoding is
    /// deterministic: the same image and text give the same bytes.
    pub fn to_png(&self, text: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (k, v) in text {
                enc.add_itxt_chunk(k.clone(), v.clone()).expect("valid PNG text keyword");
            }
            let mut writer = enc.write_header().expect("PNG header");
            writer.write_image_data(&self.rgb).expect("PNG data");
        }
        out
    }

    /// Decodes an 8-bit RGB/RGBA/grey PNG.
    pub fn from_png(bytes: &[u8]) -> Result<(Image, Vec<(String, String)>), String> {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().map_err(|e| format!("not a PNG: {e}"))?;
        let mut buf = vec![0u8; reader.output_buffer_size().ok_or("PNG too large")?];
        let frame = reader.next_frame(&mut buf).map_err(|e| format!("bad PNG data: {e}"))?;
        let (w, h) = (frame.width as usize, frame.height as usize);
        let channels = frame.color_type.samples();
        let px = &buf[..frame.buffer_size()];
        let mut rgb = Vec::with_capacity(w * h * 3);
        for p in px.chunks_exact(channels) {
            match channels {
                1 | 2 => rgb.extend([p[0]; 3]),
                _ => rgb.extend(&p[..3]),
            }
        }
        let info = reader.info();
        let text = info
            .utf8_text
            .iter()
            .filter_map(|c| c.get_text().ok().map(|t| (c.keyword.clone(), t)))
            .chain(info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())))
            .collect();
        Ok((Image { width: w, height: h, rgb }, text))
    }

    /// A grid of equally sized images, `cols` per row (a contact sheet).
    pub fn grid(images: &[Image], cols: usize) -> Option<Image> {
        let first = images.first()?;
        let (w, h) = (first.width, first.height);
        let cols = cols.max(1).min(images.len());
        let rows = images.len().div_ceil(cols);
        let (gw, gh) = (w * cols, h * rows);
        let mut rgb = vec![0u8; gw * gh * 3];
        for (i, im) in images.iter().enumerate() {
            if im.width != w || im.height != h {
                return None;
            }
            let (ox, oy) = ((i % cols) * w, (i / cols) * h);
            for y in 0..h {
                let src = &im.rgb[y * w * 3..(y + 1) * w * 3];
                let dst = ((oy + y) * gw + ox) * 3;
                rgb[dst..dst + w * 3].copy_from_slice(src);
            }
        }
        Some(Image { width: gw, height: gh, rgb })
    }
}
