//! The log filter every Trellis binary reads from `RUST_LOG`.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;

/// `RUST_LOG` as a list of `target=level` and an optional bare default level
/// (`info,trellis_proxy=debug`), else `default`. A value that does not parse is
/// reported on stderr and `default` used: a typo must not silence the logs. Span and
/// field directives are not supported: they would link a regex DFA builder (~125 KB
/// of code, resident in every sidecar).
pub fn log_filter(default: LevelFilter) -> Targets {
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => parse(&spec, default),
        _ => Targets::new().with_default(default),
    }
}

fn parse(spec: &str, default: LevelFilter) -> Targets {
    spec.parse().unwrap_or_else(|e| {
        eprintln!("RUST_LOG={spec:?} is not a list of target=level ({e}); using {default}");
        Targets::new().with_default(default)
    })
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn targets_and_a_default_level_are_read() {
        let filter = parse("warn,trellis_proxy=debug", LevelFilter::INFO);
        assert!(filter.would_enable("trellis_proxy::inbound", &Level::DEBUG));
        assert!(!filter.would_enable("h2::codec", &Level::INFO));
        assert!(filter.would_enable("h2::codec", &Level::WARN));
    }

    #[test]
    fn a_filter_that_does_not_parse_falls_back_to_the_default() {
        let filter = parse("[span{field=1}]", LevelFilter::INFO);
        assert!(filter.would_enable("anything", &Level::INFO));
        assert!(!filter.would_enable("anything", &Level::DEBUG));
    }
}
