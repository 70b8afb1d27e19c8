//! Line charts written as SVG text: axes, grid, ticks, a legend, one polyline per
//! series. Enough for "delivered vs offered" and latency CDFs; no plotting library.

use std::fmt::Write;

/// One line on a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Dashed line (e.g. a reference, like the bare forwarder).
    pub dashed: bool,
}

/// A chart's description.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis (latency).
    pub x_log: bool,
    /// Fixed x ticks (value, label); otherwise computed.
    pub x_ticks: Option<Vec<(f64, String)>>,
    /// Fixed y range; otherwise 0 to the largest value.
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
}

const W: f64 = 820.0;
const H: f64 = 460.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A "nice" step (1, 2 or 5 times a power of ten) for about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    let k = if m < 1.5 {
        1.0
    } else if m < 3.5 {
        2.0
    } else if m < 7.5 {
        5.0
    } else {
        10.0
    };
    k * p
}

/// Short number labels: 1.5M, 250k, 12, 0.5.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_owned()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the chart.
pub fn render(c: &Chart) -> String {
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for &(x, y) in pts {
        if c.x_log && x <= 0.0 {
            continue;
        }
        x0 = x0.min(x);
        x1 = x1.max(x);
        ymax = ymax.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if let Some(t) = &c.x_ticks {
        for (v, _) in t {
            x0 = x0.min(*v);
            x1 = x1.max(*v);
        }
    }
    let (lx0, lx1) = if c.x_log {
        let a = 10f64.powf(x0.log10().floor());
        let b = 10f64.powf(x1.log10().ceil());
        (a.log10(), b.log10().max(a.log10() + 1.0))
    } else {
        let pad = (x1 - x0).abs().max(1e-9) * 0.04;
        (x0 - pad, x1 + pad)
    };
    let (y0, y1) = c.y_range.unwrap_or_else(|| {
        let step = nice_step(ymax.max(1e-9), 5.0);
        (0.0, (ymax / step).ceil().max(1.0) * step)
    });
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| {
        let v = if c.x_log { x.max(1e-12).log10() } else { x };
        LEFT + (v - lx0) / (lx1 - lx0) * pw
    };
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0).max(1e-12) * ph;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        LEFT + pw / 2.0,
        esc(&c.title)
    );
    // y grid and ticks
    let ystep = nice_step(y1 - y0, 5.0);
    let mut y = y0;
    while y <= y1 + ystep * 1e-6 {
        let py = sy(y);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            py + 4.0,
            short(y)
        );
        y += ystep;
    }
    // x grid and ticks
    let xticks: Vec<(f64, String)> = match (&c.x_ticks, c.x_log) {
        (Some(t), _) => t.clone(),
        (None, true) => {
            let mut v = Vec::new();
            let mut e = lx0.round() as i32;
            while f64::from(e) <= lx1 + 1e-9 {
                for m in [1.0, 2.0, 5.0] {
                    let x = m * 10f64.powi(e);
                    if x.log10() >= lx0 - 1e-9 && x.log10() <= lx1 + 1e-9 {
                        v.push((x, short(x)));
                    }
                }
                e += 1;
            }
            v
        }
        (None, false) => {
            let step = nice_step(x1 - x0, 6.0);
            let mut v = Vec::new();
            let mut x = (x0 / step).ceil() * step;
            while x <= x1 + step * 1e-6 {
                v.push((x, short(x)));
                x += step;
            }
            v
        }
    };
    for (x, label) in &xticks {
        let px = sx(*x);
        let _ = writeln!(
            o,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 18.0,
            esc(label)
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 16.0,
        esc(&c.x_label)
    );
    let _ = writeln!(
        o,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(&c.y_label)
    );
    // series
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|(x, _)| !c.x_log || *x > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y.clamp(y0, y1))))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            pts.join(" ")
        );
        if s.points.len() <= 20 {
            for p in &pts {
                if let Some((x, y)) = p.split_once(',') {
                    let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
                }
            }
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 14.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_well_formed_svg() {
        let c = Chart {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: true,
            x_ticks: None,
            y_range: Some((0.0, 1.0)),
            series: vec![Series {
                name: "a".into(),
                points: vec![(10.0, 0.1), (100.0, 0.5), (1000.0, 1.0)],
                dashed: false,
            }],
        };
        let s = render(&c);
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains("t &lt;1&gt;"));
        assert!(s.contains("<polyline"));
        assert_eq!(short(250_000.0), "250k");
        assert_eq!(short(1_500_000.0), "1.5M");
    }
}
