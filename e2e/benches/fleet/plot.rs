//! The page's figure: fan-out rates and hub memory against fleet size, drawn with plotters
//! into an RGB buffer and written as PNG. Text needs a TrueType font: DejaVu Sans (Debian's
//! fonts-dejavu-core) or `KMM_BENCH_FONT`; without one the plot is skipped.

use std::path::Path;

use anyhow::{Context as _, bail};
use plotters::prelude::*;

use crate::results::{EndToEnd, FanOut, Outcome};

const W: u32 = 1200;
const H: u32 = 480;
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let path = std::env::var("KMM_BENCH_FONT")
        .ok()
        .into_iter()
        .chain(FONT_CANDIDATES.iter().map(|s| s.to_string()))
        .find(|p| Path::new(p).is_file())
        .context("no TrueType font (install fonts-dejavu-core or set KMM_BENCH_FONT)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(&path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

pub fn render(fanout: &[FanOut], out: &Path) -> anyhow::Result<()> {
    if fanout.is_empty() {
        bail!("no fan-out results to plot");
    }
    register_font()?;
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(W * 3 / 5);
        rates(&left, fanout).map_err(|e| anyhow::anyhow!("rates panel: {e}"))?;
        memory(&right, fanout).map_err(|e| anyhow::anyhow!("memory panel: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    write_png(&buf, (W, H), out)
}

fn write_png(buf: &[u8], (w, h): (u32, u32), out: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(buf)?;
    Ok(())
}

const E2E_W: u32 = 1200;
const E2E_H: u32 = 300;

/// The end-to-end figure: one stacked bar per event (MCM apply, kernel change), a segment
/// per leg.
pub fn render_e2e(e: &EndToEnd, out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let a = &e.apply;
    let mut bars: Vec<(String, Vec<(&str, f64)>)> = vec![(
        "MCM apply".into(),
        vec![
            ("hub", a.hub_s),
            ("OCM delivery", a.ocm_s),
            ("spoke", a.spoke_s),
        ],
    )];
    if let Some(c) = e.change.iter().find_map(Outcome::done) {
        bars.push((
            "kernel change".into(),
            vec![
                ("spoke agent: claim", c.spoke_agent_s),
                ("OCM registration", c.registration_s),
                ("hub", c.hub_s),
                ("OCM delivery", c.ocm_s),
                ("spoke", c.spoke_s),
            ],
        ));
    }
    let mut buf = vec![0u8; (E2E_W * E2E_H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (E2E_W, E2E_H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        e2e_bars(&root, &bars).map_err(|e| anyhow::anyhow!("end-to-end bars: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    write_png(&buf, (E2E_W, E2E_H), out)
}

fn leg_color(leg: &str) -> RGBColor {
    match leg {
        "hub" => RGBColor(30, 100, 200),
        "OCM delivery" => RGBColor(230, 140, 20),
        "spoke" => RGBColor(40, 160, 80),
        "OCM registration" => RGBColor(200, 40, 40),
        _ => RGBColor(150, 90, 190),
    }
}

fn e2e_bars(area: &Area<'_>, bars: &[(String, Vec<(&str, f64)>)]) -> DrawResult {
    let total = bars
        .iter()
        .map(|(_, legs)| legs.iter().map(|(_, s)| s.max(0.0)).sum::<f64>())
        .fold(0.0f64, f64::max);
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "End to end with the real OCM agents: where the time goes",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(130)
        .build_cartesian_2d(0.0..(total * 1.1).max(0.1), 0.0..n)?;
    let names: Vec<String> = bars.iter().map(|(name, _)| name.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("seconds")
        .y_labels(bars.len() * 2 + 1)
        .y_label_formatter(&|y| {
            // Bar i spans [n-1-i, n-i]; label its middle.
            let i = n - y - 0.5;
            if (i - i.round()).abs() < 0.01 && i >= 0.0 {
                names.get(i.round() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_formatter(&|x| format!("{x:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let mut labelled: Vec<&str> = Vec::new();
    for (i, (_, legs)) in bars.iter().enumerate() {
        let (y0, y1) = (n - 1.0 - i as f64 + 0.2, n - i as f64 - 0.2);
        let mut x = 0.0;
        for &(leg, secs) in legs {
            let secs = secs.max(0.0);
            let color = leg_color(leg);
            let series = chart.draw_series(std::iter::once(Rectangle::new(
                [(x, y0), (x + secs, y1)],
                color.filled(),
            )))?;
            if !labelled.contains(&leg) {
                labelled.push(leg);
                series.label(leg).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
            }
            x += secs;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn x_range(fanout: &[FanOut]) -> std::ops::Range<f64> {
    let min = fanout.iter().map(|f| f.clusters).min().unwrap_or(100) as f64;
    let max = fanout.iter().map(|f| f.clusters).max().unwrap_or(10_000) as f64;
    (min * 0.7)..(max * 1.4)
}

fn series(
    chart: &mut ChartContext<
        '_,
        BitMapBackend<'_>,
        Cartesian2d<
            plotters::coord::combinators::LogCoord<f64>,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    label: &str,
    dashed: bool,
) -> DrawResult {
    let style = color.stroke_width(3);
    if dashed {
        chart
            .draw_series(DashedLineSeries::new(points.clone(), 8, 6, style))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    } else {
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart.draw_series(
        points
            .into_iter()
            .map(|p| Circle::new(p, 5, color.filled())),
    )?;
    Ok(())
}

fn rates(area: &Area<'_>, fanout: &[FanOut]) -> DrawResult {
    let ymax = fanout
        .iter()
        .flat_map(|f| {
            [
                f.hub.per_second,
                f.limit_per_second,
                f.apply_plain.per_second,
            ]
        })
        .fold(0.0f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "ManifestWorks written per second (one MCM)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(fanout).log_scale(), 0.0..ymax.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("clusters (log scale)")
        // Few labels: a log axis over one decade otherwise crowds them at its end.
        .x_labels(4)
        .y_desc("writes/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let pts = |f: &dyn Fn(&FanOut) -> f64| -> Vec<(f64, f64)> {
        fanout.iter().map(|r| (r.clusters as f64, f(r))).collect()
    };
    series(
        &mut chart,
        pts(&|r| r.limit_per_second),
        RGBColor(90, 90, 90),
        "plain creates (the limit)",
        false,
    )?;
    series(
        &mut chart,
        pts(&|r| r.limit_per_second * 0.7),
        RGBColor(90, 90, 90),
        "70% of the limit (target at 10,000)",
        true,
    )?;
    series(
        &mut chart,
        pts(&|r| r.apply_plain.per_second),
        RGBColor(230, 140, 20),
        "plain server-side applies",
        false,
    )?;
    series(
        &mut chart,
        pts(&|r| r.hub.per_second),
        RGBColor(30, 100, 200),
        "kmm-hub fan-out",
        false,
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn memory(area: &Area<'_>, fanout: &[FanOut]) -> DrawResult {
    let ymax = fanout
        .iter()
        .flat_map(|f| [f.memory.peak_mib, f.resync.memory.peak_mib])
        .fold(150.0f64, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(area)
        .caption("kmm-hub peak RSS", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(fanout).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("clusters (log scale)")
        // Few labels: a log axis over one decade otherwise crowds them at its end.
        .x_labels(4)
        .y_desc("MiB")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let xs: Vec<f64> = fanout.iter().map(|r| r.clusters as f64).collect();
    series(
        &mut chart,
        xs.iter().map(|x| (*x, 150.0)).collect(),
        RGBColor(200, 40, 40),
        "target 150 MiB",
        true,
    )?;
    series(
        &mut chart,
        fanout
            .iter()
            .map(|r| (r.clusters as f64, r.memory.peak_mib))
            .collect(),
        RGBColor(30, 100, 200),
        "during the fan-out",
        false,
    )?;
    series(
        &mut chart,
        fanout
            .iter()
            .map(|r| (r.clusters as f64, r.resync.memory.peak_mib))
            .collect(),
        RGBColor(40, 160, 80),
        "restarted with N works",
        false,
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
