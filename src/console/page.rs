//! The console's HTML page: `page.html` (styles and script inline, nothing fetched from
//! elsewhere) with the figures of `/status.json` written into it, so it reads without
//! JavaScript; with JavaScript it polls `/status.json` and redraws.
//!
//! The template's placeholders: `{{a.b}}` is the value at that path, `{{rows:a.b:c,d}}` the
//! rows of the list at `a.b` with columns `c` and `d`, `{{chart}}` the chart's SVG and
//! `{{json}}` the whole status for the script's first drawing. Values are printed as the
//! script prints them (`fmt` in `page.html`), so the page says the same with and without it.

use std::fmt::Write;

use serde_json::Value;

const TEMPLATE: &str = include_str!("page.html");

/// The page with the figures of `status` in it.
pub fn render(status: &Value) -> String {
    let mut out = String::with_capacity(TEMPLATE.len() + 16 * 1024);
    let mut rest = TEMPLATE;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            rest = &rest[start..];
            break;
        };
        let key = &after[..end];
        match key {
            "chart" => out.push_str(&chart(status)),
            "json" => out.push_str(&script_json(status)),
            _ => match key.strip_prefix("rows:") {
                Some(spec) => rows(&mut out, status, spec),
                None => out.push_str(&escape(&fmt(get(status, key)))),
            },
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The value at a dotted path.
fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// A value as the page shows it; the same as the script's `fmt`.
pub fn fmt(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "\u{2013}".into(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            // JavaScript prints a whole number without a fraction.
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => (f as i64).to_string(),
            (_, _, Some(f)) => f.to_string(),
            _ => n.to_string(),
        },
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `spec` is `path:col,col`.
fn rows(out: &mut String, status: &Value, spec: &str) {
    let (path, cols) = spec.split_once(':').unwrap_or((spec, ""));
    let cols: Vec<&str> = cols.split(',').collect();
    let list = get(status, path).and_then(Value::as_array);
    match list {
        Some(list) if !list.is_empty() => {
            for row in list {
                out.push_str("<tr>");
                for c in &cols {
                    let _ = write!(out, "<td>{}</td>", escape(&fmt(row.get(c))));
                }
                out.push_str("</tr>");
            }
        }
        _ => {
            let _ = write!(out, "<tr><td colspan=\"{}\">none</td></tr>", cols.len());
        }
    }
}

/// The status as the page's first data: JSON with `<` escaped, so no string in it can close
/// the script element.
fn script_json(status: &Value) -> String {
    status.to_string().replace('<', "\\u003c")
}

/// The budget chart as SVG elements in a 900 × 170 box: the same drawing the script makes.
fn chart(status: &Value) -> String {
    const W: f64 = 900.0;
    const H: f64 = 150.0;
    const TOP: f64 = 10.0;
    let column = |name: &str| -> Vec<f64> {
        get(status, &format!("history.{name}"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (sent, slots) = (column("sent"), column("slots_taken"));
    let limit = get(status, "budget.limit")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let max = sent
        .iter()
        .chain(&slots)
        .copied()
        .fold(limit.max(1.0) * 1.25, f64::max);
    let y = |v: f64| TOP + H - (v / max) * H;
    let x0 = W - sent.len() as f64;
    let mut bars = String::new();
    let mut line = String::new();
    for (i, (s, t)) in sent.iter().zip(&slots).enumerate() {
        let x = x0 + i as f64 + 0.5;
        if *s > 0.0 {
            let _ = write!(bars, "M{x} {}V{:.1}", TOP + H, y(*s));
        }
        let _ = write!(line, "{}{x},{:.1}", if i > 0 { " " } else { "" }, y(*t));
    }
    let mut svg = format!(
        "<rect x=\"0\" y=\"{TOP}\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#d9dee5\"/>"
    );
    if !bars.is_empty() {
        let _ = write!(
            svg,
            "<path d=\"{bars}\" stroke=\"#2f6fd6\" stroke-width=\"1\"/>"
        );
    }
    if !line.is_empty() {
        let _ = write!(
            svg,
            "<polyline points=\"{line}\" fill=\"none\" stroke=\"#1d2430\" stroke-width=\"1\"/>"
        );
    }
    let ly = y(limit);
    let window = escape(&fmt(get(status, "budget.window_s")));
    let _ = write!(
        svg,
        "<line x1=\"0\" x2=\"{W}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"#c2410c\" stroke-dasharray=\"6 4\"/>\
         <text x=\"4\" y=\"{:.1}\" fill=\"#c2410c\" font-size=\"11\">limit {} per {window} s</text>",
        ly + 13.0,
        fmt(get(status, "budget.limit")),
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_print_as_the_script_prints_them() {
        assert_eq!(fmt(Some(&json!(3.0))), "3");
        assert_eq!(fmt(Some(&json!(7))), "7");
        assert_eq!(fmt(Some(&json!(0.325))), "0.325");
        assert_eq!(fmt(Some(&json!(null))), "\u{2013}");
        assert_eq!(fmt(None), "\u{2013}");
        assert_eq!(fmt(Some(&json!(true))), "yes");
        assert_eq!(fmt(Some(&json!("a<b"))), "a<b");
    }

    #[test]
    fn the_page_holds_the_figures_rows_and_chart_and_no_placeholder() {
        let status = json!({
            "upstream": "http://127.0.0.1:1",
            "budget": {"at": 100, "limit": 7, "window_s": 1.0, "slots_taken": 5, "sent_last_s": 4},
            "work": {"routes": [{"route": "leads", "status": "200", "total": 2.0, "per_s": 0.5}]},
            "history": {"sent": [1, 4], "slots_taken": [2, 5]},
            "keys": [{"name": "<script>", "scope": "read"}],
        });
        let page = render(&status);
        assert!(!page.contains("{{"), "every placeholder filled");
        assert!(page.contains(r#"<span data-k="budget.slots_taken">5</span>"#));
        assert!(page.contains(r#"<span data-k="budget.limit">7</span>"#));
        assert!(page.contains("<tr><td>leads</td><td>200</td><td>2</td><td>0.5</td></tr>"));
        assert!(page.contains("<td>&lt;script&gt;</td>"), "escaped");
        assert!(page.contains("<polyline points=\"898.5,"), "chart drawn");
        assert!(page.contains("limit 7 per 1 s"));
        assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
    }
}
