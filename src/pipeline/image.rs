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
        let data: Vec<f32> = (images / 2.0 + 0.5).clamp(0.0, 1.0).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 image data");
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
}

/// Width and height in pixels of one character of [`Image::draw_text`] (an 8×8 bitmap font).
pub const GLYPH: usize = 8;

impl Image {
    /// An image of one colour.
    pub fn filled(width: usize, height: usize, colour: [u8; 3]) -> Image {
        Image { width, height, rgb: colour.iter().copied().cycle().take(width * height * 3).collect() }
    }

    /// Sets one pixel; pixels outside the image are ignored.
    pub fn put(&mut self, x: usize, y: usize, colour: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.rgb[i..i + 3].copy_from_slice(&colour);
        }
    }

    /// Fills a rectangle (clipped to the image).
    pub fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, colour: [u8; 3]) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                self.put(xx, yy, colour);
            }
        }
    }

    /// Copies `src` with its top-left corner at (`x`, `y`), each pixel enlarged to `zoom` × `zoom`
    /// (nearest neighbour); clipped to the image.
    pub fn blit(&mut self, src: &Image, x: usize, y: usize, zoom: usize) {
        let zoom = zoom.max(1);
        for sy in 0..src.height * zoom {
            for sx in 0..src.width * zoom {
                let i = ((sy / zoom) * src.width + sx / zoom) * 3;
                self.put(x + sx, y + sy, [src.rgb[i], src.rgb[i + 1], src.rgb[i + 2]]);
            }
        }
    }

    /// Draws one line of text (8×8 bitmap font, public-domain `font8x8`) with its top-left corner
    /// at (`x`, `y`); characters without a glyph are drawn as `?`. Returns the width drawn.
    pub fn draw_text(&mut self, x: usize, y: usize, text: &str, colour: [u8; 3]) -> usize {
        use font8x8::UnicodeFonts as _;
        let fonts = (font8x8::BASIC_FONTS, font8x8::LATIN_FONTS);
        let mut cx = x;
        for ch in text.chars() {
            let glyph = fonts.0.get(ch).or_else(|| fonts.1.get(ch)).or_else(|| fonts.0.get('?')).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..GLYPH {
                    // Bit 0 is the leftmost pixel.
                    if bits & (1 << col) != 0 {
                        self.put(cx + col, y + row, colour);
                    }
                }
            }
            cx += GLYPH;
        }
        cx - x
    }
}

/// Splits `text` into lines of at most `width` characters, breaking at spaces where it can (a
/// word longer than a line is cut). At most `max_lines` lines: if the text does not fit, the last
/// line ends with `..`.
pub fn wrap_text(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = line.chars().count();
            let sep = usize::from(used > 0);
            if used + sep + word.len() <= width {
                if sep == 1 {
                    line.push(' ');
                }
                line.extend(word.iter());
                break;
            }
            if used > 0 {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            // A word longer than a line.
            line = word[..width].iter().collect();
            word.drain(..width);
            lines.push(std::mem::take(&mut line));
            if word.is_empty() {
                break;
            }
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            let keep: String = last.chars().take(width.saturating_sub(2)).collect();
            *last = format!("{keep}..");
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_in_the_glyph_box() {
        let mut im = Image::filled(40, 10, [0, 0, 0]);
        let w = im.draw_text(1, 1, "Hi!", [255, 255, 255]);
        assert_eq!(w, 3 * GLYPH);
        let lit = |x0: usize, x1: usize| {
            (1..9).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| im.rgb[(y * 40 + x) * 3] == 255).count()
        };
        assert!(lit(1, 9) > 8 && lit(9, 17) > 4 && lit(17, 25) > 4, "every glyph has pixels");
        assert_eq!(lit(25, 40), 0, "nothing past the text");
        assert!(im.rgb[..40 * 3].iter().all(|&v| v == 0), "nothing above the box");
    }

    #[test]
    fn blit_enlarges_and_wraps_break_at_spaces() {
        let src = Image { width: 2, height: 1, rgb: vec![10, 20, 30, 40, 50, 60] };
        let mut im = Image::filled(6, 3, [0, 0, 0]);
        im.blit(&src, 1, 1, 2);
        assert_eq!(&im.rgb[(6 + 1) * 3..(6 + 1) * 3 + 3], &[10, 20, 30]);
        assert_eq!(&im.rgb[(2 * 6 + 4) * 3..(2 * 6 + 4) * 3 + 3], &[40, 50, 60]);
        assert_eq!(&im.rgb[..3], &[0, 0, 0]);
        assert_eq!(wrap_text("a house, flat vector art", 16, 3), vec!["a house, flat", "vector art"]);
        assert_eq!(wrap_text("abcdefghij", 4, 5), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap_text("one two three four", 5, 2), vec!["one", "two.."]);
    }
}
