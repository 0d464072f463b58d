//! The pipeline's figure: loss curves per training run and the methods' metrics as bars, drawn
//! on an RGB canvas and written as a PNG.
//!
//! Why not a plotting crate: the figure needs lines, bars and a few labels; a canvas, a 5x7
//! bitmap font and a PNG writer over flate2 and crc32fast (already in the build through tch)
//! cost a page and no new dependency, and need no system fonts in CI or in the images.

use std::io::Write;
use std::path::Path;

/// An RGB image.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [200, 200, 200];
/// Distinct series colours (Tableau 10).
pub const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

impl Canvas {
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: WHITE.repeat(width * height),
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = 3 * (y as usize * self.width + x as usize);
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line two pixels thick (Bresenham).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x + 1, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 5x7 font, upper-cased, `scale` pixels per font pixel; returns the width.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Rgb) -> i64 {
        let mut cx = x;
        for ch in text.chars().flat_map(char::to_uppercase) {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.rect(
                            cx + col * scale,
                            y + r as i64 * scale,
                            cx + col * scale + scale - 1,
                            y + r as i64 * scale + scale - 1,
                            c,
                        );
                    }
                }
            }
            cx += 6 * scale;
        }
        cx - x
    }

    /// The image as PNG bytes (8-bit RGB, no filtering, zlib-compressed).
    pub fn png(&self) -> std::io::Result<Vec<u8>> {
        let mut raw = Vec::with_capacity(self.height * (1 + 3 * self.width));
        for row in self.pixels.chunks(3 * self.width) {
            raw.push(0); // filter type None
            raw.extend_from_slice(row);
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw)?;
        let idat = z.finish()?;
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter, no interlace
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [
            (b"IHDR", &ihdr[..]),
            (b"IDAT", &idat[..]),
            (b"IEND", &[][..]),
        ] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(kind);
            crc.update(data);
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend_from_slice(&crc.finalize().to_be_bytes());
        }
        Ok(out)
    }
}

/// 5x7 glyphs, one byte per row, bit 4 the leftmost column. Unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '/' => [1, 1, 2, 4, 8, 16, 16],
        '@' => [14, 17, 1, 13, 21, 21, 14],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        _ => [0; 7],
    }
}

/// One training run's loss curve: (step, total loss) points.
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One method's bars: generative HR@1, ValidRatio, ranking HR@1 (None: not measured).
pub struct Bars {
    pub name: String,
    pub values: [Option<f64>; 3],
}

/// The figure: loss curves on the left, metrics on the right, written atomically to `path`.
pub fn write_figure(
    path: &Path,
    title: &str,
    curves: &[Curve],
    bars: &[Bars],
) -> std::io::Result<()> {
    // Room below the plots for one legend line per curve or method.
    let legend_lines = curves.len().max(bars.len());
    let (w, h) = (1200usize, 570 + 22 * legend_lines);
    let mut c = Canvas::new(w, h);
    c.text(20, 12, title, 2, BLACK);

    // Left: loss against step.
    let (l0, t0, l1, b0) = (70i64, 70i64, 560i64, 520i64);
    c.text(l0, t0 - 24, "training loss by step", 2, BLACK);
    c.rect(l0, b0, l1, b0 + 1, BLACK);
    c.rect(l0, t0, l0 + 1, b0, BLACK);
    let all: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|cv| cv.points.iter().copied())
        .collect();
    let finite = |v: f64| v.is_finite();
    let max_x = all
        .iter()
        .map(|p| p.0)
        .filter(|v| finite(*v))
        .fold(1.0f64, f64::max);
    let max_y = all
        .iter()
        .map(|p| p.1)
        .filter(|v| finite(*v))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    // Clamped to the panel: a negative or huge value (a diverged loss) draws at the edge
    // instead of sending the line rasteriser across 2^63 pixels.
    let px = |x: f64| l0 + ((x / max_x).clamp(0.0, 1.0) * (l1 - l0) as f64) as i64;
    let py = |y: f64| b0 - ((y / max_y).clamp(0.0, 1.0) * (b0 - t0) as f64) as i64;
    for i in 0..=4 {
        let v = max_y * f64::from(i) / 4.0;
        let y = py(v);
        c.rect(l0 - 4, y, l0, y, BLACK);
        c.text(8, y - 7, &format!("{v:.2}"), 2, BLACK);
    }
    c.text(l1 - 60, b0 + 10, &format!("{max_x:.0}"), 2, BLACK);
    c.text(l0, b0 + 10, "0", 2, BLACK);
    for (i, cv) in curves.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<(i64, i64)> = cv
            .points
            .iter()
            .filter(|p| finite(p.0) && finite(p.1))
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        for pair in pts.windows(2) {
            c.line(pair[0], pair[1], colour);
        }
        if let [only] = pts[..] {
            c.rect(only.0 - 2, only.1 - 2, only.0 + 2, only.1 + 2, colour);
        }
        let ly = b0 + 40 + 22 * i as i64;
        c.rect(l0, ly, l0 + 20, ly + 12, colour);
        c.text(l0 + 30, ly, &cv.name, 2, BLACK);
    }

    // Right: per method, three bars in [0, 1].
    let (r0, r1) = (640i64, 1180i64);
    let mut kx = r0;
    for (k, label) in ["hr@1 generative", "validratio", "hr@1 ranking"]
        .iter()
        .enumerate()
    {
        c.rect(kx, t0 - 24, kx + 12, t0 - 12, PALETTE[k]);
        kx += 18 + c.text(kx + 18, t0 - 24, label, 2, BLACK) + 14;
    }
    c.rect(r0, b0, r1, b0 + 1, BLACK);
    for i in 0..=4 {
        let y = b0 - (b0 - t0) * i / 4;
        c.rect(r0, y, r1, y, GREY);
    }
    let n = bars.len().max(1) as i64;
    let group = (r1 - r0) / n;
    let bar_w = (group - 12) / 3;
    for (g, b) in bars.iter().enumerate() {
        let gx = r0 + 6 + group * g as i64;
        for (k, v) in b.values.iter().enumerate() {
            let Some(v) = v.filter(|v| v.is_finite()) else {
                continue;
            };
            let top = b0 - (v.clamp(0.0, 1.0) * (b0 - t0) as f64) as i64;
            let x = gx + bar_w * k as i64;
            c.rect(x, top, x + bar_w - 2, b0, PALETTE[k]);
        }
        let ly = b0 + 40 + 22 * g as i64;
        c.text(r0, ly, &format!("{}: {}", g + 1, b.name), 2, BLACK);
        c.text(gx, b0 + 10, &(g + 1).to_string(), 2, BLACK);
    }
    rsllm_core::artefact::write_atomic(path, &c.png()?)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Parses the chunks back: signature, IHDR size, every CRC, and the inflated image size.
    #[test]
    fn the_png_is_well_formed() {
        let mut c = Canvas::new(7, 3);
        c.line((0, 0), (6, 2), BLACK);
        c.text(0, 0, "a1", 1, PALETTE[0]);
        let png = c.png().unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (mut at, mut chunks, mut idat) = (8, Vec::new(), Vec::new());
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let kind = &png[at + 4..at + 8];
            let data = &png[at + 8..at + 8 + len];
            let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().unwrap());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            assert_eq!(h.finalize(), crc, "{}", String::from_utf8_lossy(kind));
            if kind == b"IHDR" {
                assert_eq!(&data[..8], &[0, 0, 0, 7, 0, 0, 0, 3]);
            }
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            chunks.push(String::from_utf8_lossy(kind).into_owned());
            at += 12 + len;
        }
        assert_eq!(chunks, ["IHDR", "IDAT", "IEND"]);
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw.len(), 3 * (1 + 3 * 7));
        // The line's first pixel is black, a pixel it never reaches stays white.
        assert_eq!(&raw[1..4], &BLACK);
        assert_eq!(&raw[1 + 3 * 6..1 + 3 * 7], &WHITE);
    }

    #[test]
    fn the_figure_is_written_with_nan_and_missing_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fig.png");
        let curves = [
            Curve {
                name: "stage1".into(),
                points: vec![(1.0, 3.0), (2.0, f64::NAN), (3.0, 1.0)],
            },
            Curve {
                name: "stage2".into(),
                points: vec![(1.0, 2.0)],
            },
        ];
        let bars = [Bars {
            name: "rsllm".into(),
            values: [Some(0.2), None, Some(f64::INFINITY)],
        }];
        write_figure(&path, "test", &curves, &bars).unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
    }

    /// A diverged or tampered curve (finite but astronomically far off the axes) is drawn at
    /// the panel's edge: this returns at once instead of rasterising an endless line.
    #[test]
    fn values_far_off_the_axes_are_drawn_at_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fig.png");
        let curves = [Curve {
            name: "diverged".into(),
            points: vec![(1.0, -1e300), (2.0, 1.0), (-1e300, 2.0), (3.0, -5.0)],
        }];
        write_figure(&path, "test", &curves, &[]).unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
    }
}
