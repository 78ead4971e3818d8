//! Access logs: one JSON line per request (and per TCP connection), off by default.
//!
//! The data path never waits for the log: a line goes into a bounded channel to a
//! writer thread, and when the channel is full it is dropped and counted
//! (`trellis_access_log_dropped_total`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;

use crate::request_metrics::Peers;

/// Lines waiting for the writer before new ones are dropped.
pub const QUEUE: usize = 4096;

/// Where access logs go.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("access log target is empty (use stdout, off or a file path)")]
pub struct AccessLogTargetError;

impl AccessLogTarget {
    /// `stdout`, a file path, or `off`/empty for none.
    pub fn parse_option(s: &str) -> Result<Option<Self>, AccessLogTargetError> {
        match s.trim() {
            "" | "off" | "false" => Ok(None),
            other => other.parse().map(Some),
        }
    }
}

impl FromStr for AccessLogTarget {
    type Err = AccessLogTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Err(AccessLogTargetError),
            "stdout" | "-" => Ok(AccessLogTarget::Stdout),
            path => Ok(AccessLogTarget::File(PathBuf::from(path))),
        }
    }
}

/// The sending end, cheap to clone; off unless started.
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    lines: Option<SyncSender<String>>,
    dropped: Counter,
}

impl AccessLog {
    pub fn off() -> Self {
        AccessLog::default()
    }

    /// Opens `target` and starts the writer thread.
    pub fn start(target: &AccessLogTarget) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".to_owned())
            .spawn(move || write_lines(&rx, out))?;
        Ok(AccessLog {
            lines: Some(tx),
            dropped: Counter::default(),
        })
    }

    pub fn is_on(&self) -> bool {
        self.lines.is_some()
    }

    pub fn dropped(&self) -> &Counter {
        &self.dropped
    }

    pub fn send(&self, record: &AccessRecord) {
        let Some(lines) = &self.lines else {
            return;
        };
        match lines.try_send(record.to_json()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Writes lines as they come, flushing whenever the queue is empty.
fn write_lines(rx: &Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = rx.recv() {
        let mut next = Some(line);
        while let Some(line) = next {
            if writeln!(out, "{line}").is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}

/// One request or TCP connection, as logged. Built only when the log is on.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub start_time: SystemTime,
    pub peers: Arc<Peers>,
    /// `http`, `grpc` or `tcp`.
    pub protocol: &'static str,
    pub method: String,
    pub authority: String,
    /// The normalized path (no query): what policy judged.
    pub path: String,
    /// The endpoint the request went to (outbound) or the app's address (inbound).
    pub upstream: Option<SocketAddr>,
    pub response_code: u16,
    pub grpc_status: Option<u8>,
    pub response_flags: &'static str,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration_ms: f64,
}

impl AccessRecord {
    pub fn new(peers: Arc<Peers>, protocol: &'static str) -> Self {
        AccessRecord {
            start_time: SystemTime::now(),
            peers,
            protocol,
            method: String::new(),
            authority: String::new(),
            path: String::new(),
            upstream: None,
            response_code: 0,
            grpc_status: None,
            response_flags: crate::request_metrics::NO_FLAGS,
            request_bytes: 0,
            response_bytes: 0,
            duration_ms: 0.0,
        }
    }

    pub fn to_json(&self) -> String {
        let p = &self.peers;
        serde_json::json!({
            "start_time": humantime::format_rfc3339_millis(self.start_time).to_string(),
            "reporter": p.reporter.as_str(),
            "protocol": self.protocol,
            "source_principal": p.source.principal,
            "source_workload": p.source.name,
            "source_namespace": p.source.namespace,
            "destination_principal": p.destination.principal,
            "destination_workload": p.destination.name,
            "destination_namespace": p.destination.namespace,
            "destination_service": p.destination_service,
            "destination_port": p.destination_port,
            "route_name": p.route_name,
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "upstream": self.upstream.map(|a| a.to_string()),
            "response_code": self.response_code,
            "grpc_status": self.grpc_status,
            "response_flags": self.response_flags,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "duration_ms": (self.duration_ms * 1000.0).round() / 1000.0,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_metrics::{Reporter, Workload};

    #[test]
    fn targets_parse() {
        assert_eq!(AccessLogTarget::parse_option("").unwrap(), None);
        assert_eq!(AccessLogTarget::parse_option("off").unwrap(), None);
        assert_eq!(
            AccessLogTarget::parse_option("stdout").unwrap(),
            Some(AccessLogTarget::Stdout)
        );
        assert_eq!(
            "/var/log/a.json".parse::<AccessLogTarget>().unwrap(),
            AccessLogTarget::File("/var/log/a.json".into())
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = sync_channel(1);
        let log = AccessLog {
            lines: Some(tx),
            dropped: Counter::default(),
        };
        let peers = Arc::new(Peers {
            reporter: Reporter::Source,
            source: Arc::new(Workload::unknown()),
            destination: Arc::new(Workload::unknown()),
            destination_service: "echo.default".to_owned(),
            destination_port: 80,
            route_name: "-".to_owned(),
        });
        let record = AccessRecord::new(peers, "http");
        log.send(&record);
        log.send(&record);
        log.send(&record);
        assert_eq!(log.dropped().get(), 2);
        let line: serde_json::Value = serde_json::from_str(&record.to_json()).unwrap();
        assert_eq!(line["destination_service"], "echo.default");
        assert_eq!(line["reporter"], "source");
    }
}
