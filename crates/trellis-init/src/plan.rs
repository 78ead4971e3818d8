//! The rules as data: what `apply` writes and `--dry-run` prints.

use std::fmt;

use crate::InitConfig;

/// The only table Trellis writes to.
pub const NAT: &str = "nat";
/// Inbound: decides which inbound connections go to the proxy.
pub const CHAIN_INBOUND: &str = "TRELLIS_INBOUND";
/// Inbound: redirects to the proxy's inbound port.
pub const CHAIN_IN_REDIRECT: &str = "TRELLIS_IN_REDIRECT";
/// Outbound: decides which outgoing connections go to the proxy.
pub const CHAIN_OUTPUT: &str = "TRELLIS_OUTPUT";
/// Outbound: redirects to the proxy's outbound port.
pub const CHAIN_REDIRECT: &str = "TRELLIS_REDIRECT";
/// Every chain Trellis owns, in creation order.
pub const OWN_CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];

/// The address family a rule set is for: `iptables` writes IPv4, `ip6tables` IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    /// IPv4, written with `iptables`.
    V4,
    /// IPv6, written with `ip6tables`.
    V6,
}

impl IpFamily {
    /// The loopback address as a `-d` network: connections to it are never redirected.
    fn loopback(self) -> &'static str {
        match self {
            IpFamily::V4 => "127.0.0.1/32",
            IpFamily::V6 => "::1/128",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// How a rule is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// A rule inside one of Trellis's own chains: the chain is flushed and the rule appended.
    Own,
    /// A jump from a built-in chain (PREROUTING, OUTPUT) into Trellis's chains: inserted
    /// at the top only if an identical rule is not already there (`-C`).
    Hook,
}

/// One iptables rule: table, chain and the rule specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The table, always `nat` today.
    pub table: &'static str,
    /// The chain the rule lives in.
    pub chain: String,
    /// The rule specification (`-p tcp --dport 15008 -j RETURN`), one argument per item.
    pub args: Vec<String>,
    /// How it is written.
    pub kind: RuleKind,
}

impl Rule {
    fn own(chain: &str, args: &[&str]) -> Self {
        Self::with_kind(RuleKind::Own, chain, args)
    }

    fn hook(chain: &str, args: &[&str]) -> Self {
        Self::with_kind(RuleKind::Hook, chain, args)
    }

    fn with_kind(kind: RuleKind, chain: &str, args: &[&str]) -> Self {
        Self {
            table: NAT,
            chain: chain.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            kind,
        }
    }

    /// The rule specification after the chain name, joined with spaces.
    pub fn spec(&self) -> String {
        self.args
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for Rule {
    /// The rule as an iptables-restore line: `-A CHAIN spec` for Trellis's own chains,
    /// `-I CHAIN 1 spec` for the hooks in the built-in chains.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RuleKind::Own => write!(f, "-A {} {}", self.chain, self.spec()),
            RuleKind::Hook => write!(f, "-I {} 1 {}", self.chain, self.spec()),
        }
    }
}

fn quote(arg: &str) -> String {
    if !arg.is_empty() && !arg.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        arg.to_string()
    } else {
        format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Keeps the first occurrence of each port, in the given order.
fn dedup(ports: &[u16]) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::with_capacity(ports.len());
    for p in ports {
        if !out.contains(p) {
            out.push(*p);
        }
    }
    out
}

/// The IPv4 rules for `cfg`; see [`plan_for`].
pub fn plan(cfg: &InitConfig) -> Vec<Rule> {
    plan_for(cfg, IpFamily::V4)
}

/// The rules for `cfg` in one address family, in the order they are written: own chains
/// first (each in rule order), then the hooks from PREROUTING and OUTPUT.
///
/// Both families get the same rules, except that loopback is `127.0.0.1` or `::1` and
/// the excluded CIDRs (IPv4 networks) only appear in the IPv4 set.
///
/// Inbound (nat PREROUTING, TCP only): connections to the proxy's own ports and to
/// excluded inbound ports are left alone; every other one is redirected to
/// `inbound_port`. Outbound (nat OUTPUT, TCP only): connections made by the proxy's UID
/// (and GID, if set), connections over loopback or to 127.0.0.1, to excluded ports and
/// to excluded CIDRs are left alone; every other one is redirected to `outbound_port`.
pub fn plan_for(cfg: &InitConfig, family: IpFamily) -> Vec<Rule> {
    let mut rules = Vec::new();
    let inbound_to = cfg.inbound_port.to_string();
    let outbound_to = cfg.outbound_port.to_string();

    // Inbound.
    let mut keep_in = dedup(&cfg.proxy_ports);
    for p in dedup(&cfg.exclude_inbound_ports) {
        if !keep_in.contains(&p) {
            keep_in.push(p);
        }
    }
    for p in keep_in {
        let port = p.to_string();
        rules.push(Rule::own(
            CHAIN_INBOUND,
            &["-p", "tcp", "--dport", &port, "-j", "RETURN"],
        ));
    }
    rules.push(Rule::own(
        CHAIN_INBOUND,
        &["-p", "tcp", "-j", CHAIN_IN_REDIRECT],
    ));
    rules.push(Rule::own(
        CHAIN_IN_REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound_to],
    ));

    // Outbound.
    let uid = cfg.proxy_uid.to_string();
    rules.push(Rule::own(
        CHAIN_OUTPUT,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    if let Some(gid) = cfg.proxy_gid {
        let gid = gid.to_string();
        rules.push(Rule::own(
            CHAIN_OUTPUT,
            &["-m", "owner", "--gid-owner", &gid, "-j", "RETURN"],
        ));
    }
    rules.push(Rule::own(CHAIN_OUTPUT, &["-o", "lo", "-j", "RETURN"]));
    rules.push(Rule::own(
        CHAIN_OUTPUT,
        &["-d", family.loopback(), "-j", "RETURN"],
    ));
    for p in dedup(&cfg.exclude_outbound_ports) {
        let port = p.to_string();
        rules.push(Rule::own(
            CHAIN_OUTPUT,
            &["-p", "tcp", "--dport", &port, "-j", "RETURN"],
        ));
    }
    let mut cidrs = Vec::with_capacity(cfg.exclude_outbound_cidrs.len());
    let v4_cidrs = match family {
        IpFamily::V4 => cfg.exclude_outbound_cidrs.as_slice(),
        IpFamily::V6 => &[],
    };
    for c in v4_cidrs {
        if !cidrs.contains(c) {
            cidrs.push(*c);
        }
    }
    for c in cidrs {
        let net = c.to_string();
        rules.push(Rule::own(CHAIN_OUTPUT, &["-d", &net, "-j", "RETURN"]));
    }
    rules.push(Rule::own(CHAIN_OUTPUT, &["-j", CHAIN_REDIRECT]));
    rules.push(Rule::own(
        CHAIN_REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound_to],
    ));

    // Hooks.
    rules.push(Rule::hook(
        "PREROUTING",
        &["-p", "tcp", "-j", CHAIN_INBOUND],
    ));
    rules.push(Rule::hook("OUTPUT", &["-p", "tcp", "-j", CHAIN_OUTPUT]));
    rules
}

/// The plan as iptables-restore-like text, for `--dry-run`: the IPv4 set (for
/// `iptables-restore`), then the IPv6 set (for `ip6tables-restore`).
pub fn dry_run_text(cfg: &InitConfig) -> String {
    let mut out = String::new();
    out.push_str("# trellis-init: redirection rules for IPv4 and IPv6\n");
    out.push_str(&format!(
        "# backend: {}; proxy uid {}{}; outbound -> {}, inbound -> {}\n",
        cfg.backend,
        cfg.proxy_uid,
        cfg.proxy_gid
            .map(|g| format!(", gid {g}"))
            .unwrap_or_default(),
        cfg.outbound_port,
        cfg.inbound_port
    ));
    out.push_str(
        "# apply flushes the TRELLIS_* chains and inserts each -I hook only if it is missing\n",
    );
    out.push_str(
        "# IPv6 rules are required when the pod has a global IPv6 address; \
         without ip6tables init then fails\n",
    );
    for (family, tool) in [
        (IpFamily::V4, "iptables-restore"),
        (IpFamily::V6, "ip6tables-restore"),
    ] {
        out.push_str(&format!("# {family} ({tool})\n*nat\n"));
        for chain in OWN_CHAINS {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in plan_for(cfg, family) {
            out.push_str(&rule.to_string());
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}
