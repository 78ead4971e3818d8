//! `trellisctl proxy-config <admin-addr> [section]`: what one proxy holds, from its
//! admin port's `/config_dump` and `/certs` (127.0.0.1:15000 in a Pod; reach it with
//! `kubectl port-forward`).

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::admin_client::get_json;
use crate::output::{self, OutputFormat, Table, short_duration};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Listeners,
    Routes,
    Endpoints,
    Policies,
    Certs,
}

#[derive(clap::Args, Debug)]
pub struct ProxyConfigArgs {
    /// The proxy's admin address, e.g. 127.0.0.1:15000.
    admin_addr: String,
    /// What to show (default: listeners).
    #[arg(value_enum, default_value = "listeners")]
    section: Section,
    #[arg(short, long, value_enum, default_value_t)]
    output: OutputFormat,
}

pub async fn run(args: ProxyConfigArgs) -> anyhow::Result<()> {
    let (value, table) = if args.section == Section::Certs {
        let certs: Value = get_json(&args.admin_addr, "/certs").await?;
        let mut certs = certs;
        // The chain is public, but long: the table and the default view leave it out.
        if let Some(object) = certs.as_object_mut() {
            object.remove("chain_pem");
        }
        let table = certs_table(&certs, SystemTime::now());
        (certs, table)
    } else {
        let dump: Value = get_json(&args.admin_addr, "/config_dump").await?;
        section_of(&dump, args.section)
    };
    output::print(args.output, &value, || table)
}

/// The part of `/config_dump` a section shows, and its table.
pub fn section_of(dump: &Value, section: Section) -> (Value, Table) {
    let list = |key: &str| dump.get(key).cloned().unwrap_or_else(|| json!([]));
    let text = |v: &Value, key: &str| match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    };
    let join = |v: &Value, key: &str| {
        let items: Vec<String> = v
            .get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    match section {
        Section::Listeners => {
            let value = list("listeners");
            let mut table = Table::new(&["NAME", "ADDRESS", "DESTINATION"]);
            for l in value.as_array().into_iter().flatten() {
                table.row(vec![
                    text(l, "name"),
                    text(l, "address"),
                    text(l, "destination"),
                ]);
            }
            (value, table)
        }
        Section::Routes => {
            let value = list("routes");
            let mut table = Table::new(&["SERVICE", "ROUTE", "PORT", "MATCH", "BACKENDS"]);
            for r in value.as_array().into_iter().flatten() {
                let port = match r.get("port").and_then(Value::as_u64) {
                    Some(0) | None => "*".to_owned(),
                    Some(p) => p.to_string(),
                };
                table.row(vec![
                    text(r, "table"),
                    text(r, "name"),
                    port,
                    join(r, "matches"),
                    join(r, "backends"),
                ]);
            }
            (value, table)
        }
        Section::Endpoints => {
            let value = list("endpoints");
            let mut table =
                Table::new(&["SERVICE", "ENDPOINT", "IDENTITY", "READY", "MESH ADDRESS"]);
            for group in value.as_array().into_iter().flatten() {
                for e in group
                    .get("endpoints")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    table.row(vec![
                        text(group, "name"),
                        text(e, "address"),
                        text(e, "identity"),
                        text(e, "ready"),
                        text(e, "mesh_address"),
                    ]);
                }
            }
            (value, table)
        }
        Section::Policies => {
            let value = list("policies");
            let mut table = Table::new(&["KIND", "NAME", "DETAIL"]);
            for p in value.as_array().into_iter().flatten() {
                let detail = match p.get("kind").and_then(Value::as_str) {
                    Some("TrafficPolicy") => format!(
                        "service {} lb {} retries {} timeout {}",
                        text(p, "service"),
                        text(p, "load_balancer"),
                        text(p, "retry_attempts"),
                        match p.get("request_timeout_ms").and_then(Value::as_u64) {
                            Some(0) | None => "-".to_owned(),
                            Some(ms) => format!("{ms}ms"),
                        }
                    ),
                    Some("AuthorizationPolicy") => {
                        format!("{} with {} rules", text(p, "action"), text(p, "rules"))
                    }
                    Some("PeerAuthentication") => format!(
                        "{} ({} port overrides)",
                        text(p, "mode"),
                        text(p, "port_modes")
                    ),
                    _ => "-".to_owned(),
                };
                table.row(vec![text(p, "kind"), text(p, "name"), detail]);
            }
            (value, table)
        }
        Section::Certs => (Value::Null, Table::default()),
    }
}

/// The proxy's workload certificate, with times in UTC and from `now`.
pub fn certs_table(certs: &Value, now: SystemTime) -> Table {
    let mut table = Table::new(&["IDENTITY", "SERIAL", "NOT AFTER", "EXPIRES IN", "RENEWS AT"]);
    let at = |key: &str| {
        certs
            .get(key)
            .and_then(Value::as_u64)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    };
    let Some(not_after) = at("not_after_unix") else {
        table.row(vec![
            certs
                .get("identity")
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned(),
            "no certificate yet".to_owned(),
        ]);
        return table;
    };
    let expires_in = match not_after.duration_since(now) {
        Ok(left) => short_duration(left.as_secs()),
        Err(_) => "expired".to_owned(),
    };
    table.row(vec![
        certs
            .get("identity")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned(),
        certs
            .get("serial")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned(),
        humantime::format_rfc3339_seconds(not_after).to_string(),
        expires_in,
        at("renew_at_unix").map_or("-".to_owned(), |t| {
            humantime::format_rfc3339_seconds(t).to_string()
        }),
    ]);
    table
}
