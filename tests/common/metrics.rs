//! Reading Prometheus scrapes in tests: parsed with `prometheus-parse`, values by name and
//! labels, and the metrics `docs/operations.md` documents.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;

use prometheus_parse::{Scrape, Value};

/// Prometheus' text format, parsed.
pub fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of `name` whose labels include `labels`; histograms give their count.
pub fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => {
                b.iter().find(|b| b.less_than.is_infinite()).map_or(0.0, |b| b.count)
            }
            Value::Summary(_) => f64::NAN,
        })
}

/// The metrics `docs/operations.md` lists: (name, the scope column of its table).
pub fn documented() -> Vec<(String, String)> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md");
    let doc = std::fs::read_to_string(doc).unwrap();
    let rows: Vec<(String, String)> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`xdevice_")?.strip_suffix('`')?;
            Some((format!("xdevice_{name}"), cells.get(4)?.to_string()))
        })
        .collect();
    assert!(rows.len() > 20, "docs/operations.md lists too few metrics: {rows:?}");
    rows
}
