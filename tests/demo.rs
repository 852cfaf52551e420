//! `stylealign demo` through the CLI: it writes both rows' PNGs and a labelled contact sheet of
//! the documented layout, and the printed alignment distance of the style-aligned row is below
//! that of the same set with the patch disabled.

use std::path::Path;
use std::process::Command;

use stylealign::pipeline::image::Image;

fn read(path: &Path) -> Image {
    Image::from_png(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap().0
}

fn pixel(im: &Image, x: usize, y: usize) -> [u8; 3] {
    let i = (y * im.width + x) * 3;
    [im.rgb[i], im.rgb[i + 1], im.rgb[i + 2]]
}

fn printed(stdout: &str, prefix: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line `{prefix}` in:\n{stdout}"));
    line[prefix.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn demo_writes_a_labelled_sheet_and_aligned_is_closer() {
    let out = std::env::temp_dir().join(format!("stylealign-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let size = 64usize;
    let run = Command::new(env!("CARGO_BIN_EXE_stylealign"))
        .args(["demo", "--out", out.to_str().unwrap(), "--steps", "8", "--size", &size.to_string(), "--seed", "7"])
        .output()
        .expect("run stylealign demo");
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(!stderr.contains("panicked at"), "the demo's server panicked:\n{stderr}");

    // Layout: label column 9·8 + 2·6 = 84 px, header 6 + 10 + 3·10 + 6 = 52 px, cells of
    // 64·2 = 128 px with 6 px between them; 4 columns, 2 rows.
    let (label_w, header_h, pad, zoom) = (84usize, 52usize, 6usize, 2usize);
    let cell = size * zoom;
    let sheet = read(&out.join("contact_sheet.png"));
    assert_eq!((sheet.width, sheet.height), (label_w + 4 * (cell + pad), header_h + 2 * (cell + pad)));
    let background = pixel(&sheet, 0, 0);
    for (r, row) in ["aligned", "unaligned"].iter().enumerate() {
        let y0 = header_h + r * (cell + pad);
        for c in 0..4 {
            // Every image, enlarged, in its cell.
            let im = read(&out.join(format!("{row}_{c:02}.png")));
            assert_eq!((im.width, im.height), (size, size));
            let x0 = label_w + c * (cell + pad);
            for y in 0..cell {
                for x in 0..cell {
                    let (got, want) = (pixel(&sheet, x0 + x, y0 + y), pixel(&im, x / zoom, y / zoom));
                    assert!(got == want, "{row} {c} at ({x}, {y}): {got:?} on the sheet, {want:?} in the image");
                }
            }
            // The reference column is framed; the others are not.
            let frame = pixel(&sheet, x0 - 2, y0 - 2);
            if c == 0 {
                assert_ne!(frame, background, "reference frame");
            } else {
                assert_eq!(frame, background);
            }
        }
        // A row label left of the row.
        let ink =
            (y0..y0 + cell).flat_map(|y| (0..label_w).map(move |x| (x, y))).filter(|&(x, y)| pixel(&sheet, x, y) != background).count();
        assert!(ink > 40, "row label of {row}: {ink} pixels");
    }
    // Column headers (role and caption) above every column.
    for c in 0..4 {
        let x0 = label_w + c * (cell + pad);
        let ink = (0..header_h - pad)
            .flat_map(|y| (x0..x0 + cell).map(move |x| (x, y)))
            .filter(|&(x, y)| pixel(&sheet, x, y) != background)
            .count();
        assert!(ink > 100, "header of column {c}: {ink} pixels");
    }
    // Same prompts and seed: the reference is the same image in both rows (up to rounding: the
    // patched and unpatched paths differ in float operation order).
    let (ra, ru) = (read(&out.join("aligned_00.png")), read(&out.join("unaligned_00.png")));
    let max_diff = ra.rgb.iter().zip(&ru.rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max_diff <= 2, "the two rows' references differ by up to {max_diff}");

    let aligned = printed(&stdout, "alignment distance aligned: ");
    let unaligned = printed(&stdout, "alignment distance unaligned: ");
    let ratio = printed(&stdout, "alignment ratio aligned/unaligned: ");
    println!("aligned {aligned}, unaligned {unaligned}, ratio {ratio}");
    assert!(aligned < unaligned, "the style-aligned targets are closer in colour to the reference: {aligned} vs {unaligned}");
    assert!((ratio - aligned / unaligned).abs() < 0.01);
    std::fs::remove_dir_all(&out).unwrap();
}
