//! Colours shared by the renderings: one light colour per expert (text stays readable on it, in the
//! HTML and on a terminal alike) and the diverging scale of the heatmaps.

/// Tableau 10: distinct hues, in a fixed order so that expert 3 has the same colour everywhere.
const BASE: [(u8, u8, u8); 10] = [
    (0x4e, 0x79, 0xa7),
    (0xf2, 0x8e, 0x2b),
    (0xe1, 0x57, 0x59),
    (0x76, 0xb7, 0xb2),
    (0x59, 0xa1, 0x4f),
    (0xed, 0xc9, 0x48),
    (0xb0, 0x7a, 0xa1),
    (0xff, 0x9d, 0xa7),
    (0x9c, 0x75, 0x5f),
    (0xba, 0xb0, 0xac),
];

pub type Rgb = (u8, u8, u8);

/// The background colour of `expert` among `n_experts`: Tableau 10 lightened for up to 10 experts,
/// evenly spaced light hues beyond.
pub fn expert_color(expert: usize, n_experts: usize) -> Rgb {
    let base = if n_experts <= BASE.len() {
        BASE[expert]
    } else {
        hsl_to_rgb(expert as f64 / n_experts as f64, 0.65, 0.5)
    };
    mix(base, (255, 255, 255), 0.35)
}

/// `#rrggbb`.
pub fn hex((r, g, b): Rgb) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// The heatmap colour of a share relative to the uniform share: white at 1×, blue below, red above,
/// saturating at 4× and ¼× (log scale).
pub fn ratio_color(ratio: f64) -> Rgb {
    let t = if ratio <= 0.0 { -1.0 } else { (ratio.log2() / 2.0).clamp(-1.0, 1.0) };
    if t >= 0.0 {
        mix((255, 255, 255), (0xb2, 0x18, 0x2b), t)
    } else {
        mix((255, 255, 255), (0x21, 0x66, 0xac), -t)
    }
}

/// `a` moved towards `b` by `t` (0 → a, 1 → b).
fn mix(a: Rgb, b: Rgb, t: f64) -> Rgb {
    let c = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t).round() as u8;
    (c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
}

fn hsl_to_rgb(h: f64, s: f64, l: f64) -> Rgb {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let hp = h * 6.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    let u = |v: f64| ((v + m) * 255.0).round() as u8;
    (u(r), u(g), u(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_get_distinct_colours_and_the_scale_is_white_at_uniform() {
        for n in [8, 10, 64] {
            let colours: std::collections::HashSet<Rgb> = (0..n).map(|e| expert_color(e, n)).collect();
            assert_eq!(colours.len(), n);
        }
        assert_eq!(ratio_color(1.0), (255, 255, 255));
        assert_eq!(ratio_color(8.0), (0xb2, 0x18, 0x2b));
        assert_eq!(ratio_color(0.0), (0x21, 0x66, 0xac));
        assert_eq!(hex((1, 2, 255)), "#0102ff");
    }
}
