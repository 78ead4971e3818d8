//! `--output table|json|yaml` for the read verbs, and the plain aligned tables.

use std::io::IsTerminal as _;

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML, or calls `table` for the table form.
pub fn print<T: Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce() -> Table,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        OutputFormat::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        OutputFormat::Table => print!("{}", table().render()),
    }
    Ok(())
}

/// Columns padded to their widest cell, two spaces apart, as kubectl prints them.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (i, cell) in cells.enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                out.push_str(cell);
                let pad = widths
                    .get(i)
                    .map_or(0, |w| w.saturating_sub(cell.chars().count()));
                out.extend(std::iter::repeat_n(' ', pad));
            }
            format!("{}\n", out.trim_end())
        };
        let mut out = line(&mut self.headers.iter().copied());
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }
}

/// Green ✔ and red ✖ on a terminal; plain marks in a pipe or a file.
pub struct Marks {
    colour: bool,
}

impl Marks {
    pub fn for_stdout() -> Self {
        Marks {
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    pub fn ok(&self) -> &'static str {
        if self.colour {
            "\x1b[32m✔\x1b[0m"
        } else {
            "✔"
        }
    }

    pub fn failed(&self) -> &'static str {
        if self.colour {
            "\x1b[31m✖\x1b[0m"
        } else {
            "✖"
        }
    }
}

/// `-` for nothing.
pub fn or_dash(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or("-").to_owned()
}

/// A duration as `2d3h`, `23h59m`, `5m10s` or `42s`.
pub fn short_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&["NAME", "X"]);
        t.row(vec!["a".into(), "1".into()]);
        t.row(vec!["longer".into(), String::new()]);
        assert_eq!(t.render(), "NAME    X\na       1\nlonger\n");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(42), "42s");
        assert_eq!(short_duration(310), "5m10s");
        assert_eq!(short_duration(86399), "23h59m");
        assert_eq!(short_duration(7200), "2h");
        assert_eq!(short_duration(2 * 86400 + 3 * 3600), "2d3h");
    }
}
