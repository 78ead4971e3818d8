//! `trellisctl top <admin-addr>...`: the busiest paths (source workload →
//! destination service) with rps, success rate and latency percentiles, from two
//! scrapes of the proxies' `/metrics` an interval apart. Refreshes every interval on
//! a terminal; prints once with `--once` (or when stdout is not a terminal).
//!
//! A path is counted from its callers' sidecars (`reporter="source"`), which see
//! what the caller got, proxy-made failures included; a path without a reporting
//! caller (a caller without a sidecar) is counted from the destination's sidecar.
//!
//! `trellisctl stat` is the same per destination service, all callers together,
//! counted where the service's own sidecars report it (`reporter="destination"`)
//! and from callers' sidecars only for a service whose sidecars are not scraped.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::admin_client::get;
use crate::output::{self, OutputFormat, Table};

/// Rows per path (`top`) or per destination service (`stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    Path,
    Destination,
}

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Proxy admin (or 15020 metrics) addresses, e.g. 127.0.0.1:15000.
    #[arg(required = true)]
    admin_addrs: Vec<String>,
    /// Print one table (two scrapes one interval apart) and exit.
    #[arg(long)]
    once: bool,
    /// Time between scrapes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[arg(short, long, value_enum, default_value_t)]
    output: OutputFormat,
}

pub async fn run(args: TopArgs, grouping: Grouping) -> anyhow::Result<()> {
    let live = !args.once && std::io::stdout().is_terminal();
    let mut before = scrape_all(&args.admin_addrs, grouping).await?;
    let mut taken = Instant::now();
    loop {
        tokio::time::sleep(args.interval).await;
        let after = scrape_all(&args.admin_addrs, grouping).await?;
        let now = Instant::now();
        let rows = paths(&before, &after, now.duration_since(taken));
        if live {
            // Clear the screen and home the cursor, as `top` does.
            print!("\x1b[2J\x1b[H");
        }
        output::print(args.output, &rows, || table(&rows, grouping))?;
        if !live {
            return Ok(());
        }
        before = after;
        taken = now;
    }
}

/// One sample of the proxies' request series, summed per path.
#[derive(Debug, Clone)]
pub struct Scrape {
    grouping: Grouping,
    paths: BTreeMap<PathKey, PathSample>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PathKey {
    source: String,
    source_namespace: String,
    destination: String,
}

#[derive(Debug, Default, Clone)]
struct PathSample {
    /// Per reporter (`source`, `destination`).
    by_reporter: BTreeMap<String, Counts>,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    requests: f64,
    failures: f64,
    /// Cumulative bucket counts by upper bound (ms).
    buckets: BTreeMap<OrderedBound, f64>,
}

/// An `le` bound that sorts (`+Inf` last).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

async fn scrape_all(addrs: &[String], grouping: Grouping) -> anyhow::Result<Scrape> {
    let mut scrape = Scrape::new(grouping);
    for addr in addrs {
        let body = get(addr, "/metrics").await?;
        scrape.add(&String::from_utf8_lossy(&body));
    }
    Ok(scrape)
}

impl Scrape {
    pub fn new(grouping: Grouping) -> Self {
        Scrape {
            grouping,
            paths: BTreeMap::new(),
        }
    }

    #[cfg(test)]
    pub fn parse(text: &str, grouping: Grouping) -> Self {
        let mut scrape = Scrape::new(grouping);
        scrape.add(text);
        scrape
    }

    fn add(&mut self, text: &str) {
        for line in text.lines() {
            let Some((name, labels, value)) = parse_line(line) else {
                continue;
            };
            let is_total = name == "trellis_requests_total";
            let is_bucket = name == "trellis_request_duration_milliseconds_bucket";
            if !is_total && !is_bucket {
                continue;
            }
            let label = |key: &str| {
                labels
                    .iter()
                    .find(|(k, _)| k == key)
                    .map_or("", |(_, v)| v.as_str())
            };
            let key = match self.grouping {
                Grouping::Path => PathKey {
                    source: label("source_workload").to_owned(),
                    source_namespace: label("source_workload_namespace").to_owned(),
                    destination: label("destination_service").to_owned(),
                },
                Grouping::Destination => PathKey {
                    source: String::new(),
                    source_namespace: String::new(),
                    destination: label("destination_service").to_owned(),
                },
            };
            let counts = self
                .paths
                .entry(key)
                .or_default()
                .by_reporter
                .entry(label("reporter").to_owned())
                .or_default();
            if is_total {
                counts.requests += value;
                let failed = label("response_code").starts_with('5')
                    || !matches!(label("grpc_response_status"), "" | "0");
                if failed {
                    counts.failures += value;
                }
            } else {
                let le = match label("le") {
                    "+Inf" => f64::INFINITY,
                    le => match le.parse() {
                        Ok(le) => le,
                        Err(_) => continue,
                    },
                };
                *counts.buckets.entry(OrderedBound(le)).or_default() += value;
            }
        }
    }
}

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

/// `name{k="v",...} value` (or `name value`); `None` for comments and other lines.
fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end;
        loop {
            // key
            let start = chars.peek()?.0;
            let mut key_end = start;
            while let Some(&(i, c)) = chars.peek() {
                if c == '=' || c == '}' {
                    key_end = i;
                    break;
                }
                chars.next();
            }
            let (i, c) = chars.next()?;
            if c == '}' {
                end = Some(i);
                break;
            }
            let key = inner[start..key_end].trim_start_matches(',').to_owned();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.push((key, value));
            match chars.next()? {
                (_, ',') => {
                    if chars.peek().is_some_and(|&(_, c)| c == '}') {
                        end = chars.next().map(|(i, _)| i);
                        break;
                    }
                }
                (i, '}') => {
                    end = Some(i);
                    break;
                }
                _ => return None,
            }
        }
        rest = &inner[end? + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// One row of `top`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PathRow {
    pub source: String,
    pub source_namespace: String,
    pub destination: String,
    /// Whose series were counted: `source` or `destination`.
    pub reporter: String,
    /// Requests in the window.
    pub requests: f64,
    pub rps: f64,
    /// Share of the window's requests that were neither 5xx nor a gRPC error;
    /// `None` without requests.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests since the proxies started.
    pub total: f64,
}

/// The rows from two scrapes `elapsed` apart, busiest first.
pub fn paths(before: &Scrape, after: &Scrape, elapsed: Duration) -> Vec<PathRow> {
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let mut rows = Vec::new();
    for (key, sample) in &after.paths {
        let preferred = match after.grouping {
            Grouping::Path => ["source", "destination"],
            Grouping::Destination => ["destination", "source"],
        };
        let reporter = if sample.by_reporter.contains_key(preferred[0]) {
            preferred[0]
        } else {
            preferred[1]
        };
        let Some(now) = sample.by_reporter.get(reporter) else {
            continue;
        };
        let empty = Counts::default();
        let then = before
            .paths
            .get(key)
            .and_then(|s| s.by_reporter.get(reporter))
            .unwrap_or(&empty);
        // A proxy that restarted between the scrapes counts from zero again.
        let delta = |now: f64, then: f64| if now >= then { now - then } else { now };
        let requests = delta(now.requests, then.requests);
        let failures = delta(now.failures, then.failures);
        let buckets: Vec<(f64, f64)> = now
            .buckets
            .iter()
            .map(|(le, count)| {
                let before = then.buckets.get(le).copied().unwrap_or(0.0);
                (le.0, delta(*count, before))
            })
            .collect();
        rows.push(PathRow {
            source: key.source.clone(),
            source_namespace: key.source_namespace.clone(),
            destination: key.destination.clone(),
            reporter: reporter.to_owned(),
            requests,
            rps: requests / seconds,
            success_rate: (requests > 0.0).then(|| (requests - failures) / requests),
            p50_ms: quantile(0.5, &buckets),
            p99_ms: quantile(0.99, &buckets),
            total: now.requests,
        });
    }
    rows.sort_by(|a, b| {
        b.rps
            .total_cmp(&a.rps)
            .then_with(|| a.destination.cmp(&b.destination))
    });
    rows
}

/// Prometheus's `histogram_quantile`: linear within the bucket that holds the rank;
/// the highest finite bound when it falls in `+Inf`.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = le - lower.0;
            let in_bucket = count - lower.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(lower.0 + width * (rank - lower.1) / in_bucket);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

fn table(rows: &[PathRow], grouping: Grouping) -> Table {
    let headers: &[&'static str] = match grouping {
        Grouping::Path => &[
            "SOURCE",
            "DESTINATION",
            "RPS",
            "SUCCESS",
            "P50",
            "P99",
            "TOTAL",
        ],
        Grouping::Destination => &["DESTINATION", "RPS", "SUCCESS", "P50", "P99", "TOTAL"],
    };
    let mut table = Table::new(headers);
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}ms"));
    for row in rows {
        let mut cells = Vec::new();
        if grouping == Grouping::Path {
            cells.push(format!("{}.{}", row.source, row.source_namespace));
        }
        cells.extend([
            row.destination.clone(),
            format!("{:.1}", row.rps),
            row.success_rate
                .map_or_else(|| "-".to_owned(), |s| format!("{:.2}%", s * 100.0)),
            ms(row.p50_ms),
            ms(row.p99_ms),
            format!("{}", row.total),
        ]);
        table.row(cells);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERIES: &str = r#"reporter="source",source_workload="web",source_workload_namespace="shop",destination_service="api.shop",route_name="-",destination_port="80",request_protocol="http",response_flags="-""#;

    fn scrape(ok: u64, failed: u64, buckets: [u64; 3]) -> Scrape {
        scrape_as(ok, failed, buckets, Grouping::Path)
    }

    fn scrape_as(ok: u64, failed: u64, buckets: [u64; 3], grouping: Grouping) -> Scrape {
        let mut text = String::from("# HELP trellis_requests Requests\n");
        text.push_str(&format!(
            "trellis_requests_total{{{SERIES},response_code=\"200\",grpc_response_status=\"\"}} {ok}\n"
        ));
        text.push_str(&format!(
            "trellis_requests_total{{{SERIES},response_code=\"503\",grpc_response_status=\"\"}} {failed}\n"
        ));
        for (le, count) in ["10.0", "100.0", "+Inf"].iter().zip(buckets) {
            text.push_str(&format!(
                "trellis_request_duration_milliseconds_bucket{{le=\"{le}\",{SERIES},response_code=\"200\",grpc_response_status=\"\"}} {count}\n"
            ));
        }
        // The destination's view of the same path is not counted twice.
        text.push_str(
            "trellis_requests_total{reporter=\"destination\",source_workload=\"web\",source_workload_namespace=\"shop\",destination_service=\"api.shop\",response_code=\"200\"} 1000\n",
        );
        Scrape::parse(&text, grouping)
    }

    #[test]
    fn rates_success_and_percentiles_come_from_the_difference() {
        let before = scrape(10, 0, [10, 10, 10]);
        let after = scrape(28, 2, [18, 28, 30]);
        let rows = paths(&before, &after, Duration::from_secs(2));
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.source, "web");
        assert_eq!(row.destination, "api.shop");
        assert_eq!(row.reporter, "source");
        assert_eq!(row.requests, 20.0);
        assert_eq!(row.rps, 10.0);
        assert_eq!(row.success_rate, Some(0.9));
        assert_eq!(row.total, 30.0);
        // 8 of 20 under 10 ms, 18 under 100 ms: the median is in the second bucket.
        assert_eq!(row.p50_ms, Some(10.0 + 90.0 * (10.0 - 8.0) / 10.0));
        // The 99th percentile lands in +Inf: the highest finite bound.
        assert_eq!(row.p99_ms, Some(100.0));
    }

    #[test]
    fn stat_counts_a_service_where_its_own_sidecars_report() {
        let before = scrape_as(10, 0, [10, 10, 10], Grouping::Destination);
        let after = scrape_as(28, 2, [18, 28, 30], Grouping::Destination);
        let rows = paths(&before, &after, Duration::from_secs(2));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].reporter, "destination");
        assert_eq!(rows[0].destination, "api.shop");
        assert_eq!(rows[0].source, "");
        assert_eq!(rows[0].total, 1000.0);
        let text = table(&rows, Grouping::Destination).render();
        assert!(text.starts_with("DESTINATION"), "{text}");
    }

    #[test]
    fn lines_parse_with_escapes_and_without_labels() {
        let (name, labels, value) = parse_line(r#"x_total{a="1",b="q\"uote",} 3"#).unwrap();
        assert_eq!(name, "x_total");
        assert_eq!(labels[1], ("b".to_owned(), "q\"uote".to_owned()));
        assert_eq!(value, 3.0);
        assert_eq!(parse_line("up 1").unwrap().2, 1.0);
        assert!(parse_line("# TYPE up gauge").is_none());
        assert!(parse_line("# EOF").is_none());
    }
}
