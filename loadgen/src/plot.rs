//! `--plot FILE.svg`: the latency percentile spectrum per operation type
//! (x axis in "nines", as HdrHistogram's plotter draws it) above the
//! throughput and p99 over time.

use crate::recorder::{Op, Stats};
use crate::report::Interval;
use plotters::prelude::*;
use std::path::Path;

/// x position of a percentile: 0 at p0, 1 at p90, 2 at p99, 3 at p99.9 ...
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-7).log10()
}

/// The spectrum of a histogram as (nines, latency us) points.
pub fn spectrum(h: &hdrhistogram::Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts: Vec<(f64, f64)> = h
        .iter_quantiles(4)
        .map(|v| {
            (
                nines(v.quantile_iterated_to()),
                v.value_iterated_to() as f64 / 1000.0,
            )
        })
        .filter(|(x, _)| x.is_finite())
        .collect();
    pts.push((nines(1.0), h.max() as f64 / 1000.0));
    pts
}

pub fn draw(path: &Path, title: &str, totals: &Stats, timeline: &[Interval]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(440);

    // Percentile spectrum.
    let series: Vec<(Op, Vec<(f64, f64)>)> = Op::ALL
        .iter()
        .map(|&op| (op, spectrum(&totals.get(op).hist)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(1.0f64, f64::max);
    let y_min = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(y_max, f64::min)
        .max(0.1);
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, _)| x))
        .fold(2.0f64, f64::max)
        .ceil();
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("latency by percentile: {title}"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, (y_min * 0.8..y_max * 1.25).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            if *x < 0.5 {
                "0%".to_owned()
            } else {
                format!("{}%", trim_float(p))
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (op, pts) in &series {
        let color = match op {
            Op::Read => BLUE,
            Op::Write => RED,
        };
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(op.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;

    // Throughput and p99 over time.
    let t_max = timeline.iter().map(|i| i.t_s).fold(1.0f64, f64::max);
    let ops_max = timeline.iter().map(|i| i.ops_per_s).fold(1.0f64, f64::max);
    let p99_max = timeline.iter().map(|i| i.p99_us).fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "throughput (blue, left) and p99 (red, right) over time",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..ops_max * 1.1)
        .map_err(|e| err(&e))?
        .set_secondary_coord(0f64..t_max, 0f64..p99_max * 1.1);
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ops/s")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 (us)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            timeline.iter().map(|i| (i.t_s, i.ops_per_s)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    chart
        .draw_secondary_series(LineSeries::new(
            timeline.iter().map(|i| (i.t_s, i.p99_us)),
            RED.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn trim_float(p: f64) -> String {
    let s = format!("{p:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectrum_is_monotonic_and_plot_is_written() {
        let mut totals = Stats::default();
        for i in 1..=10_000u64 {
            totals.op(Op::Read).record_ok(i * 100, 1);
            totals.op(Op::Write).record_ok(i * 300, 1);
        }
        let pts = spectrum(&totals.get(Op::Read).hist);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
        let timeline = vec![
            Interval::from_stats(&totals.combined(), 1.0, 1.0),
            Interval::from_stats(&totals.combined(), 2.0, 1.0),
        ];
        let dir = std::env::temp_dir().join(format!("loadgen-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        draw(&path, "test", &totals, &timeline).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("percentile") && svg.contains("read"));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(trim_float(99.9), "99.9");
    }
}
