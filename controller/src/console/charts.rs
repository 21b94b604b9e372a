//! Bar charts as SVG, drawn in Rust with plotters (no JavaScript). Every bar carries its value
//! as text, so the chart reads on its own and tests can find the numbers.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// One bar chart: `bars` are (label, value); `unit` follows each value label (e.g. `%`).
pub fn bar_chart(id: &str, title: &str, bars: &[(String, f64)], unit: &str) -> String {
    let mut svg = String::new();
    if let Err(e) = draw(&mut svg, title, bars, unit) {
        tracing::warn!(chart = id, error = %e, "chart could not be drawn");
        return format!("<p class=\"message\">Chart {title} could not be drawn.</p>");
    }
    // Give the SVG an id and an accessible name.
    svg.replacen("<svg ", &format!("<svg id=\"{id}\" role=\"img\" aria-label=\"{title}\" "), 1)
}

fn draw(
    svg: &mut String,
    title: &str,
    bars: &[(String, f64)],
    unit: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let width = (bars.len() as u32 * 48).clamp(360, 960);
    let root = SVGBackend::with_string(svg, (width, 300)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1.0);
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..max * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|(l, _)| l.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    let color = RGBColor(0x2f, 0x5f, 0xb3);
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *v)],
            color.filled(),
        );
        bar.set_margin(0, 0, 4, 4);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            format!("{}{unit}", value_label(*v)),
            (SegmentValue::CenterOf(i), *v + max * 0.03),
            ("sans-serif", 12).into_font().color(&BLACK),
        )
    }))?;
    root.present()?;
    Ok(())
}

/// Whole numbers without decimals, others with one.
pub fn value_label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 { format!("{}", v.round() as i64) } else { format!("{v:.1}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trimmed contents of every `<text>` element.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = t.split_once('>')?.1.split_once("</text>")?.0;
                Some(body.trim().to_owned())
            })
            .collect()
    }

    #[test]
    fn bars_carry_their_values() {
        let svg = bar_chart("c", "Visits", &[("09".into(), 12.0), ("10".into(), 7.5)], "");
        assert!(svg.starts_with("<svg id=\"c\""), "{}", &svg[..80.min(svg.len())]);
        let texts = texts(&svg);
        for want in ["Visits", "12", "7.5", "09", "10"] {
            assert!(texts.iter().any(|t| t == want), "{want} in {texts:?}");
        }
        let empty = bar_chart("e", "Nothing", &[], "%");
        assert!(empty.contains("<svg"), "an empty chart still draws");
    }
}
